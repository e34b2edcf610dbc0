//! Diesel models of the two tables: a [`Task`] has many [`TaskExecution`]s.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::{task_executions, tasks};

// The relation's join, which `diesel print-schema` would derive from a foreign key:
// migration `executions_without_foreign_key` replaced that key with triggers.
diesel::joinable!(task_executions -> tasks (task_id));

/// One unit of work, in any state, with its scheduling and retry bookkeeping.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Identifiable, Serialize)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct Task {
    pub id: i64,
    pub task_class: String,
    pub task_parameters: serde_json::Value,
    pub status: String,
    pub instance: Option<String>,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When an operator asked to cancel the task while it ran.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The queue it waits and runs in (`default` unless its type or its enqueue says
    /// otherwise).
    pub queue: String,
    /// Its key for fair dispatch within the queue (a tenant, a customer); `""` for none.
    pub fair_key: String,
    /// How far its attempt got, in percent, as the task said (`ctx.progress`).
    pub progress: Option<i16>,
    pub progress_message: Option<String>,
    /// What the task saved to resume from (`ctx.checkpoint`), kept across attempts.
    pub checkpoint: Option<serde_json::Value>,
    /// Its unique key (`NewTask::unique_key`), if any.
    pub unique_key: Option<String>,
    /// While when it holds its key: `waiting`, `running` (waiting or running), or
    /// `released` (it went back to waiting after a run, or was retried by hand).
    pub unique_scope: String,
    /// Its own time limit in milliseconds (`NewTask::timeout`); `None`: its type's.
    pub timeout_ms: Option<i32>,
}

/// One attempt at running a task, written when it ends (`stopped_at`, and a result or
/// an error), or when the rescue finds it lost. Versions before migration 12 wrote it
/// at the claim, open (`stopped_at` null) until it ended.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Identifiable, Associations, Serialize)]
#[diesel(belongs_to(Task), table_name = task_executions, check_for_backend(diesel::pg::Pg))]
pub struct TaskExecution {
    pub id: i64,
    pub task_id: i64,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub instance: String,
    pub worker: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set when the attempt snoozed (`TaskError::snooze`): when the task was due again.
    /// Such an attempt used none of the task's attempts.
    pub snoozed_until: Option<DateTime<Utc>>,
    /// Set when its instance's stop interrupted the attempt (the task returned an error
    /// after it was asked to stop): the task waited again at once, and the attempt used
    /// none of its attempts. Always false for versions before migration 19.
    pub interrupted: bool,
}

/// The values a task row can have in `status` (the migration's CHECK constraint).
pub mod status {
    /// Runnable once `run_at` has passed.
    pub const WAITING: &str = "waiting";
    /// Claimed by an instance (`instance`), since `updated_at`; its execution is
    /// written when the attempt ends.
    pub const RUNNING: &str = "running";
    /// Ran to completion.
    pub const STOPPED: &str = "stopped";
    /// Failed for good: attempts exhausted or a permanent error.
    pub const FAILED: &str = "failed";
    /// Cancelled by an operator before it could complete.
    pub const CANCELLED: &str = "cancelled";
}
