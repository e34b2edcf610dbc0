//! What a running attempt says of itself: its progress and its checkpoint, and the
//! checkpoint a later attempt resumes from.

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Jsonb, Nullable, Text};

use crate::db::prepared::Prepared;

/// Writes what a running attempt says of itself: its progress (percent and message)
/// and its checkpoint, each only if given, for the task `task_id` while it still runs
/// attempt `attempt` (a rescued attempt writes nothing). Locks and changes the task's
/// row, but not `updated_at` (a running task's attempt start). Returns whether the task
/// was still running that attempt.
pub(crate) fn record_progress(
    conn: &mut PgConnection,
    task_id: i64,
    attempt: i32,
    progress: Option<(i16, &str)>,
    checkpoint: Option<&serde_json::Value>,
) -> QueryResult<bool> {
    let n = Prepared(
        diesel::sql_query(
            "UPDATE tasks SET progress = coalesce($3, progress), progress_message = coalesce($4, progress_message),
                              checkpoint = coalesce($5, checkpoint)
             WHERE id = $1 AND attempts = $2 AND status = 'running'",
        )
        .bind::<BigInt, _>(task_id)
        .bind::<Integer, _>(attempt)
        .bind::<Nullable<diesel::sql_types::SmallInt>, _>(progress.map(|p| p.0))
        .bind::<Nullable<Text>, _>(progress.map(|p| p.1))
        .bind::<Nullable<Jsonb>, _>(checkpoint),
    )
    .execute(conn)?;
    Ok(n == 1)
}

/// The checkpoint a task saved (by any of its attempts), if any. Locks nothing.
pub(crate) fn checkpoint(conn: &mut PgConnection, task_id: i64) -> QueryResult<Option<serde_json::Value>> {
    use crate::db::schema::tasks;
    Ok(tasks::table.find(task_id).select(tasks::checkpoint).first(conn).optional()?.flatten())
}
