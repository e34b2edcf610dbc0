//! What an operator does: retry a task, cancel it, prune old ones; retry or cancel
//! many by a filter. Each single-task action is one transaction that locks the task's
//! row, checks that its state allows the action, and changes it; a bulk action goes in
//! bounded batches, one short transaction each.

use diesel::prelude::*;

use crate::db::models::status;
use crate::db::{channel, maintenance, operator};
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
        channel::notify_ready(conn, 1)?;
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
                channel::notify_cancel(conn, task_id)?;
                Ok(Cancelled::Running)
            }
            _ => Err(Error::InvalidTransition { task_id, status: current, action: "cancel" }),
        }
    })
}

/// Which tasks [`retry_many`] and [`cancel_many`] take: those of the given state that
/// match every filter given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFilter {
    /// `failed` or `cancelled` for a retry; `waiting` (scheduled and retrying tasks
    /// included) for a cancel.
    pub status: String,
    /// Only tasks of this type.
    pub task_type: Option<String>,
    /// Only tasks in this queue.
    pub queue: Option<String>,
    /// Only tasks whose last change (their failure, their cancel, their insert) is at
    /// most this old.
    pub since: Option<std::time::Duration>,
}

impl TaskFilter {
    /// Tasks in `status`, whatever their type, queue and age.
    pub fn status(status: &str) -> Self {
        Self { status: status.to_owned(), task_type: None, queue: None, since: None }
    }
}

/// Puts back to waiting, due now, every failed (or cancelled) task the filter matches,
/// as [`retry`] does one: history kept, one more attempt for a task that used them
/// all. Goes in batches of at most `batch` tasks in id order, one short transaction
/// each, and wakes the instances after each; a task another session holds locked is
/// left as it is. Returns how many tasks wait again.
pub fn retry_many(conn: &mut PgConnection, filter: &TaskFilter, batch: i64) -> Result<u64, Error> {
    if filter.status != status::FAILED && filter.status != status::CANCELLED {
        return Err(Error::InvalidValue(format!("a retry takes failed or cancelled tasks, not {:?}", filter.status)));
    }
    bulk(conn, true, filter, batch)
}

/// Cancels every waiting task (scheduled and retrying ones included) the filter
/// matches: they never run. Running tasks are not touched (cancel them one by one with
/// [`cancel`]). In batches, as [`retry_many`]. Returns how many tasks were cancelled.
pub fn cancel_many(conn: &mut PgConnection, filter: &TaskFilter, batch: i64) -> Result<u64, Error> {
    if filter.status != status::WAITING {
        return Err(Error::InvalidValue(format!("a bulk cancel takes waiting tasks, not {:?}", filter.status)));
    }
    bulk(conn, false, filter, batch)
}

fn bulk(conn: &mut PgConnection, requeue: bool, filter: &TaskFilter, batch: i64) -> Result<u64, Error> {
    let matching = operator::Matching {
        task_type: filter.task_type.as_deref(),
        queue: filter.queue.as_deref(),
        since: filter.since,
    };
    let (mut changed, mut after) = (0u64, 0i64);
    // Each batch starts after the last id the one before looked at: a task that
    // fails again meanwhile is not taken twice.
    while let operator::Batch { changed: n, last: Some(last) } =
        operator::bulk_batch(conn, requeue, &[filter.status.as_str()], &matching, after, batch.max(1))?
    {
        changed += n as u64;
        after = last;
    }
    Ok(changed)
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
        let n = maintenance::prune_batch(conn, older_than, batch)?;
        deleted += n as u64;
        if (n as i64) < batch {
            return Ok(deleted);
        }
    }
}
