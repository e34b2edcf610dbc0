//! What an operator does: retry a task, cancel it, prune old ones. Each single-task
//! action is one transaction that locks the task's row, checks that its state allows
//! the action, and changes it.

use diesel::prelude::*;

use crate::db::models::status;
use crate::db::{channel, operator};
use crate::error::Error;

/// What [`cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The task was waiting (or scheduled): it is `cancelled` and will never run.
    Waiting,
    /// The task is running: its instance is asked to stop it (see
    /// [`crate::TaskContext::stop_requested`]); it ends `cancelled` unless the attempt
    /// succeeds, and is not retried.
    Running,
}

/// Puts a `failed` or `cancelled` task back to waiting, due at once. Its attempts and
/// their executions stay; if it had used all its attempts, it gets one more. Wakes an
/// idle instance.
pub fn retry(conn: &mut PgConnection, task_id: i64) -> Result<(), Error> {
    conn.transaction(|conn| {
        let current = locked_status(conn, task_id)?;
        if current != status::FAILED && current != status::CANCELLED {
            return Err(Error::InvalidTransition { task_id, status: current, action: "retry" });
        }
        operator::requeue(conn, task_id)?;
        channel::notify(conn, &serde_json::json!({ "ready": 1, "first_id": task_id }))?;
        Ok(())
    })
}

/// Cancels a waiting or running task; refuses one that has already ended.
pub fn cancel(conn: &mut PgConnection, task_id: i64) -> Result<Cancelled, Error> {
    conn.transaction(|conn| {
        let current = locked_status(conn, task_id)?;
        match current.as_str() {
            status::WAITING => {
                operator::cancel_waiting(conn, task_id)?;
                Ok(Cancelled::Waiting)
            }
            status::RUNNING => {
                operator::request_cancel(conn, task_id)?;
                channel::notify(conn, &serde_json::json!({ "cancel": task_id }))?;
                Ok(Cancelled::Running)
            }
            _ => Err(Error::InvalidTransition { task_id, status: current, action: "cancel" }),
        }
    })
}

fn locked_status(conn: &mut PgConnection, task_id: i64) -> Result<String, Error> {
    operator::lock_status(conn, task_id)?.ok_or(Error::TaskNotFound(task_id))
}

/// Deletes finished tasks (`stopped`, `failed`, `cancelled`) last updated more than
/// `older_than` ago, with their executions, in batches of at most `batch` tasks (one
/// short transaction each, so the tables stay available). Returns how many tasks were
/// deleted.
pub fn prune(conn: &mut PgConnection, older_than: std::time::Duration, batch: i64) -> Result<u64, Error> {
    let batch = batch.max(1);
    let mut deleted = 0u64;
    loop {
        let n = operator::prune_batch(conn, older_than, batch)?;
        deleted += n as u64;
        if (n as i64) < batch {
            return Ok(deleted);
        }
    }
}
