//! The completer: records finished attempts in batches, one statement per batch.
//!
//! Workers leave their outcomes in its inbox (each through an [`Outbox`] of its own)
//! and go on at once. A batch is recorded when it is full or a short delay after its
//! first outcome (default 1 ms): a lone task is recorded about a millisecond after it
//! ends, a busy instance writes hundreds of outcomes per statement. While the database
//! is away it keeps the batch and tries again with backoff for two minutes; what it
//! then gives up on stays `running` in the database and is rescued as a lost attempt,
//! never reported done. It ends once every worker has dropped its outbox and the inbox
//! is empty, so every outcome of a clean stop is recorded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diesel::PgConnection;

use crate::db::connect::connect;
use crate::db::tasks::{self, Completion, Outcome};
use crate::error::Error;
use crate::instance::in_flight::InFlight;
use crate::instance::scheduler::Timer;
use crate::instance::{backoff, lock};

/// The most outcomes recorded in one statement, unless the runner says otherwise.
pub(crate) const DEFAULT_MAX_BATCH: usize = 1000;
/// How long the completer keeps trying to record a batch while the database is away.
const RECORD_PATIENCE: Duration = Duration::from_secs(120);

/// What the completer needs.
pub(crate) struct Input {
    /// For its own connection.
    pub database_url: String,
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
    fn next_batch(&self) -> Option<Vec<Completion>> {
        let mut state = self.lock();
        loop {
            let closed = state.senders == 0;
            if let Some(since) = state.since {
                let deadline = since + self.delay;
                let now = Instant::now();
                if closed || state.pending.len() >= self.max_batch || now >= deadline {
                    let n = state.pending.len().min(self.max_batch);
                    let batch: Vec<Completion> = state.pending.drain(..n).collect();
                    state.since = if state.pending.is_empty() { None } else { Some(now) };
                    return Some(batch);
                }
                state = self.condvar.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            } else if closed {
                return None;
            } else {
                state = self.condvar.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
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

/// Records batches until the last worker is gone and every outcome is recorded.
pub(crate) fn run(input: Input) {
    // Its own connection, kept between batches, with the session settings its
    // statement is planned with (in the pool they would leak to the tasks'
    // connections). Connected before the first outcome (a failure is met again, and
    // handled, there).
    let mut conn: Option<PgConnection> = open(&input.database_url).ok();
    while let Some(batch) = input.inbox.next_batch() {
        record(&input, &mut conn, &batch);
    }
    log::debug!("completer stopped");
}

fn open(url: &str) -> Result<PgConnection, Error> {
    let mut conn = connect(url)?;
    tasks::prepare_completer_session(&mut conn)?;
    Ok(conn)
}

fn record(input: &Input, conn: &mut Option<PgConnection>, batch: &[Completion]) {
    let mut patience = Patience::new(Instant::now());
    loop {
        let recorded = match conn {
            Some(conn) => Ok(conn),
            None => open(&input.database_url).map(|c| conn.insert(c)),
        }
        .and_then(|conn| Ok(tasks::complete(conn, batch)?));
        let Err(error) = recorded else { break };
        *conn = None;
        input.stats.failures.fetch_add(1, Ordering::Relaxed);
        let Some(pause) = patience.failed(Instant::now()) else {
            log::error!(
                "giving up recording {} outcome(s) ({error}); their attempts stay open and will be rescued as lost",
                batch.len()
            );
            break;
        };
        log::error!("could not record {} outcome(s), trying again in {pause:?}: {error}", batch.len());
        std::thread::sleep(pause);
    }
    input.stats.completions.fetch_add(batch.len() as u64, Ordering::Relaxed);
    input.stats.batches.fetch_add(1, Ordering::Relaxed);
    // Recorded (or given up on): no longer in flight, and a ghost if still running.
    input.in_flight.forget(batch.iter().map(|c| (c.task_id, c.execution_id)));
    for completion in batch {
        if let Outcome::Retry { delay, .. } = &completion.outcome {
            input.timer.arm(Instant::now() + *delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(task_id: i64) -> Completion {
        Completion {
            execution_id: task_id,
            task_id,
            attempt: 1,
            worker: 0,
            queued: Duration::ZERO,
            elapsed: Duration::ZERO,
            outcome: Outcome::Succeeded(serde_json::Value::Null),
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
}
