//! What an operator does to one task: retry it, cancel it.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::models::status;
use crate::schema::tasks;
use crate::Error;

/// What [`cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// The task was waiting (or scheduled): it is `cancelled` and will never run.
    Waiting,
    /// The task is running: its instance is asked to stop it (see
    /// [`crate::TaskContext::stop_requested`]); it ends `cancelled` unless the
    /// attempt succeeds, and is not retried.
    Running,
}

/// Puts a `failed` or `cancelled` task back to waiting, due at once. Its attempts
/// and their executions stay; if it had used all its attempts, it gets one more.
/// Wakes an idle instance.
pub fn retry(conn: &mut PgConnection, task_id: i64) -> Result<(), Error> {
    conn.transaction(|conn| {
        let current = lock_status(conn, task_id)?;
        if current != status::FAILED && current != status::CANCELLED {
            return Err(Error::InvalidTransition { task_id, status: current, action: "retry" });
        }
        diesel::sql_query(
            "UPDATE tasks SET status = 'waiting', run_at = now(), cancel_requested_at = NULL,
                              max_attempts = GREATEST(max_attempts, attempts + 1), updated_at = now()
             WHERE id = $1",
        )
        .bind::<BigInt, _>(task_id)
        .execute(conn)?;
        notify(conn, &serde_json::json!({ "ready": 1, "first_id": task_id }))
    })
}

/// Cancels a waiting or running task; refuses one that has already ended.
pub fn cancel(conn: &mut PgConnection, task_id: i64) -> Result<Cancelled, Error> {
    conn.transaction(|conn| {
        let current = lock_status(conn, task_id)?;
        match current.as_str() {
            status::WAITING => {
                diesel::update(tasks::table.find(task_id))
                    .set((tasks::status.eq(status::CANCELLED), tasks::updated_at.eq(diesel::dsl::now)))
                    .execute(conn)?;
                Ok(Cancelled::Waiting)
            }
            status::RUNNING => {
                diesel::update(tasks::table.find(task_id))
                    .set((tasks::cancel_requested_at.eq(diesel::dsl::now), tasks::updated_at.eq(diesel::dsl::now)))
                    .execute(conn)?;
                notify(conn, &serde_json::json!({ "cancel": task_id }))?;
                Ok(Cancelled::Running)
            }
            _ => Err(Error::InvalidTransition { task_id, status: current, action: "cancel" }),
        }
    })
}

/// Locks the task's row for the rest of the transaction and returns its status.
fn lock_status(conn: &mut PgConnection, task_id: i64) -> Result<String, Error> {
    tasks::table
        .find(task_id)
        .select(tasks::status)
        .for_update()
        .first::<String>(conn)
        .optional()?
        .ok_or(Error::TaskNotFound(task_id))
}

/// Sends a notification on the channel of the `tasks` table this connection sees;
/// delivered when the transaction commits.
pub(crate) fn notify(conn: &mut PgConnection, payload: &serde_json::Value) -> Result<(), Error> {
    diesel::sql_query(
        "SELECT pg_notify(left(n.nspname, 50) || '.task_engine', $1)::text AS sent
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = 'tasks'::regclass",
    )
    .bind::<Text, _>(payload.to_string())
    .execute(conn)?;
    Ok(())
}

/// Deletes finished tasks (`stopped`, `failed`, `cancelled`) last updated more than
/// `older_than` ago, with their executions, in batches of at most `batch` tasks (one
/// short transaction each, so the tables stay available). Returns how many tasks
/// were deleted.
pub fn prune(conn: &mut PgConnection, older_than: std::time::Duration, batch: i64) -> Result<u64, Error> {
    let older_than_us = i64::try_from(older_than.as_micros()).unwrap_or(i64::MAX);
    let mut deleted = 0u64;
    loop {
        let n = diesel::sql_query(
            "DELETE FROM tasks WHERE id = ANY(ARRAY(
                 SELECT id FROM tasks
                 WHERE status IN ('stopped', 'failed', 'cancelled')
                   AND updated_at < now() - $1 * interval '1 microsecond'
                 LIMIT $2))",
        )
        .bind::<BigInt, _>(older_than_us)
        .bind::<BigInt, _>(batch.max(1))
        .execute(conn)?;
        deleted += n as u64;
        if (n as i64) < batch.max(1) {
            return Ok(deleted);
        }
    }
}
