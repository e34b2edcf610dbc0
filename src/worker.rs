//! One worker thread: take a claimed task from the instance's queue, run it with panics
//! contained, hand its outcome to the completer, take the next.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::context::TaskContext;
use crate::registry::RunFailure;
use crate::runner::Shared;
use crate::storage::{ClaimedTask, Completion, Outcome};

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
        while let Some((task, queued)) = self.shared.wakeup.next_task() {
            let completion = self.execute(task, queued);
            let ran = completion.elapsed;
            self.shared.completer.submit(completion);
            self.shared.wakeup.task_done(ran);
        }
        log::debug!("worker {} stopped", self.index);
    }

    fn execute(&self, task: ClaimedTask, queued: Duration) -> Completion {
        log::debug!("task {} ({}) attempt {} starting", task.id, task.task_class, task.attempt);
        let ctx = TaskContext {
            task_id: task.id,
            task_class: task.task_class.clone(),
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            worker: self.index,
            shared: Arc::clone(&self.shared),
        };
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
        Completion {
            execution_id: task.execution_id,
            task_id: task.id,
            attempt: task.attempt,
            worker: i32::try_from(self.index).unwrap_or(i32::MAX),
            queued,
            elapsed,
            outcome,
        }
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
}
