//! A worker thread: takes a claimed task from the hand-off, runs it with panics
//! contained, leaves its outcome with the completer, takes the next.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::context::{InstanceHandle, TaskContext};
use crate::db::tasks::{ClaimedTask, Completion, Outcome};
use crate::instance::completer::Outbox;
use crate::instance::handoff::Handoff;
use crate::instance::in_flight::InFlight;
use crate::registry::{Registry, RunFailure, TaskEntry};
use crate::task::TaskError;

/// The longest wait before a retry: a type's `retry_delay` beyond it (up to
/// `Duration::MAX`) would put the task past what the database and the clock can hold.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What a worker needs.
pub(crate) struct Input {
    /// Its number in the instance (recorded on executions).
    pub index: usize,
    pub handoff: Arc<Handoff>,
    pub registry: Registry,
    pub outbox: Outbox,
    /// What its tasks may see of the instance.
    pub instance: Arc<InstanceHandle>,
    /// Where its tasks' cancel flags are.
    pub in_flight: Arc<InFlight>,
}

/// Runs tasks until the instance stops.
pub(crate) fn run(input: Input) {
    while let Some((task, queued)) = input.handoff.next_task() {
        let completion = execute(&input, task, queued);
        let ran = completion.elapsed;
        input.outbox.submit(completion);
        input.handoff.task_done(ran);
    }
    log::debug!("worker {} stopped", input.index);
}

fn execute(input: &Input, task: ClaimedTask, queued: Duration) -> Completion {
    log::debug!("task {} ({}) attempt {} starting", task.id, task.task_type, task.attempt);
    let mut started = Instant::now();
    let (ran, cancelled, entry, finished) = match input.registry.get(&task.task_type) {
        Ok(entry) => {
            let ctx = TaskContext {
                task_id: task.id,
                task_type: entry.name(),
                attempt: task.attempt,
                max_attempts: task.max_attempts,
                worker: input.index,
                cancelled: input.in_flight.cancel_flag(task.id),
                instance: Arc::clone(&input.instance),
                reported: Default::default(),
            };
            started = Instant::now();
            let ran = if ctx.cancel_requested() {
                // Cancelled while it waited for a worker: it never starts.
                Err(RunFailure::Task(TaskError::permanent("cancelled before it started")))
            } else {
                catch_unwind(AssertUnwindSafe(|| entry.run(&task.task_parameters, &ctx)))
                    .unwrap_or_else(|panic| Err(RunFailure::Panic(panic_message(&*panic))))
            };
            let finished = Instant::now();
            // What the task reported in its last second, before its outcome.
            if let Err(error) = ctx.write(&mut ctx.reported()) {
                log::warn!(
                    "task {} ({}): its last progress or checkpoint was not saved: {error}",
                    task.id,
                    entry.name()
                );
            }
            (ran, ctx.cancel_requested(), Some(entry), finished)
        }
        // Claims ask only for registered types; this is a registry changed under us.
        Err(error) => (Err(RunFailure::Parameters(error.to_string())), false, None, Instant::now()),
    };
    let elapsed = finished.duration_since(started);
    Completion {
        execution_id: task.execution_id,
        task_id: task.id,
        attempt: task.attempt,
        worker: i32::try_from(input.index).unwrap_or(i32::MAX),
        claimed_at: task.claimed_at,
        queued,
        elapsed,
        outcome: outcome(&task, entry, ran, cancelled, elapsed),
        frees_a_place: task.limited,
    }
}

/// What an attempt's result means for its task: a success, a failure for good (a
/// permanent error, the last attempt, a cancelled task), or a retry after the type's
/// delay.
fn outcome(
    task: &ClaimedTask,
    entry: Option<&TaskEntry>,
    ran: Result<serde_json::Value, RunFailure>,
    cancelled: bool,
    elapsed: Duration,
) -> Outcome {
    let (id, task_type, attempt, max) = (task.id, &task.task_type, task.attempt, task.max_attempts);
    let failure = match ran {
        Ok(result) => {
            log::debug!("task {id} ({task_type}) succeeded in {elapsed:?}");
            return Outcome::Succeeded(result);
        }
        Err(failure) => failure,
    };
    let permanent = failure.is_permanent();
    let snoozed = failure.snoozed_for();
    let message = failure.into_message();
    if let (Some(delay), false) = (snoozed, cancelled) {
        let delay = delay.min(MAX_RETRY_DELAY);
        log::debug!("task {id} ({task_type}) attempt {attempt} snoozed for {delay:?}");
        return Outcome::Snoozed { delay };
    }
    if cancelled {
        log::warn!("task {id} ({task_type}) attempt {attempt}/{max} failed after its cancellation: {message}");
        Outcome::Failed(message)
    } else if permanent || attempt >= max {
        let why = if permanent { "permanently" } else { "on its last attempt" };
        log::error!("task {id} ({task_type}) attempt {attempt}/{max} failed {why}: {message}");
        Outcome::Failed(message)
    } else {
        // A type's retry_delay is its own code: contained like its run.
        let delay = catch_unwind(AssertUnwindSafe(|| entry.map(|e| e.retry_delay(attempt)).unwrap_or_default()))
            .unwrap_or_else(|_| crate::task::default_retry_delay(attempt))
            .min(MAX_RETRY_DELAY);
        log::warn!("task {id} ({task_type}) attempt {attempt}/{max} failed: {message}; retry in {delay:.1?}");
        Outcome::Retry { error: message, delay }
    }
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
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let a = catch_unwind(|| panic!("plain")).unwrap_err();
        let b = catch_unwind(|| std::panic::panic_any(format!("formatted {}", 42))).unwrap_err();
        assert!(b.downcast_ref::<String>().is_some(), "the payload is meant to be a String");
        assert_eq!(panic_message(&*a), "plain");
        assert_eq!(panic_message(&*b), "formatted 42");
    }

    fn attempt(attempt: i32, max_attempts: i32) -> ClaimedTask {
        ClaimedTask {
            id: 1,
            task_type: "t".into(),
            task_parameters: "null".into(),
            attempt,
            max_attempts,
            execution_id: 1,
            claimed_at: chrono::Utc::now(),
            limited: false,
        }
    }

    fn failed(message: &str) -> Result<serde_json::Value, RunFailure> {
        Err(RunFailure::Task(TaskError::new(message)))
    }

    #[test]
    fn a_failure_is_retried_until_the_last_attempt_unless_permanent_or_cancelled() {
        let none = Duration::ZERO;
        let retried = outcome(&attempt(1, 3), None, failed("busy"), false, none);
        assert_eq!(retried, Outcome::Retry { error: "busy".into(), delay: Duration::ZERO });
        assert!(matches!(outcome(&attempt(2, 3), None, failed("busy"), false, none), Outcome::Retry { .. }));
        assert_eq!(outcome(&attempt(3, 3), None, failed("busy"), false, none), Outcome::Failed("busy".into()));
        let permanent = Err(RunFailure::Task(TaskError::permanent("no such customer")));
        assert_eq!(outcome(&attempt(1, 3), None, permanent, false, none), Outcome::Failed("no such customer".into()));
        assert_eq!(outcome(&attempt(1, 3), None, failed("stopped"), true, none), Outcome::Failed("stopped".into()));
        let panicked = Err(RunFailure::Panic("oops".into()));
        assert!(matches!(outcome(&attempt(1, 3), None, panicked, false, none), Outcome::Retry { .. }));
        assert_eq!(
            outcome(&attempt(1, 3), None, Ok(serde_json::json!(5)), true, none),
            Outcome::Succeeded(serde_json::json!(5)),
            "a cancelled task that succeeds has succeeded"
        );
    }
}
