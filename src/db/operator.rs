//! What an operator does to one task (`engine retry`, `engine cancel`) and to old ones
//! (`engine prune`). The callers run the single-task statements in one transaction,
//! after [`lock_status`].

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::db::micros;
use crate::db::models::status;
use crate::db::schema::tasks;
use crate::db::transitions::{notify_waiting, retried_by_operator};

/// Locks the task's row for the rest of the transaction (`FOR UPDATE`) and returns its
/// status; `None` if there is no such task.
pub(crate) fn lock_status(conn: &mut PgConnection, task_id: i64) -> QueryResult<Option<String>> {
    tasks::table.find(task_id).select(tasks::status).for_update().first::<String>(conn).optional()
}

/// Puts a task back to waiting, due now, forgetting any cancel request; a task that
/// used all its attempts gets one more. Its executions stay. A unique task no longer
/// holds its key (a newer task may hold it).
pub(crate) fn requeue(conn: &mut PgConnection, task_id: i64) -> QueryResult<()> {
    diesel::sql_query(REQUEUE).bind::<BigInt, _>(task_id).execute(conn).map(drop)
}

/// The statement of [`requeue`].
pub(crate) const REQUEUE: &str = concat!("UPDATE tasks t SET ", retried_by_operator!(), " WHERE t.id = $1");

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

/// Which tasks a bulk action takes, besides their status: `None` matches any.
pub(crate) struct Matching<'a> {
    pub task_type: Option<&'a str>,
    pub queue: Option<&'a str>,
    /// Last changed at most this long ago.
    pub since: Option<Duration>,
}

/// What a batch of a bulk action did.
pub(crate) struct Batch {
    /// Tasks changed.
    pub changed: i64,
    /// The highest id the batch looked at: the next batch starts after it (`None`: no
    /// task left).
    pub last: Option<i64>,
}

/// The batch statement of a bulk action: the first `$6` tasks after id `$2` in one of
/// the states `$1` that match the filter (`$3` type, `$4` queue, `$5` changed within
/// microseconds), locked with `SKIP LOCKED` (a task another session holds is left as
/// it is), then `$action` on them, and the instances notified of how many wait again.
macro_rules! bulk_statement {
    ($action:expr) => {
        concat!(
            "WITH picked AS (
                 SELECT id FROM tasks
                 WHERE status = ANY($1) AND id > $2
                   AND ($3::text IS NULL OR task_class = $3) AND ($4::text IS NULL OR queue = $4)
                   AND ($5::bigint IS NULL OR updated_at >= now() - $5 * interval '1 microsecond')
                 ORDER BY id LIMIT $6
                 FOR UPDATE SKIP LOCKED
             ), moved AS (
                 UPDATE tasks t SET ",
            $action,
            "
                 FROM picked p WHERE t.id = p.id
                 RETURNING t.id, t.status
             ), notified AS (
                 SELECT ",
            notify_waiting!("count(*)"),
            "
                 FROM moved WHERE status = 'waiting' HAVING count(*) > 0
             )
             SELECT (SELECT count(*) FROM moved) AS changed, (SELECT max(id) FROM picked) AS last,
                    (SELECT count(*) FROM notified) AS notifications"
        )
    };
}

/// Puts a batch of failed or cancelled tasks back to waiting, due now, as
/// [`requeue`] does one (history kept; one more attempt for a task that used them
/// all), and wakes the instances. Locks and changes the batch's rows.
pub(crate) const REQUEUE_BATCH: &str = bulk_statement!(retried_by_operator!());

/// Cancels a batch of waiting tasks (they never run). Locks and changes the batch's
/// rows.
const CANCEL_BATCH: &str = bulk_statement!("status = 'cancelled', updated_at = now()");

/// Runs one batch of a bulk retry (`requeue`) or cancel over the tasks in `statuses`
/// that match, after id `after`.
pub(crate) fn bulk_batch(
    conn: &mut PgConnection,
    requeue: bool,
    statuses: &[&str],
    matching: &Matching<'_>,
    after: i64,
    batch: i64,
) -> QueryResult<Batch> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        changed: i64,
        #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
        last: Option<i64>,
    }
    let row: Row = diesel::sql_query(if requeue { REQUEUE_BATCH } else { CANCEL_BATCH })
        .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(statuses)
        .bind::<BigInt, _>(after)
        .bind::<diesel::sql_types::Nullable<diesel::sql_types::Text>, _>(matching.task_type)
        .bind::<diesel::sql_types::Nullable<diesel::sql_types::Text>, _>(matching.queue)
        .bind::<diesel::sql_types::Nullable<BigInt>, _>(matching.since.map(micros))
        .bind::<BigInt, _>(batch)
        .get_result(conn)?;
    Ok(Batch { changed: row.changed, last: row.last })
}
