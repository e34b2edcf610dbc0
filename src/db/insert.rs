//! The insert of tasks without a unique key: one statement for any number of tasks, or
//! for copies of one. Tasks with a unique key go through [`crate::db::unique`].

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Jsonb, Nullable, Text, Timestamptz};

use crate::db::prepared::Prepared;

/// A task to insert: see [`crate::NewTask`].
pub(crate) struct TaskInsert<'a> {
    pub task_type: &'a str,
    pub parameters: &'a serde_json::Value,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    /// Without `run_at`: due this long after the insert, on the server's clock.
    pub delay_us: i64,
    pub max_attempts: i32,
    pub queue: &'a str,
    /// For fair dispatch; `""` for none.
    pub key: &'a str,
    /// The unique key ([`crate::db::unique`]): a task with one is inserted by those
    /// statements, not [`insert_tasks`].
    pub unique_key: Option<&'a str>,
    /// While when it holds its key: `waiting` or `running`.
    pub unique_scope: &'a str,
    /// Its own time limit, in milliseconds (`None`: its type's).
    pub timeout_ms: Option<i32>,
}

#[derive(QueryableByName)]
struct InsertedId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Inserts tasks in one statement, whatever their number, and returns their ids in the
/// order given. A task without a run-at time is due after its delay (`now()` plus the
/// delay, usually none). Takes no lock beyond the new rows; the insert trigger may
/// notify.
pub(crate) fn insert_tasks(conn: &mut PgConnection, tasks: &[TaskInsert<'_>]) -> QueryResult<Vec<i64>> {
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type).collect();
    let parameters: Vec<&serde_json::Value> = tasks.iter().map(|t| t.parameters).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_at).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts).collect();
    let delays_us: Vec<i64> = tasks.iter().map(|t| t.delay_us).collect();
    let queues: Vec<&str> = tasks.iter().map(|t| t.queue).collect();
    let keys: Vec<&str> = tasks.iter().map(|t| t.key).collect();
    let timeouts: Vec<Option<i32>> = tasks.iter().map(|t| t.timeout_ms).collect();
    // WITH ORDINALITY and the ORDER BY make the ids come back in input order.
    let rows: Vec<InsertedId> = Prepared(
        diesel::sql_query(
            "WITH inserted AS (
             INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts, queue, fair_key,
                                timeout_ms)
             SELECT c, p, pr, COALESCE(r, now() + d * interval '1 microsecond'), m, q, k, tm
             FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::int[], $6::bigint[],
                         $7::text[], $8::text[], $9::int[])
                  WITH ORDINALITY AS n(c, p, pr, r, m, d, q, k, tm, ord)
             ORDER BY ord
             RETURNING id
         )
         SELECT id FROM inserted ORDER BY id",
        )
        .bind::<Array<Text>, _>(types)
        .bind::<Array<Jsonb>, _>(parameters)
        .bind::<Array<Integer>, _>(priorities)
        .bind::<Array<Nullable<Timestamptz>>, _>(run_ats)
        .bind::<Array<Integer>, _>(max_attempts)
        .bind::<Array<BigInt>, _>(delays_us)
        .bind::<Array<Text>, _>(queues)
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<Nullable<Integer>>, _>(timeouts),
    )
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Inserts `count` copies of one task in one statement (the parameters cross the wire
/// once) and returns their ids, ascending. Like [`insert_tasks`], locks nothing else.
pub(crate) fn insert_copies(conn: &mut PgConnection, task: &TaskInsert<'_>, count: i64) -> QueryResult<Vec<i64>> {
    let rows: Vec<InsertedId> = diesel::sql_query(
        "WITH inserted AS (
             INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts, queue, fair_key,
                                timeout_ms)
             SELECT $1, $2, $3, COALESCE($4, now() + $7 * interval '1 microsecond'), $5, $8, $9, $10
             FROM generate_series(1, $6)
             RETURNING id
         )
         SELECT id FROM inserted ORDER BY id",
    )
    .bind::<Text, _>(task.task_type)
    .bind::<Jsonb, _>(task.parameters)
    .bind::<Integer, _>(task.priority)
    .bind::<Nullable<Timestamptz>, _>(task.run_at)
    .bind::<Integer, _>(task.max_attempts)
    .bind::<BigInt, _>(count)
    .bind::<BigInt, _>(task.delay_us)
    .bind::<Text, _>(task.queue)
    .bind::<Text, _>(task.key)
    .bind::<Nullable<Integer>, _>(task.timeout_ms)
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}
