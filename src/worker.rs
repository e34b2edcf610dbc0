//! One worker thread: claim a task, run it with panics contained, record the attempt,
//! and sleep in the wake-up queue when there is nothing to claim.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::context::TaskContext;
use crate::registry::RunFailure;
use crate::runner::Shared;
use crate::storage::{self, ClaimedTask, Completion, Outcome};
use crate::wakeup::Wake;
use crate::Error;

/// The longest pause between two tries when the database fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a worker keeps trying to record a finished attempt before it leaves the
/// task to the rescue of lost attempts.
const RECORD_PATIENCE: Duration = Duration::from_secs(120);

pub(crate) struct Worker {
    index: usize,
    shared: Arc<Shared>,
}

impl Worker {
    pub(crate) fn new(index: usize, shared: Arc<Shared>) -> Self {
        Self { index, shared }
    }

    /// Runs until the instance stops.
    pub(crate) fn run(self) {
        let mut failures = 0;
        while !self.shared.wakeup.is_stopping() {
            let pause = match self.claim() {
                Ok(Some(task)) => {
                    failures = 0;
                    // Busy: wake-ups are no longer kept for this worker, which looks
                    // for work again as soon as the task is recorded.
                    self.shared.wakeup.task_started();
                    self.execute(task);
                    self.shared.wakeup.task_finished();
                    continue;
                }
                Ok(None) => self.shared.poll_interval,
                Err(error) => {
                    failures += 1;
                    log::error!("worker {} could not claim a task: {error}", self.index);
                    backoff(failures)
                }
            };
            if self.shared.wakeup.wait(pause) == Wake::Stop {
                break;
            }
        }
        log::debug!("worker {} stopped", self.index);
    }

    fn claim(&self) -> Result<Option<ClaimedTask>, Error> {
        let mut conn = self.shared.pool.get()?;
        let worker = i32::try_from(self.index).unwrap_or(i32::MAX);
        let mut claimed = storage::claim(&mut conn, &self.shared.instance, worker, &self.shared.task_classes, 1)?;
        let counters = &self.shared.counters;
        counters.claims.fetch_add(1, Ordering::Relaxed);
        if claimed.is_empty() {
            counters.empty_claims.fetch_add(1, Ordering::Relaxed);
        }
        Ok(claimed.pop())
    }

    fn execute(&self, task: ClaimedTask) {
        log::debug!("task {} ({}) attempt {} starting", task.id, task.task_class, task.attempt);
        let ctx = TaskContext {
            task_id: task.id,
            task_class: task.task_class.clone(),
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            worker: self.index,
            shared: Arc::clone(&self.shared),
        };
        self.shared.cancels.started(task.id);
        let started = Instant::now();
        let ran = match self.shared.registry.get(&task.task_class) {
            Ok(entry) => catch_unwind(AssertUnwindSafe(|| entry.run(&task.task_parameters, &ctx)))
                .unwrap_or_else(|panic| Err(RunFailure::Panic(panic_message(&*panic)))),
            // Claims ask only for registered types; this is a registry changed under us.
            Err(error) => Err(RunFailure::Parameters(error.to_string())),
        };
        let elapsed = started.elapsed();
        let cancelled = ctx.cancel_requested();
        let outcome = match ran {
            Ok(result) => {
                log::debug!("task {} ({}) succeeded in {elapsed:?}", task.id, task.task_class);
                Outcome::Succeeded(result)
            }
            Err(failure) => {
                let permanent = failure.is_permanent();
                let message = failure.into_message();
                let (id, class, attempt, max) = (task.id, &task.task_class, task.attempt, task.max_attempts);
                if cancelled {
                    log::warn!("task {id} ({class}) attempt {attempt}/{max} failed after its cancellation: {message}");
                    Outcome::Failed(message)
                } else if permanent || attempt >= max {
                    let why = if permanent { "permanently" } else { "on its last attempt" };
                    log::error!("task {id} ({class}) attempt {attempt}/{max} failed {why}: {message}");
                    Outcome::Failed(message)
                } else {
                    let delay = self.shared.registry.get(class).map(|e| e.retry_delay(attempt)).unwrap_or_default();
                    log::warn!("task {id} ({class}) attempt {attempt}/{max} failed: {message}; retry in {delay:.1?}");
                    Outcome::Retry { error: message, delay }
                }
            }
        };
        let retry_in = match &outcome {
            Outcome::Retry { delay, .. } => Some(*delay),
            _ => None,
        };
        self.record(Completion {
            execution_id: task.execution_id,
            task_id: task.id,
            attempt: task.attempt,
            worker: i32::try_from(self.index).unwrap_or(i32::MAX),
            elapsed,
            outcome,
        });
        // Only now: until its outcome is recorded (or given up on), the task is not a
        // ghost for the heartbeat's rescue.
        self.shared.cancels.forget(task.id);
        // The retry is ours to wake for: no notification announces it.
        if let Some(delay) = retry_in {
            self.shared.timer.arm(Instant::now() + delay);
        }
    }

    /// Records a finished attempt, trying again with backoff while the database is
    /// away. Recording twice is harmless (an already closed execution is left alone).
    fn record(&self, completion: Completion) {
        let deadline = Instant::now() + RECORD_PATIENCE;
        let mut failures = 0;
        loop {
            let recorded = self
                .shared
                .pool
                .get()
                .map_err(Error::from)
                .and_then(|mut conn| Ok(storage::complete(&mut conn, std::slice::from_ref(&completion))?));
            let error = match recorded {
                Ok(_) => return,
                Err(error) => error,
            };
            failures += 1;
            if Instant::now() >= deadline {
                log::error!(
                    "task {} attempt {}: giving up recording its outcome ({error}); \
                     the attempt stays open and will be rescued as lost",
                    completion.task_id,
                    completion.attempt
                );
                return;
            }
            log::error!(
                "task {} attempt {}: could not record its outcome, trying again: {error}",
                completion.task_id,
                completion.attempt
            );
            std::thread::sleep(backoff(failures));
        }
    }
}

/// Returns the pause after `failures` consecutive failures: 100 ms doubling up to
/// [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    (Duration::from_millis(100) * 2u32.pow(exponent)).min(MAX_BACKOFF)
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic with a payload that is not a string".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let a = catch_unwind(|| panic!("plain")).unwrap_err();
        let b = catch_unwind(|| panic!("formatted {}", 42)).unwrap_err();
        assert_eq!(panic_message(&*a), "plain");
        assert_eq!(panic_message(&*b), "formatted 42");
    }
}
