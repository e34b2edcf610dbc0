//! An attempt as it crosses the instance: claimed by the producer ([`ClaimedTask`]), run
//! by a worker, and handed to the completer as a [`Completion`] with its [`Outcome`].
//! The SQL layer reads and writes them; nothing here touches the database.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A task claimed by this instance: its attempt runs from now on, and its execution is
/// written when it ends (or by the rescue, if its instance dies).
#[derive(Debug, Clone)]
pub(crate) struct ClaimedTask {
    pub id: i64,
    /// The task's type (`tasks.task_class`).
    pub task_type: String,
    /// The parameters as JSON text: each task's type parses its own, so that a row the
    /// engine cannot read fails that task only, not the claim of all its neighbours.
    pub task_parameters: String,
    /// This attempt's number, 1 for the first.
    pub attempt: i32,
    pub max_attempts: i32,
    /// The id its execution will have: taken from the sequence at the claim, written
    /// with the execution when the attempt ends.
    pub execution_id: i64,
    /// The claim's time on the server: the attempt's start, before its wait for a
    /// worker.
    pub claimed_at: DateTime<Utc>,
    /// Claimed under its queue's limit: its end frees a place, which the instances
    /// waiting for one must hear of.
    pub limited: bool,
    /// Its own time limit (`tasks.timeout_ms`); `None`: its type's, if any.
    pub timeout: Option<Duration>,
}

/// How an attempt ended, as the task row will show it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Ran to completion with this result: the task becomes `stopped`.
    Succeeded(serde_json::Value),
    /// Failed for good: the task becomes `failed`.
    Failed(String),
    /// Failed, to be tried again after `delay` (from the server's clock): the task goes
    /// back to `waiting`.
    Retry { error: String, delay: Duration },
    /// Asked to run again after `delay`, without using an attempt: the task goes back
    /// to `waiting` with one more attempt allowed.
    Snoozed { delay: Duration },
    /// Failed after its instance asked it to stop (the instance stops): the task goes
    /// back to `waiting`, due now, with one more attempt allowed, as for a snooze.
    Interrupted(String),
}

/// A finished attempt, waiting to be recorded.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub execution_id: i64,
    pub task_id: i64,
    pub attempt: i32,
    pub worker: i32,
    /// When the attempt started and stopped, on the server's clock as the instance
    /// keeps it (`instance/server_clock.rs`): one clock for every attempt of the
    /// instance, so that one worker's attempts keep their order in the record.
    pub started_at: DateTime<Utc>,
    pub stopped_at: DateTime<Utc>,
    /// How long the attempt ran, measured by the worker.
    pub elapsed: Duration,
    pub outcome: Outcome,
    /// The task ran under its queue's limit: once recorded, its place is free, and the
    /// instances waiting for one must be told.
    pub frees_a_place: bool,
}
