//! The completer: records finished attempts in batches, one statement per batch.
//!
//! Workers leave their outcomes in its inbox (each through an [`Outbox`] of its own)
//! and go on at once. A batch is recorded when it is full or a short delay after its
//! first outcome (default 1 ms). While the database is away it keeps the batch and
//! tries again with backoff for two minutes; what it then gives up on stays `running`
//! and is rescued as a lost attempt, never reported done. A statement that fails while
//! the connection is sound failed on its rows: attempts whose rows another session
//! holds locked are set aside and tried again every second, and the rest is split
//! until the outcome the database refuses is found; that one is recorded with its text
//! escaped, the others as they are. It ends once every worker has dropped its outbox
//! and every outcome is recorded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::attempt::{Completion, Outcome};
use crate::db::completion;
use crate::db::connect::ping;
use crate::error::Error;
use crate::instance::connections::{Connections, Counted};
use crate::instance::in_flight::InFlight;
use crate::instance::parts::{Part, Stage};
use crate::instance::timer::Timer;
use crate::instance::{backoff, lock};

/// The most outcomes recorded in one statement, unless the runner says otherwise.
pub(crate) const DEFAULT_MAX_BATCH: usize = 1000;
/// How long the completer keeps trying to record a batch while the database is away,
/// or an attempt whose rows another session holds locked.
const RECORD_PATIENCE: Duration = Duration::from_secs(120);
/// How often attempts set aside for locked rows are tried again.
const SET_ASIDE_RETRY: Duration = Duration::from_secs(1);
/// How long the completer keeps its connection once attempts stop ending.
const CLOSE_AFTER: Duration = Duration::from_secs(30);
/// The most of a refused text kept, escaped, in its replacement.
const REPLACEMENT_TEXT: usize = 4096;

/// What the completer needs.
pub(crate) struct Input {
    /// Where it gets its own connection.
    pub connections: Connections,
    pub inbox: Arc<Inbox>,
    /// Told which tasks are recorded.
    pub in_flight: Arc<InFlight>,
    /// Armed for each retry: no notification announces it.
    pub timer: Arc<Timer>,
    pub stats: Arc<Stats>,
}

/// What the completer counts.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub completions: AtomicU64,
    pub batches: AtomicU64,
    pub failures: AtomicU64,
    /// Outcomes the database refused, recorded with their text escaped.
    pub replaced: AtomicU64,
    /// Recorded outcomes, by kind.
    pub succeeded: AtomicU64,
    pub retried: AtomicU64,
    pub interrupted: AtomicU64,
    pub failed: AtomicU64,
}

/// Where outcomes wait to be recorded.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    condvar: Condvar,
    delay: Duration,
    max_batch: usize,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Completion>,
    /// When the oldest pending outcome arrived.
    since: Option<Instant>,
    /// Outboxes not yet dropped: while there are any, more outcomes may come.
    senders: usize,
}

/// A worker's way into the inbox; the inbox closes when the last is dropped.
#[derive(Debug)]
pub(crate) struct Outbox {
    inbox: Arc<Inbox>,
}

/// An inbox that records after `delay` or at `max_batch` outcomes, with an outbox for
/// each of `senders` workers.
pub(crate) fn inbox(delay: Duration, max_batch: usize, senders: usize) -> (Arc<Inbox>, Vec<Outbox>) {
    let inbox = Arc::new(Inbox {
        state: Mutex::new(State { senders, ..State::default() }),
        condvar: Condvar::new(),
        delay,
        max_batch: max_batch.max(1),
    });
    let outboxes = (0..senders).map(|_| Outbox { inbox: Arc::clone(&inbox) }).collect();
    (inbox, outboxes)
}

impl Outbox {
    /// Hands over a finished attempt.
    pub(crate) fn submit(&self, completion: Completion) {
        let inbox = &self.inbox;
        let mut state = inbox.lock();
        state.pending.push(completion);
        let first = state.since.is_none();
        if first {
            state.since = Some(Instant::now());
        }
        let full = state.pending.len() >= inbox.max_batch;
        drop(state);
        if first || full {
            inbox.condvar.notify_one();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.inbox.lock().senders -= 1;
        self.inbox.condvar.notify_one();
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Blocks until a batch is due: full, or its first outcome is `delay` old, or every
    /// outbox is gone. `None` once they are gone and nothing is pending.
    #[cfg(test)]
    fn next_batch(&self) -> Option<Vec<Completion>> {
        match self.next(None) {
            Inbound::Batch(batch) => Some(batch),
            Inbound::Quiet | Inbound::Closed => None,
        }
    }

    /// Blocks until a batch is due (see `next_batch`), the inbox is closed and empty,
    /// or `quiet` passes with nothing pending.
    fn next(&self, quiet: Option<Duration>) -> Inbound {
        let mut state = self.lock();
        let start = Instant::now();
        loop {
            let closed = state.senders == 0;
            if let Some(since) = state.since {
                let deadline = since + self.delay;
                let now = Instant::now();
                if closed || state.pending.len() >= self.max_batch || now >= deadline {
                    let n = state.pending.len().min(self.max_batch);
                    let batch: Vec<Completion> = state.pending.drain(..n).collect();
                    state.since = if state.pending.is_empty() { None } else { Some(now) };
                    return Inbound::Batch(batch);
                }
                state = self.condvar.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            } else if closed {
                return Inbound::Closed;
            } else if let Some(quiet) = quiet {
                let left = quiet.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Inbound::Quiet;
                }
                state = self.condvar.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
            } else {
                state = self.condvar.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// What the inbox hands the completer.
enum Inbound {
    Batch(Vec<Completion>),
    /// Nothing came for a while.
    Quiet,
    /// Every outbox is gone and nothing is pending.
    Closed,
}

/// How the completer keeps trying to record a batch.
#[derive(Debug)]
struct Patience {
    deadline: Instant,
    failures: u32,
}

impl Patience {
    fn new(now: Instant) -> Self {
        Self { deadline: now + RECORD_PATIENCE, failures: 0 }
    }

    /// After a failure at `now`: the pause before the next try, or `None` to give up.
    fn failed(&mut self, now: Instant) -> Option<Duration> {
        self.failures += 1;
        (now < self.deadline).then(|| backoff::pause(self.failures))
    }
}

/// Starts the completer: it records batches until the last worker is gone and every
/// outcome is recorded (it is not stopped: it ends with the workers' outboxes).
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    Part::spawn("completer", Stage::Completer, move || run(input))
}

fn run(input: Input) {
    // Its own connection, opened at the first outcome and kept between batches, with
    // the settings its statement is planned with; closed once attempts stop ending.
    let mut recorder = Recorder { input: &input, conn: None, set_aside: Vec::new(), since: HashMap::new() };
    let mut retried_at = Instant::now();
    loop {
        let quiet = if !recorder.set_aside.is_empty() {
            Some(SET_ASIDE_RETRY)
        } else {
            recorder.conn.is_some().then_some(CLOSE_AFTER)
        };
        match input.inbox.next(quiet) {
            Inbound::Batch(batch) => recorder.record(batch),
            Inbound::Quiet if recorder.set_aside.is_empty() => {
                // Nothing ended for a while: the instance is idle.
                recorder.conn = None;
            }
            Inbound::Quiet => {}
            Inbound::Closed if recorder.set_aside.is_empty() => break,
            // The last outcomes wait for their rows.
            Inbound::Closed => std::thread::sleep(SET_ASIDE_RETRY.saturating_sub(retried_at.elapsed())),
        }
        if !recorder.set_aside.is_empty() && retried_at.elapsed() >= SET_ASIDE_RETRY {
            retried_at = Instant::now();
            recorder.retry_set_aside();
        }
    }
    log::debug!("completer stopped");
}

/// The completer's side of the database.
struct Recorder<'a> {
    input: &'a Input,
    conn: Option<Counted>,
    /// Attempts whose rows another session held locked, to try again.
    set_aside: Vec<Completion>,
    /// When each attempt set aside (by execution) was first set aside.
    since: HashMap<i64, Instant>,
}

impl Recorder<'_> {
    /// Records a batch: as one statement if it can; else, while the connection is
    /// sound, without the attempts whose rows are locked (set aside), and in halves
    /// until the outcome the database refuses is found and replaced.
    fn record(&mut self, batch: Vec<Completion>) {
        let mut patience = Patience::new(Instant::now());
        let mut todo = vec![batch];
        while let Some(mut batch) = todo.pop() {
            // A single outcome refused once is tried once more before it is replaced:
            // a deadlock or a cancelled statement passes, a refused text does not.
            let mut tried_alone = false;
            loop {
                let Err(error) = self.complete(&batch) else {
                    self.recorded(&batch);
                    break;
                };
                self.input.stats.failures.fetch_add(1, Ordering::Relaxed);
                // A sound connection means the statement failed on its rows.
                let locked = self.conn.as_mut().and_then(|conn| {
                    ping(conn).ok()?;
                    completion::locked_by_others(conn, &batch).ok()
                });
                let Some(locked) = locked else {
                    // The database is away: the same batch again, after a pause.
                    self.conn = None;
                    let Some(pause) = patience.failed(Instant::now()) else {
                        todo.push(batch);
                        self.give_up(todo.concat(), &error.to_string());
                        return;
                    };
                    log::error!("could not record {} outcome(s), trying again in {pause:?}: {error}", batch.len());
                    std::thread::sleep(pause);
                    continue;
                };
                if !locked.is_empty() {
                    let (held, free): (Vec<_>, Vec<_>) = batch.into_iter().partition(|c| locked.contains(&c.task_id));
                    self.set_aside(held);
                    batch = free;
                    if batch.is_empty() {
                        break;
                    }
                } else if batch.len() > 1 {
                    todo.push(batch.split_off(batch.len() / 2));
                } else if !tried_alone {
                    tried_alone = true;
                    std::thread::sleep(Duration::from_millis(100));
                } else {
                    self.replace(batch.remove(0), &error);
                    break;
                }
            }
        }
    }

    fn complete(&mut self, batch: &[Completion]) -> Result<(), Error> {
        let connections = &self.input.connections;
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(connections.completer(completion::SETTINGS)?),
        };
        completion::complete(conn, connections.session(), batch)?;
        Ok(())
    }

    /// Records an outcome the database refused as its escaped replacement; sets it
    /// aside if that is refused too (the refusal was not about its text).
    fn replace(&mut self, refused: Completion, error: &Error) {
        let substitute = replacement(&refused, &error.to_string());
        if self.complete(std::slice::from_ref(&substitute)).is_ok() {
            log::error!(
                "task {} attempt {}: its outcome could not be stored ({error}); recorded with its text escaped",
                refused.task_id,
                refused.attempt
            );
            self.input.stats.replaced.fetch_add(1, Ordering::Relaxed);
            self.recorded(&[substitute]);
        } else {
            self.set_aside(vec![refused]);
        }
    }

    fn set_aside(&mut self, held: Vec<Completion>) {
        let now = Instant::now();
        for completion in held {
            if let std::collections::hash_map::Entry::Vacant(entry) = self.since.entry(completion.execution_id) {
                entry.insert(now);
                log::warn!(
                    "task {} attempt {}: its row is held by another session; its outcome waits",
                    completion.task_id,
                    completion.attempt
                );
            }
            self.set_aside.push(completion);
        }
    }

    /// Tries again the attempts set aside, but for those set aside too long.
    fn retry_set_aside(&mut self) {
        let since = &self.since;
        let (expired, again): (Vec<_>, Vec<_>) = std::mem::take(&mut self.set_aside)
            .into_iter()
            .partition(|c| since.get(&c.execution_id).is_some_and(|t| t.elapsed() >= RECORD_PATIENCE));
        if !expired.is_empty() {
            self.give_up(expired, "their rows stayed locked by another session");
        }
        if !again.is_empty() {
            self.record(again);
        }
    }

    /// The batch is in the database.
    fn recorded(&mut self, batch: &[Completion]) {
        let stats = &self.input.stats;
        stats.completions.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        self.forget(batch);
        for completion in batch {
            let kind = match completion.outcome {
                Outcome::Succeeded(_) => &stats.succeeded,
                Outcome::Retry { .. } | Outcome::Snoozed { .. } => &stats.retried,
                Outcome::Failed(_) => &stats.failed,
                Outcome::Interrupted(_) => &stats.interrupted,
            };
            kind.fetch_add(1, Ordering::Relaxed);
            if let Some(at) = match &completion.outcome {
                Outcome::Retry { delay, .. } | Outcome::Snoozed { delay } => Instant::now().checked_add(*delay),
                _ => None,
            } {
                self.input.timer.arm(at);
            }
        }
    }

    /// Leaves attempts open, to be rescued as lost (they ended, so the rerun cannot
    /// overlap them).
    fn give_up(&mut self, batch: Vec<Completion>, why: &str) {
        log::error!(
            "giving up recording {} outcome(s) ({why}); their attempts stay open and will be rescued as lost",
            batch.len()
        );
        self.input.stats.completions.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.forget(&batch);
    }

    /// No longer in flight here (and a ghost if still running in the database).
    fn forget(&mut self, batch: &[Completion]) {
        for completion in batch {
            self.since.remove(&completion.execution_id);
        }
        self.input.in_flight.forget(batch.iter().map(|c| (c.task_id, c.execution_id)));
    }
}

/// What is recorded for an outcome the database refused (`why`): its texts escaped (a
/// NUL byte, which neither `text` nor `jsonb` can hold, and other control characters)
/// and cut to a few kilobytes. A result that cannot be stored fails the attempt for
/// good: running the task again would produce it again.
fn replacement(refused: &Completion, why: &str) -> Completion {
    let outcome = match &refused.outcome {
        Outcome::Succeeded(result) => Outcome::Failed(format!(
            "its result could not be stored ({why}); the result, escaped: {}",
            escaped(&result.to_string())
        )),
        Outcome::Failed(error) => {
            Outcome::Failed(format!("{} [escaped: the message could not be stored ({why})]", escaped(error)))
        }
        Outcome::Retry { error, delay } => Outcome::Retry {
            error: format!("{} [escaped: the message could not be stored ({why})]", escaped(error)),
            delay: *delay,
        },
        Outcome::Interrupted(error) => {
            Outcome::Interrupted(format!("{} [escaped: the message could not be stored ({why})]", escaped(error)))
        }
        // No text of its own: refused for another reason, recorded as it is.
        Outcome::Snoozed { delay } => Outcome::Snoozed { delay: *delay },
    };
    Completion { outcome, ..refused.clone() }
}

/// `text` with its control characters but line feeds and tabs escaped (`\u{0}`), cut
/// after [`REPLACEMENT_TEXT`] bytes.
fn escaped(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= REPLACEMENT_TEXT {
            out.push('…');
            break;
        }
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome_of(task_id: i64) -> Completion {
        outcome(task_id)
    }

    fn outcome(task_id: i64) -> Completion {
        Completion {
            execution_id: task_id,
            task_id,
            attempt: 1,
            worker: 0,
            started_at: chrono::Utc::now(),
            stopped_at: chrono::Utc::now(),
            elapsed: Duration::ZERO,
            outcome: Outcome::Succeeded(serde_json::Value::Null),
            frees_a_place: false,
        }
    }

    fn ids(batch: Option<Vec<Completion>>) -> Vec<i64> {
        batch.expect("a batch").iter().map(|c| c.task_id).collect()
    }

    /// The next batch, or a failure if it takes longer than any test should wait.
    fn next_within_20_s(inbox: &Arc<Inbox>) -> Option<Vec<i64>> {
        let (sent, received) = std::sync::mpsc::channel();
        let inbox = Arc::clone(inbox);
        std::thread::spawn(move || sent.send(inbox.next_batch().map(|b| ids(Some(b)))));
        received.recv_timeout(Duration::from_secs(20)).expect("no batch, and the inbox did not close")
    }

    #[test]
    fn a_full_batch_is_recorded_at_once_and_the_rest_makes_the_next() {
        let (inbox, outboxes) = inbox(Duration::from_secs(3600), 2, 1);
        // The delay is an hour: only fullness can explain these batches.
        outboxes[0].submit(outcome(1));
        outboxes[0].submit(outcome(2));
        assert_eq!(next_within_20_s(&inbox), Some(vec![1, 2]));
        for id in 3..=5 {
            outboxes[0].submit(outcome(id));
        }
        assert_eq!(next_within_20_s(&inbox), Some(vec![3, 4]));
        drop(outboxes);
        assert_eq!(next_within_20_s(&inbox), Some(vec![5]));
        assert_eq!(next_within_20_s(&inbox), None);
    }

    #[test]
    fn a_lone_outcome_is_recorded_once_the_delay_has_passed() {
        let delay = Duration::from_millis(30);
        let (inbox, outboxes) = inbox(delay, 1000, 1);
        let submitted = Instant::now();
        outboxes[0].submit(outcome(7));
        assert_eq!(ids(inbox.next_batch()), [7]);
        assert!(submitted.elapsed() >= delay, "recorded before its delay");
    }

    #[test]
    fn the_inbox_closes_when_the_last_worker_is_gone_and_keeps_nothing_back() {
        let (inbox, mut outboxes) = inbox(Duration::from_millis(1), 1000, 2);
        let (sent, received) = std::sync::mpsc::channel();
        {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                while let Some(batch) = inbox.next_batch() {
                    sent.send(ids(Some(batch))).unwrap();
                }
                sent.send(Vec::new()).unwrap(); // closed
            });
        }
        let within = Duration::from_secs(20);
        outboxes[1].submit(outcome(1));
        assert_eq!(received.recv_timeout(within), Ok(vec![1]));
        drop(outboxes.pop());
        // A second worker's last outcome, then its outbox goes: the completer, most
        // likely waiting for more by now, must wake, record it, and end.
        std::thread::sleep(Duration::from_millis(50));
        outboxes[0].submit(outcome(2));
        assert_eq!(received.recv_timeout(within), Ok(vec![2]));
        std::thread::sleep(Duration::from_millis(50));
        drop(outboxes);
        assert_eq!(received.recv_timeout(within), Ok(vec![]), "the inbox did not close with the last outbox");
    }

    #[test]
    fn a_batch_is_tried_again_with_backoff_for_two_minutes_then_given_up() {
        let start = Instant::now();
        let mut patience = Patience::new(start);
        assert_eq!(patience.failed(start), Some(Duration::from_millis(100)));
        assert_eq!(patience.failed(start + Duration::from_secs(1)), Some(Duration::from_millis(200)));
        assert_eq!(patience.failed(start + Duration::from_secs(119)), Some(Duration::from_millis(400)));
        assert_eq!(patience.failed(start + RECORD_PATIENCE), None);
    }

    #[test]
    fn a_refused_outcome_is_replaced_by_its_text_escaped_and_a_result_that_cannot_be_stored_fails() {
        let refused = |outcome| Completion { outcome, ..outcome_of(1) };
        let why = "unsupported Unicode escape sequence";
        let result = replacement(&refused(Outcome::Succeeded(serde_json::json!({"a": "x\u{0}y"}))), why);
        let Outcome::Failed(text) = result.outcome else { panic!("a result that cannot be stored did not fail") };
        // The result's JSON text escapes the NUL itself, and text can hold that.
        assert!(!text.contains('\0') && text.contains("x\\u0000y") && text.contains(why), "{text}");
        let retried =
            replacement(&refused(Outcome::Retry { error: "a\u{0}b".into(), delay: Duration::from_secs(4) }), why);
        assert!(
            matches!(&retried.outcome, Outcome::Retry { error, delay }
            if error.starts_with("a\\u{0}b [escaped") && *delay == Duration::from_secs(4)),
            "{:?}",
            retried.outcome
        );
        assert_eq!((result.execution_id, result.task_id, result.attempt), (1, 1, 1));
        let long = escaped(&"\u{1}".repeat(10_000));
        assert!(long.len() < REPLACEMENT_TEXT + 16 && long.ends_with('…'), "{}", long.len());
        assert_eq!(escaped("line\nand\ttab"), "line\nand\ttab");
    }
}
