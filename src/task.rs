//! What a task crate writes: the [`Task`] trait, the [`TaskError`] a run fails with,
//! and the [`register_task!`](crate::register_task) macro
//! that registers a type through `inventory`.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::context::TaskContext;
use crate::retry::default_retry_delay;

/// The queue of a task whose type and enqueue name none.
pub const DEFAULT_QUEUE: &str = "default";

/// A typed task: the value is the task's parameters, stored as JSON in
/// `tasks.task_parameters`; what [`Task::run`] returns is stored as JSON in the
/// execution's `result`.
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// The name stored in `tasks.task_class`; unique among registered types.
    const NAME: &'static str;

    /// How many attempts a task of this type gets unless its enqueue says otherwise.
    const MAX_ATTEMPTS: i32 = 25;

    /// The queue its tasks go to unless their enqueue says otherwise
    /// ([`NewTask::queue`](crate::NewTask::queue)). An instance runs the queues it is
    /// told to ([`Runner::queue`](crate::Runner::queue)), each with its own workers.
    const QUEUE: &'static str = DEFAULT_QUEUE;

    /// How long an attempt may run unless its enqueue says otherwise
    /// ([`NewTask::timeout`](crate::NewTask::timeout)); `None` (the default): no limit.
    /// At the limit, [`TaskContext::stop_requested`] turns true; an attempt that has not
    /// returned a grace later ([`Runner::timeout_grace`](crate::Runner::timeout_grace))
    /// is recorded as timed out and its worker replaced (see `docs/timeouts.md`).
    const TIMEOUT: Option<Duration> = None;

    /// What a successful run returns.
    type Output: Serialize;

    /// Runs one attempt. An `Err` is recorded on the execution as the attempt's error,
    /// and the task is tried again later unless the error is permanent or this was
    /// its last attempt.
    fn run(&self, ctx: &TaskContext) -> Result<Self::Output, TaskError>;

    /// How long to wait before the attempt after failed attempt number `attempt`
    /// (1 for the first). Default: [`default_retry_delay`].
    fn retry_delay(attempt: i32) -> Duration {
        default_retry_delay(attempt)
    }
}

/// Why an attempt failed, as a task reports it: a message, and whether trying again
/// could help.
///
/// Any `std::error::Error` converts into it, so `?` works inside [`Task::run`].
pub struct TaskError {
    message: String,
    permanent: bool,
    snooze: Option<Duration>,
}

impl TaskError {
    /// Builds an error that a later attempt might not meet.
    pub fn new(message: impl fmt::Display) -> Self {
        Self { message: message.to_string(), permanent: false, snooze: None }
    }

    /// Builds an error that no later attempt can fix: the task is not retried.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self { message: message.to_string(), permanent: true, snooze: None }
    }

    /// "Not now: again in `delay`": the task waits that long and runs again, without
    /// using one of its attempts. The attempt is recorded, with `snoozed_until`. A
    /// cancel requested meanwhile wins: the task ends `cancelled`.
    pub fn snooze(delay: Duration) -> Self {
        Self { message: format!("snoozed for {delay:?}"), permanent: false, snooze: Some(delay) }
    }

    /// How long the task asked to wait, if it snoozed.
    pub fn snoozed_for(&self) -> Option<Duration> {
        self.snooze
    }

    /// Returns the message recorded on the execution.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Tells whether the remaining attempts are skipped.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// Returns the message, consuming the error.
    pub(crate) fn into_message(self) -> String {
        self.message
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> Self {
        // Keep the whole chain of causes: the outermost message alone often says
        // too little ("request failed").
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new(message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("message", &self.message)
            .field("permanent", &self.permanent)
            .field("snooze", &self.snooze)
            .finish()
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Registers a [`Task`] implementation so that every engine linking this crate can
/// run it: `task_engine::register_task!(SendEmail);` next to the type.
#[macro_export]
macro_rules! register_task {
    ($task:ty) => {
        $crate::__inventory::submit! {
            $crate::TaskEntry::of::<$task>(concat!(module_path!(), "::", stringify!($task)))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_converted_from_std_errors_keep_their_causes() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("request failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = TaskError::from(Outer(std::io::Error::other("connection reset")));
        assert_eq!(error.message(), "request failed: connection reset");
        assert!(!error.is_permanent());
        assert!(TaskError::permanent("bad address").is_permanent());
    }
}
