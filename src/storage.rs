//! Every statement that changes the state of tasks and executions. Each is a single
//! statement (one implicit transaction), so a crash between two of them never leaves a
//! task half-claimed or half-finished. Claims and completions work on batches: the
//! producer claims for all idle workers at once, the completer records many attempts
//! in one statement.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::pg::Pg;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Integer, Jsonb, Nullable, Text, Timestamptz, Untyped};

/// A raw SQL statement whose text never changes, kept prepared on its connection.
///
/// Diesel never caches `sql_query` statements (their text could be built at run
/// time), so each would be parsed and planned anew: about 0.4 ms for the claim, as
/// long as the rest of its round trip. The statements here are constants with fixed
/// bind types, so they are safe to cache: the connection prepares each once, and
/// PostgreSQL's plan cache does the rest.
#[derive(Debug, Clone)]
#[must_use = "queries are only executed when loaded or executed"]
pub(crate) struct Prepared<Q>(pub Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(out)
    }

    /// The cache key is the statement's text and bind types, which identify it.
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q> Query for Prepared<Q> {
    type SqlType = Untyped;
}

impl<Q> RunQueryDsl<PgConnection> for Prepared<Q> {}

/// A task claimed by this instance, with its freshly opened execution.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct ClaimedTask {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub task_class: String,
    #[diesel(sql_type = Jsonb)]
    pub task_parameters: serde_json::Value,
    /// This attempt's number, 1 for the first.
    #[diesel(sql_type = Integer)]
    pub attempt: i32,
    #[diesel(sql_type = Integer)]
    pub max_attempts: i32,
    #[diesel(sql_type = BigInt)]
    pub execution_id: i64,
    #[diesel(sql_type = Timestamptz)]
    #[allow(dead_code)]
    pub started_at: DateTime<Utc>,
}

/// Claims up to `limit` runnable tasks of the given types for `instance`: locks them
/// with `FOR UPDATE SKIP LOCKED` (rows other claimers hold are passed over, not
/// waited for), marks them `running` with one more attempt, and opens one execution
/// per task, all in one statement. Highest priority first, then earliest due, then
/// oldest; the walk follows `tasks_waiting_idx`.
pub(crate) fn claim(
    conn: &mut PgConnection,
    instance: &str,
    worker: i32,
    task_classes: &[&str],
    limit: i64,
) -> QueryResult<Vec<ClaimedTask>> {
    Prepared(
        diesel::sql_query(
            "WITH picked AS (
             SELECT id FROM tasks
             WHERE status = 'waiting' AND run_at <= now() AND task_class = ANY($1)
             ORDER BY priority DESC, run_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), claimed AS (
             UPDATE tasks t
             SET status = 'running', instance = $3, attempts = t.attempts + 1, updated_at = now()
             WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
             RETURNING t.id, t.task_class, t.task_parameters, t.attempts, t.max_attempts,
                       t.priority, t.run_at, nextval('task_executions_id_seq') AS execution_id
         ), opened AS (
             INSERT INTO task_executions (id, task_id, attempt, started_at, instance, worker)
             SELECT execution_id, id, attempts, now(), $3, $4 FROM claimed
         )
         SELECT id, task_class, task_parameters, attempts AS attempt, max_attempts, execution_id,
                now() AS started_at
         FROM claimed
         ORDER BY priority DESC, run_at, id",
        )
        .bind::<Array<Text>, _>(task_classes)
        .bind::<BigInt, _>(limit)
        .bind::<Text, _>(instance)
        .bind::<Integer, _>(worker),
    )
    .load(conn)
}

/// How an attempt ended, as the task row will show it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Ran to completion with this result: the task becomes `stopped`.
    Succeeded(serde_json::Value),
    /// Failed for good: the task becomes `failed`.
    Failed(String),
    /// Failed, to be tried again after `delay` (from the server's clock): the task
    /// goes back to `waiting`.
    Retry { error: String, delay: Duration },
}

/// A finished attempt, waiting to be recorded.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub execution_id: i64,
    pub task_id: i64,
    pub attempt: i32,
    pub worker: i32,
    /// How long the task waited in the instance between its claim and its start:
    /// the execution's `started_at` (the claim's time) moves on by this much.
    pub queued: Duration,
    /// How long the attempt ran, measured by the worker: `stopped_at` is the
    /// corrected `started_at` plus this, so that both come from the server's clock.
    pub elapsed: Duration,
    pub outcome: Outcome,
}

/// The statement of [`complete`].
const COMPLETE: &str = "WITH closed AS (
             UPDATE task_executions e
             SET started_at = e.started_at + d.queued_us * interval '1 microsecond',
                 stopped_at = e.started_at + (d.queued_us + d.elapsed_us) * interval '1 microsecond',
                 result = d.result, error = d.error, worker = d.worker, updated_at = now()
             FROM unnest($1::bigint[], $4::int[], $5::bigint[], $7::jsonb[], $8::text[], $10::bigint[])
                  AS d(execution_id, worker, elapsed_us, result, error, queued_us)
             WHERE e.id = ANY($1) AND e.id = d.execution_id AND e.stopped_at IS NULL
         )
         UPDATE tasks t
         SET status = CASE WHEN t.cancel_requested_at IS NOT NULL AND d.status <> 'stopped'
                           THEN 'cancelled' ELSE d.status END,
             run_at = CASE WHEN d.delay_us IS NULL THEN t.run_at
                           ELSE now() + d.delay_us * interval '1 microsecond' END,
             updated_at = now()
         FROM unnest($2::bigint[], $3::int[], $6::text[], $9::bigint[]) AS d(task_id, attempt, status, delay_us)
         -- `IS NOT DISTINCT FROM` (status is never null: the same as `=`) does not let
         -- the planner prove the predicate of tasks_running_idx: statistics taken while
         -- nothing ran make that index look empty, and a walk of every running task,
         -- each checked against the whole batch, costs the square of the batch.
         WHERE t.id = ANY($2) AND t.id = d.task_id AND t.attempts = d.attempt
           AND t.status IS NOT DISTINCT FROM 'running'";

/// Records finished attempts, in one statement: closes each still-open execution with
/// its result or error and moves its task to the outcome's state; a task an operator
/// cancelled while it ran ends `cancelled` unless the attempt succeeded. An attempt whose
/// execution was already closed (the rescue took it), or whose task has moved on to
/// another attempt, changes nothing: the rescue closes the execution and moves the task
/// in one statement, so a task still `running` the same attempt still has it open.
/// Returns how many tasks changed state.
///
/// Run it on a connection prepared by [`prepare_completer_session`]: there the plan
/// finds the batch's rows by primary key and joins them by hash (or merge) whatever
/// the statistics and the batch's size, so the statement can stay prepared, with a
/// generic plan, and is not planned again for every batch.
pub(crate) fn complete(conn: &mut PgConnection, completions: &[Completion]) -> QueryResult<usize> {
    let n = completions.len();
    let mut queued_us = Vec::with_capacity(n);
    let (mut execution_ids, mut task_ids, mut attempts, mut workers, mut elapsed_us) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut statuses, mut results, mut errors, mut delays_us) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for c in completions {
        execution_ids.push(c.execution_id);
        task_ids.push(c.task_id);
        attempts.push(c.attempt);
        workers.push(c.worker);
        elapsed_us.push(i64::try_from(c.elapsed.as_micros()).unwrap_or(i64::MAX));
        queued_us.push(i64::try_from(c.queued.as_micros()).unwrap_or(i64::MAX));
        let (status, result, error, delay) = match &c.outcome {
            Outcome::Succeeded(result) => ("stopped", Some(result.clone()), None, None),
            Outcome::Failed(error) => ("failed", None, Some(error.clone()), None),
            Outcome::Retry { error, delay } => ("waiting", None, Some(error.clone()), Some(*delay)),
        };
        statuses.push(status);
        results.push(result);
        errors.push(error);
        delays_us.push(delay.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)));
    }
    Prepared(
        diesel::sql_query(COMPLETE)
            .bind::<Array<BigInt>, _>(execution_ids)
            .bind::<Array<BigInt>, _>(task_ids)
            .bind::<Array<Integer>, _>(attempts)
            .bind::<Array<Integer>, _>(workers)
            .bind::<Array<BigInt>, _>(elapsed_us)
            .bind::<Array<Text>, _>(statuses)
            .bind::<Array<Nullable<Jsonb>>, _>(results)
            .bind::<Array<Nullable<Text>>, _>(errors)
            .bind::<Array<Nullable<BigInt>>, _>(delays_us)
            .bind::<Array<BigInt>, _>(queued_us),
    )
    .execute(conn)
}

/// Sets up the completer's own connection for [`complete`]: with sequential scans
/// off, the planner finds the batch's rows through the primary keys (`id = ANY(...)`)
/// even while stale statistics make a whole-table scan look cheap (a table of 20,000
/// rows scanned for every batch halved the drain).
pub(crate) fn prepare_completer_session(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("SET enable_seqscan = off; SET enable_nestloop = off")
}

/// Undoes the claims of tasks that never started (the instance is stopping, or they
/// waited too long for a worker): their executions are deleted and the tasks wait
/// again with the attempt given back. A notification on the engine's channel wakes
/// the instances that sleep (an update fires no insert trigger). Returns how many
/// tasks wait again.
pub(crate) fn release(conn: &mut PgConnection, claimed: &[ClaimedTask]) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Released {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let execution_ids: Vec<i64> = claimed.iter().map(|t| t.execution_id).collect();
    let released: Released = diesel::sql_query(
        "WITH gone AS (
             DELETE FROM task_executions e
             WHERE e.id = ANY($1) AND e.stopped_at IS NULL
             RETURNING e.task_id, e.attempt
         ), moved AS (
             UPDATE tasks t
             -- A cancel asked while the task waited here ends it: it never ran.
             SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE 'waiting' END,
                 attempts = t.attempts - 1, updated_at = now()
             FROM gone
             WHERE t.id = ANY(ARRAY(SELECT task_id FROM gone)) AND t.id = gone.task_id
               AND t.status = 'running' AND t.attempts = gone.attempt
             RETURNING t.id
         ), counted AS (
             SELECT count(*) AS n FROM moved
         ), notified AS (
             -- The channel the insert trigger uses: `<schema of tasks>.task_engine`.
             SELECT pg_notify(left(ns.nspname, 50) || '.task_engine', json_build_object('ready', counted.n)::text)
             FROM counted, pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
             WHERE c.oid = 'tasks'::regclass AND counted.n > 0
         )
         -- Reading `notified` (in the select list, where no join removal drops it) is
         -- what runs its pg_notify.
         SELECT n, (SELECT count(*) FROM notified) AS notifications FROM counted",
    )
    .bind::<Array<BigInt>, _>(execution_ids)
    .get_result(conn)?;
    Ok(usize::try_from(released.n).unwrap_or(0))
}

/// A task to insert: see [`crate::NewTask`].
pub(crate) struct TaskInsert<'a> {
    pub task_class: &'a str,
    pub parameters: &'a serde_json::Value,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    /// Without `run_at`: due this long after the insert, on the server's clock.
    pub delay_us: i64,
    pub max_attempts: i32,
}

#[derive(QueryableByName)]
struct InsertedId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Inserts tasks in one statement, whatever their number, and returns their ids in
/// the order given. A task without a run-at time is due after its delay (`now()` plus
/// the delay, usually none).
pub(crate) fn insert_tasks(conn: &mut PgConnection, tasks: &[TaskInsert<'_>]) -> QueryResult<Vec<i64>> {
    let classes: Vec<&str> = tasks.iter().map(|t| t.task_class).collect();
    let parameters: Vec<&serde_json::Value> = tasks.iter().map(|t| t.parameters).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_at).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts).collect();
    let delays_us: Vec<i64> = tasks.iter().map(|t| t.delay_us).collect();
    // WITH ORDINALITY and the ORDER BY make the ids come back in input order.
    let rows: Vec<InsertedId> = Prepared(
        diesel::sql_query(
            "WITH inserted AS (
             INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts)
             SELECT c, p, pr, COALESCE(r, now() + d * interval '1 microsecond'), m
             FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::int[], $6::bigint[])
                  WITH ORDINALITY AS n(c, p, pr, r, m, d, ord)
             ORDER BY ord
             RETURNING id
         )
         SELECT id FROM inserted ORDER BY id",
        )
        .bind::<Array<Text>, _>(classes)
        .bind::<Array<Jsonb>, _>(parameters)
        .bind::<Array<Integer>, _>(priorities)
        .bind::<Array<Nullable<Timestamptz>>, _>(run_ats)
        .bind::<Array<Integer>, _>(max_attempts)
        .bind::<Array<BigInt>, _>(delays_us),
    )
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Inserts `count` copies of one task in one statement (the parameters cross the wire
/// once) and returns their ids, ascending.
pub(crate) fn insert_copies(conn: &mut PgConnection, task: &TaskInsert<'_>, count: i64) -> QueryResult<Vec<i64>> {
    let rows: Vec<InsertedId> = diesel::sql_query(
        "WITH inserted AS (
             INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts)
             SELECT $1, $2, $3, COALESCE($4, now() + $7 * interval '1 microsecond'), $5
             FROM generate_series(1, $6)
             RETURNING id
         )
         SELECT id FROM inserted ORDER BY id",
    )
    .bind::<Text, _>(task.task_class)
    .bind::<Jsonb, _>(task.parameters)
    .bind::<Integer, _>(task.priority)
    .bind::<Nullable<Timestamptz>, _>(task.run_at)
    .bind::<Integer, _>(task.max_attempts)
    .bind::<BigInt, _>(count)
    .bind::<BigInt, _>(task.delay_us)
    .load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(QueryableByName)]
    struct PlanLine {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }

    /// The completion's plan stays linear in its batch with the statistics a queue
    /// has: taken while every task waited and no attempt ran.
    #[test]
    fn the_completion_finds_its_rows_by_key_and_joins_them_by_hash_whatever_the_statistics() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (task_class, status) SELECT 'noop', 'stopped' FROM generate_series(1, 20000);
             INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, instance, worker)
                 SELECT id, 1, now(), now(), 'old', 0 FROM tasks;
             INSERT INTO tasks (task_class) SELECT 'noop' FROM generate_series(1, 5000);
             ANALYZE tasks; ANALYZE task_executions;",
        )
        .unwrap();
        let claimed = claim(&mut conn, "i", 0, &["noop"], 300).unwrap();
        assert_eq!(claimed.len(), 300);

        let mut session = db.connect();
        prepare_completer_session(&mut session).unwrap();
        let n = claimed.len();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            session.batch_execute(&format!("BEGIN; SET LOCAL plan_cache_mode = {mode}")).unwrap();
            let plan: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN (ANALYZE, COSTS OFF) {COMPLETE}"))
                .bind::<Array<BigInt>, _>(claimed.iter().map(|t| t.execution_id).collect::<Vec<_>>())
                .bind::<Array<BigInt>, _>(claimed.iter().map(|t| t.id).collect::<Vec<_>>())
                .bind::<Array<Integer>, _>(vec![1; n])
                .bind::<Array<Integer>, _>(vec![0; n])
                .bind::<Array<BigInt>, _>(vec![10i64; n])
                .bind::<Array<Text>, _>(vec!["stopped"; n])
                .bind::<Array<Nullable<Jsonb>>, _>(vec![Some(serde_json::Value::Null); n])
                .bind::<Array<Nullable<Text>>, _>(vec![None::<String>; n])
                .bind::<Array<Nullable<BigInt>>, _>(vec![None::<i64>; n])
                .bind::<Array<BigInt>, _>(vec![5i64; n])
                .load(&mut session)
                .unwrap();
            session.batch_execute("ROLLBACK").unwrap();
            let plan = plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n");
            for bad in ["Seq Scan", "Nested Loop", "Rows Removed by Join Filter", "tasks_running_idx"] {
                assert!(!plan.contains(bad), "{mode}: the completion's plan has a {bad}:\n{plan}");
            }
            assert!(plan.contains("task_executions_pkey") && plan.contains("tasks_pkey"), "{mode}:\n{plan}");
        }
    }
}
