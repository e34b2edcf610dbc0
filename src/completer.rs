//! The completer: records finished attempts in batches, one statement per batch.
//!
//! Workers hand it their outcomes and go on at once. It flushes when a batch is full
//! or a short delay after its first outcome (default 1 ms), so a lone task is
//! recorded about a millisecond after it ends and a busy instance writes hundreds of
//! outcomes per statement. When the database is away it keeps the batch and tries
//! again with backoff for two minutes; what it then gives up on stays `running` in
//! the database and is rescued by the heartbeat as a lost attempt, never reported
//! done. A clean stop flushes everything before the instance ends.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};

use crate::cluster::redact_url;
use crate::runner::Shared;
use crate::storage::{self, Completion, Outcome};
use crate::Error;

/// The most outcomes recorded in one statement.
pub(crate) const DEFAULT_MAX_BATCH: usize = 1000;
/// How long the completer keeps trying to record a batch while the database is away.
const RECORD_PATIENCE: Duration = Duration::from_secs(120);
/// The longest pause between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct State {
    pending: Vec<Completion>,
    /// When the oldest pending outcome arrived.
    since: Option<Instant>,
    stopping: bool,
}

#[derive(Debug)]
pub(crate) struct Completer {
    state: Mutex<State>,
    condvar: Condvar,
    delay: Duration,
    max_batch: usize,
}

impl Completer {
    pub(crate) fn new(delay: Duration, max_batch: usize) -> Self {
        Self { state: Mutex::new(State::default()), condvar: Condvar::new(), delay, max_batch: max_batch.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands over a finished attempt.
    pub(crate) fn submit(&self, completion: Completion) {
        let mut state = self.lock();
        state.pending.push(completion);
        let first = state.since.is_none();
        if first {
            state.since = Some(Instant::now());
        }
        let full = state.pending.len() >= self.max_batch;
        drop(state);
        if first || full {
            self.condvar.notify_one();
        }
    }

    /// Flushes what is pending, then ends [`run`]. Call once no worker submits.
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.condvar.notify_one();
    }

    /// Blocks until a batch is due: full, or its first outcome is `delay` old, or the
    /// completer stops. `None` once stopped with nothing pending.
    fn next_batch(&self) -> Option<Vec<Completion>> {
        let mut state = self.lock();
        loop {
            if let Some(since) = state.since {
                let deadline = since + self.delay;
                let now = Instant::now();
                if state.stopping || state.pending.len() >= self.max_batch || now >= deadline {
                    let n = state.pending.len().min(self.max_batch);
                    let batch: Vec<Completion> = state.pending.drain(..n).collect();
                    state.since = if state.pending.is_empty() { None } else { Some(now) };
                    return Some(batch);
                }
                state = self.condvar.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
            } else if state.stopping {
                return None;
            } else {
                state = self.condvar.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// Records batches until the completer is stopped and empty.
pub(crate) fn run(shared: Arc<Shared>) {
    // Its own connection, kept between batches like the producer's, with the session
    // settings its statement is planned with (not from the pool, where they would
    // leak to the workers' connections). Connected before the first outcome (a
    // failure is met again, and handled, there).
    let mut conn: Option<PgConnection> = connect(&shared.database_url).ok();
    while let Some(batch) = shared.completer.next_batch() {
        record(&shared, &mut conn, &batch);
    }
    log::debug!("completer stopped");
}

fn connect(url: &str) -> Result<PgConnection, Error> {
    let mut conn = PgConnection::establish(url)
        .map_err(|e| Error::Config(format!("could not connect to {}: {e}", redact_url(url))))?;
    storage::prepare_completer_session(&mut conn)?;
    Ok(conn)
}

fn record(shared: &Shared, conn: &mut Option<PgConnection>, batch: &[Completion]) {
    let deadline = Instant::now() + RECORD_PATIENCE;
    let mut failures = 0u32;
    loop {
        let recorded = match conn {
            Some(conn) => Ok(conn),
            None => connect(&shared.database_url).map(|c| conn.insert(c)),
        }
        .and_then(|conn| Ok(storage::complete(conn, batch)?));
        match recorded {
            Ok(_) => break,
            Err(error) => {
                *conn = None;
                failures += 1;
                shared.counters.completion_failures.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= deadline {
                    log::error!(
                        "giving up recording {} outcome(s) ({error}); their attempts stay open and will be \
                         rescued as lost",
                        batch.len()
                    );
                    break;
                }
                let pause = (Duration::from_millis(100) * 2u32.pow((failures - 1).min(16))).min(MAX_BACKOFF);
                log::error!("could not record {} outcome(s), trying again in {pause:?}: {error}", batch.len());
                std::thread::sleep(pause);
            }
        }
    }
    shared.counters.completions.fetch_add(batch.len() as u64, Ordering::Relaxed);
    shared.counters.completion_batches.fetch_add(1, Ordering::Relaxed);
    for completion in batch {
        // Recorded (or given up on): no longer ours, and a ghost if still running.
        shared.cancels.forget(completion.task_id);
        // The retry is ours to wake for: no notification announces it.
        if let Outcome::Retry { delay, .. } = &completion.outcome {
            shared.timer.arm(Instant::now() + *delay);
        }
    }
}
