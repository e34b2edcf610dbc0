//! What an operator does to one task (`engine retry`, `engine cancel`) and to old ones
//! (`engine prune`). The callers run the single-task statements in one transaction,
//! after [`lock_status`].

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::db::micros;
use crate::db::models::status;
use crate::db::schema::tasks;

/// Locks the task's row for the rest of the transaction (`FOR UPDATE`) and returns its
/// status; `None` if there is no such task.
pub(crate) fn lock_status(conn: &mut PgConnection, task_id: i64) -> QueryResult<Option<String>> {
    tasks::table.find(task_id).select(tasks::status).for_update().first::<String>(conn).optional()
}

/// Puts a task back to waiting, due now, forgetting any cancel request; a task that
/// used all its attempts gets one more. Its executions stay.
pub(crate) fn requeue(conn: &mut PgConnection, task_id: i64) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE tasks SET status = 'waiting', run_at = now(), cancel_requested_at = NULL,
                          max_attempts = GREATEST(max_attempts, attempts + 1), updated_at = now()
         WHERE id = $1",
    )
    .bind::<BigInt, _>(task_id)
    .execute(conn)
    .map(drop)
}

/// Marks a waiting task `cancelled`: it will never run.
pub(crate) fn cancel_waiting(conn: &mut PgConnection, task_id: i64) -> QueryResult<()> {
    diesel::update(tasks::table.find(task_id))
        .set((tasks::status.eq(status::CANCELLED), tasks::updated_at.eq(diesel::dsl::now)))
        .execute(conn)
        .map(drop)
}

/// Records that an operator asked a running task to stop (`cancel_requested_at`): its
/// attempt, unless it succeeds, ends the task `cancelled`. `updated_at` stays the
/// attempt's start, which the rescue records if the attempt is lost.
pub(crate) fn request_cancel(conn: &mut PgConnection, task_id: i64) -> QueryResult<()> {
    diesel::update(tasks::table.find(task_id))
        .set(tasks::cancel_requested_at.eq(diesel::dsl::now))
        .execute(conn)
        .map(drop)
}

/// Deletes at most `batch` finished tasks (`stopped`, `failed`, `cancelled`) last
/// updated more than `older_than` ago, locking those rows; the cascade trigger deletes
/// their executions. The outer condition repeats the inner one: a task retried while
/// the delete waited for its row is checked again as it now is, and kept. Returns how
/// many tasks it deleted.
pub(crate) fn prune_batch(conn: &mut PgConnection, older_than: Duration, batch: i64) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM tasks
         WHERE id = ANY(ARRAY(
                 SELECT id FROM tasks
                 WHERE status IN ('stopped', 'failed', 'cancelled')
                   AND updated_at < now() - $1 * interval '1 microsecond'
                 LIMIT $2))
           AND status IN ('stopped', 'failed', 'cancelled')
           AND updated_at < now() - $1 * interval '1 microsecond'",
    )
    .bind::<BigInt, _>(micros(older_than))
    .bind::<BigInt, _>(batch)
    .execute(conn)
}
