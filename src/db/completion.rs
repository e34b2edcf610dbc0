//! The end of an attempt in SQL: the completion of a batch of outcomes, the release of
//! claims that never started, and the records of attempts abandoned past their time
//! limit. Each moves its tasks in one statement (or one transaction) and writes the
//! attempt's execution in the same one, so a crash never leaves an attempt half-recorded.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};

use crate::attempt::{ClaimedTask, Completion, Outcome};
use crate::db::connect::{Session, BOUNDED_LOCK_WAITS};
use crate::db::micros;
use crate::db::prepared::{is_missing_function, Prepared, ServerSide};
use crate::db::transitions::{cancel_wins, lets_waiting_key_go, notify_waiting};
use crate::db::unique;

/// The statement of [`complete`].
pub(crate) const COMPLETE: &str = concat!(
    "WITH moved AS (
             UPDATE tasks t
             SET status = CASE WHEN d.status = 'stopped' THEN 'stopped' ",
    cancel_wins!(),
    "
                               WHEN d.status IN ('snoozed', 'interrupted') THEN 'waiting' ELSE d.status END,
                 -- A snooze or an interrupt uses no attempt: one more is allowed.
                 max_attempts = t.max_attempts + CASE WHEN d.status IN ('snoozed', 'interrupted') THEN 1 ELSE 0 END,
                 ",
    lets_waiting_key_go!("d.status IN ('waiting', 'snoozed', 'interrupted')"),
    ",
                 run_at = CASE WHEN d.delay_us IS NULL THEN t.run_at
                               ELSE now() + d.delay_us * interval '1 microsecond' END,
                 updated_at = now()
             FROM unnest($2::bigint[], $3::int[], $6::text[], $9::bigint[]) AS d(task_id, attempt, status, delay_us)
             -- `IS NOT DISTINCT FROM` (status is never null: the same as `=`) does not let
             -- the planner prove the predicate of tasks_running_idx: statistics taken while
             -- nothing ran make that index look empty, and a walk of every running task,
             -- each checked against the whole batch, costs the square of the batch.
             WHERE t.id = ANY($2) AND t.id = d.task_id AND t.attempts = d.attempt
               AND t.status IS NOT DISTINCT FROM 'running'
             RETURNING t.id, t.instance, t.run_at, t.status, t.unique_scope
         ), notified AS (
             -- Under a queue's limit, each recorded attempt freed a place; an interrupted
             -- task waits again, due now (`$11`, either): wake the instances, in this
             -- statement's commit.
             SELECT ",
    notify_waiting!("count(*)"),
    "
             FROM moved WHERE $11 HAVING count(*) > 0
         ), recorded AS (
         INSERT INTO task_executions (id, task_id, attempt, started_at, stopped_at, result, error, instance, worker,
                                      snoozed_until, interrupted)
         SELECT d.execution_id, d.task_id, d.attempt, d.started_at, d.stopped_at, d.result, d.error, m.instance, d.worker,
                CASE WHEN d.status = 'snoozed' THEN m.run_at END,
                -- A cancel that won is no interrupt.
                d.status = 'interrupted' AND m.status = 'waiting'
         FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::int[], $5::timestamptz[], $7::jsonb[], $8::text[],
                     $10::timestamptz[], $6::text[])
              AS d(execution_id, task_id, attempt, worker, stopped_at, result, error, started_at, status)
         JOIN moved m ON m.id = d.task_id
         -- Reading `notified` is what runs its pg_notify (once, before the first row).
         WHERE (SELECT count(*) FROM notified) >= 0
         RETURNING task_id
         )
         -- The tasks back to waiting without their unique key: `keep_keys` looks at them.
         SELECT (SELECT count(*) FROM recorded) AS recorded,
                array(SELECT id FROM moved WHERE status = 'waiting' AND unique_scope = 'released') AS released"
);

/// Records finished attempts, in one statement: moves each task still running that
/// attempt to the outcome's state, and writes the attempt's execution (start, end,
/// result or error, instance, worker); a task an operator cancelled while it ran ends
/// `cancelled` unless the attempt succeeded; under a queue's limit, notifies the
/// instances that a place is free. Locks the batch's task rows. An attempt
/// whose task is no longer running it (the rescue took it, and wrote its execution as
/// lost, in one statement) changes nothing and writes nothing, so each attempt has one
/// execution. An interrupted attempt (its instance stops) waits again at once with
/// one more attempt allowed, as a snooze does, and wakes the instances. Returns how
/// many attempts were recorded.
///
/// It runs with [`SETTINGS`] (on the `session`, or for its transaction): there the
/// plan finds the batch's tasks by primary key and joins by hash (or merge) whatever
/// the statistics and the batch's size, so the statement can stay prepared, with a
/// generic plan, and is not planned again for every batch.
pub(crate) fn complete(conn: &mut PgConnection, session: Session, completions: &[Completion]) -> QueryResult<usize> {
    let n = completions.len();
    let started_at: Vec<DateTime<Utc>> = completions.iter().map(|c| c.started_at).collect();
    let stopped_at: Vec<DateTime<Utc>> = completions.iter().map(|c| c.stopped_at).collect();
    let (mut execution_ids, mut task_ids, mut attempts, mut workers) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut statuses, mut results, mut errors, mut delays_us) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for c in completions {
        execution_ids.push(c.execution_id);
        task_ids.push(c.task_id);
        attempts.push(c.attempt);
        workers.push(c.worker);
        let (status, result, error, delay) = match &c.outcome {
            Outcome::Succeeded(result) => ("stopped", Some(result), None, None),
            Outcome::Failed(error) => ("failed", None, Some(error.as_str()), None),
            Outcome::Retry { error, delay } => ("waiting", None, Some(error.as_str()), Some(micros(*delay))),
            Outcome::Snoozed { delay } => ("snoozed", None, None, Some(micros(*delay))),
            Outcome::Interrupted(error) => ("interrupted", None, Some(error.as_str()), Some(0)),
        };
        statuses.push(status);
        results.push(result);
        errors.push(error);
        delays_us.push(delay);
    }
    let planned = session == Session::Pooled && PLANNED_COMPLETE.planned(conn);
    let sql = if planned { PLANNED_COMPLETE.call() } else { COMPLETE.to_owned() };
    let statement = Prepared(
        diesel::sql_query(sql)
            .bind::<Array<BigInt>, _>(execution_ids)
            .bind::<Array<BigInt>, _>(task_ids)
            .bind::<Array<Integer>, _>(attempts)
            .bind::<Array<Integer>, _>(workers)
            .bind::<Array<Timestamptz>, _>(stopped_at)
            .bind::<Array<Text>, _>(statuses)
            .bind::<Array<Nullable<Jsonb>>, _>(results)
            .bind::<Array<Nullable<Text>>, _>(errors)
            .bind::<Array<Nullable<BigInt>>, _>(delays_us)
            .bind::<Array<Timestamptz>, _>(started_at)
            .bind::<Bool, _>(
                completions.iter().any(|c| c.frees_a_place || matches!(c.outcome, Outcome::Interrupted(_))),
            ),
    );
    let recorded: Recorded = if planned {
        statement.get_result(conn).inspect_err(|error| {
            if is_missing_function(error) {
                PLANNED_COMPLETE.missing();
            }
        })?
    } else {
        session.with(conn, SETTINGS, |conn| statement.get_result(conn))?
    };
    unique::keep_keys(conn, &recorded.released);
    Ok(usize::try_from(recorded.recorded).unwrap_or(0))
}

/// What [`COMPLETE`] did: how many attempts it recorded, and which of their tasks
/// wait again without their unique key.
#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = BigInt)]
    recorded: i64,
    #[diesel(sql_type = Array<BigInt>)]
    released: Vec<i64>,
}

/// [`COMPLETE`] kept planned on the server, for connections through a pooler.
static PLANNED_COMPLETE: ServerSide = ServerSide::new(
    COMPLETE,
    &[
        "bigint[]",
        "bigint[]",
        "integer[]",
        "integer[]",
        "timestamptz[]",
        "text[]",
        "jsonb[]",
        "text[]",
        "bigint[]",
        "timestamptz[]",
        "boolean",
    ],
    "recorded bigint, released bigint[]",
    SETTINGS,
);

/// The settings of the completer's statements ([`complete`]): with sequential scans
/// and nested loops off (and JIT, as for the claim), the planner finds the batch's rows
/// through the primary keys (`id = ANY(...)`) and joins them by hash even while stale
/// statistics make a scan of the whole table look cheap; lock waits are bounded by
/// [`BOUNDED_LOCK_WAITS`].
pub(crate) const SETTINGS: &[&str] =
    &["enable_seqscan = off", "enable_nestloop = off", "jit = off", BOUNDED_LOCK_WAITS];

/// The tasks of `completions` whose row another session holds locked now. Tries to
/// lock each with `SKIP LOCKED` for this statement only (its locks end with it), and
/// waits for none.
pub(crate) fn locked_by_others(conn: &mut PgConnection, completions: &[Completion]) -> QueryResult<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let task_ids: Vec<i64> = completions.iter().map(|c| c.task_id).collect();
    let locked: Vec<Locked> = diesel::sql_query(
        "WITH t AS (SELECT id FROM tasks WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)
         SELECT x.id FROM tasks x WHERE x.id = ANY($1) AND x.id NOT IN (SELECT id FROM t)",
    )
    .bind::<Array<BigInt>, _>(task_ids)
    .load(conn)?;
    Ok(locked.into_iter().map(|l| l.id).collect())
}

/// Undoes the claims of tasks that never started (the instance is stopping, or they
/// waited too long for a worker): puts the tasks `instance` still runs that attempt of
/// back to waiting with the attempt given back (or `cancelled`, if a cancel came
/// meanwhile), locking those task rows; no execution was written for them. Notifies
/// the engine's channel, so that sleeping instances wake (an update fires no insert
/// trigger). Returns how many tasks wait again.
pub(crate) fn release(conn: &mut PgConnection, instance: &str, claimed: &[ClaimedTask]) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Released {
        #[diesel(sql_type = BigInt)]
        n: i64,
        /// Back to waiting without their unique key.
        #[diesel(sql_type = Array<BigInt>)]
        released: Vec<i64>,
    }
    let ids: Vec<i64> = claimed.iter().map(|t| t.id).collect();
    let attempts: Vec<i32> = claimed.iter().map(|t| t.attempt).collect();
    let released: Released = diesel::sql_query(RELEASE)
        .bind::<Array<BigInt>, _>(ids)
        .bind::<Array<Integer>, _>(attempts)
        .bind::<Text, _>(instance)
        .get_result(conn)?;
    unique::keep_keys(conn, &released.released);
    Ok(usize::try_from(released.n).unwrap_or(0))
}

/// The statement of [`release`].
pub(crate) const RELEASE: &str = concat!(
    "WITH moved AS (
             UPDATE tasks t
             SET status = CASE ",
    cancel_wins!(),
    " ELSE 'waiting' END,
                 attempts = t.attempts - 1, updated_at = now(),
                 ",
    lets_waiting_key_go!(),
    "
             FROM unnest($1::bigint[], $2::int[]) AS g(id, attempt)
             WHERE t.id = ANY($1) AND t.id = g.id
               AND t.status = 'running' AND t.attempts = g.attempt AND t.instance = $3
             RETURNING t.id, t.status, t.unique_scope
         ), counted AS (
             SELECT count(*) AS n FROM moved
         ), notified AS (
             SELECT ",
    notify_waiting!("n"),
    " FROM counted WHERE n > 0
         )
         -- Reading `notified` (in the select list, where no join removal drops it) is
         -- what runs its pg_notify.
         SELECT n, (SELECT count(*) FROM notified) AS notifications,
                array(SELECT id FROM moved WHERE status = 'waiting' AND unique_scope = 'released') AS released
         FROM counted"
);

/// Records an attempt that passed its time limit and grace without returning (its
/// worker abandoned): writes its execution, with `completion`'s error, if `instance`
/// still runs that attempt and it has none yet. The task stays `running` here: it must
/// not run again while the abandoned thread may still run it. Locks nothing (it reads
/// the task's row; the execution's id, taken at the claim, makes a second write a
/// no-op).
pub(crate) fn record_timed_out(conn: &mut PgConnection, instance: &str, completion: &Completion) -> QueryResult<bool> {
    let error = match &completion.outcome {
        Outcome::Failed(error) | Outcome::Retry { error, .. } => error.as_str(),
        _ => "timed out",
    };
    let written = diesel::sql_query(
        "INSERT INTO task_executions (id, task_id, attempt, started_at, stopped_at, error, instance, worker)
         SELECT $1, t.id, t.attempts, $4, $5, $6, t.instance, $7
         FROM tasks t
         WHERE t.id = $2 AND t.attempts = $3 AND t.status = 'running' AND t.instance = $8
         ON CONFLICT (id) DO NOTHING",
    )
    .bind::<BigInt, _>(completion.execution_id)
    .bind::<BigInt, _>(completion.task_id)
    .bind::<Integer, _>(completion.attempt)
    .bind::<Timestamptz, _>(completion.started_at)
    .bind::<Timestamptz, _>(completion.stopped_at)
    .bind::<Text, _>(error)
    .bind::<Integer, _>(completion.worker)
    .bind::<Text, _>(instance)
    .execute(conn)?;
    Ok(written == 1)
}

/// Moves on a task whose abandoned attempt ([`record_timed_out`]) has returned at
/// last: back to waiting after `retry` (a newer task may hold a key it held while
/// waiting), `failed` without one, `cancelled` if an operator asked; writes the
/// attempt's execution first if the watchdog could not. Notifies the engine's channel.
/// In one transaction; locks the task's row.
pub(crate) fn release_abandoned(
    conn: &mut PgConnection,
    instance: &str,
    completion: &Completion,
    retry: Option<Duration>,
) -> QueryResult<()> {
    conn.transaction(|conn| {
        record_timed_out(conn, instance, completion)?;
        diesel::sql_query(RELEASE_ABANDONED)
            .bind::<BigInt, _>(completion.task_id)
            .bind::<Integer, _>(completion.attempt)
            .bind::<Text, _>(instance)
            .bind::<Nullable<BigInt>, _>(retry.map(micros))
            .execute(conn)
            .map(drop)
    })
}

/// The statement of [`release_abandoned`].
pub(crate) const RELEASE_ABANDONED: &str = concat!(
    "WITH moved AS (
                 UPDATE tasks t
                 SET status = CASE ",
    cancel_wins!(),
    "
                                   WHEN $4::bigint IS NULL THEN 'failed' ELSE 'waiting' END,
                     run_at = CASE WHEN $4::bigint IS NULL THEN t.run_at
                                   ELSE now() + $4 * interval '1 microsecond' END,
                     ",
    lets_waiting_key_go!(),
    ",
                     updated_at = now()
                 WHERE t.id = $1 AND t.attempts = $2 AND t.status = 'running' AND t.instance = $3
                 RETURNING t.status, t.run_at
             )
             SELECT ",
    notify_waiting!("count(*)", "extract(epoch FROM min(run_at) FILTER (WHERE status = 'waiting') - now())"),
    "::text AS sent
             FROM moved HAVING count(*) > 0"
);

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;

    use super::*;
    use crate::db::claim::claim;
    use crate::db::claim::tests::{lane, PlanLine};

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
        let claimed = claim(&mut conn, Session::Own, &lane("i", &["noop"]), 300).unwrap().tasks;
        assert_eq!(claimed.len(), 300);

        let mut session = db.connect();
        Session::Own.prepare(&mut session, SETTINGS).unwrap();
        let n = claimed.len();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            session.batch_execute(&format!("BEGIN; SET LOCAL plan_cache_mode = {mode}")).unwrap();
            let plan: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN (ANALYZE, COSTS OFF) {COMPLETE}"))
                .bind::<Array<BigInt>, _>(claimed.iter().map(|t| t.execution_id).collect::<Vec<_>>())
                .bind::<Array<BigInt>, _>(claimed.iter().map(|t| t.id).collect::<Vec<_>>())
                .bind::<Array<Integer>, _>(vec![1; n])
                .bind::<Array<Integer>, _>(vec![0; n])
                .bind::<Array<Timestamptz>, _>(claimed.iter().map(|t| t.claimed_at).collect::<Vec<_>>())
                .bind::<Array<Text>, _>(vec!["stopped"; n])
                .bind::<Array<Nullable<Jsonb>>, _>(vec![Some(serde_json::Value::Null); n])
                .bind::<Array<Nullable<Text>>, _>(vec![None::<String>; n])
                .bind::<Array<Nullable<BigInt>>, _>(vec![None::<i64>; n])
                .bind::<Array<Timestamptz>, _>(claimed.iter().map(|t| t.claimed_at).collect::<Vec<_>>())
                .bind::<Bool, _>(false)
                .load(&mut session)
                .unwrap();
            session.batch_execute("ROLLBACK").unwrap();
            let plan = plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n");
            for bad in ["Seq Scan", "Nested Loop", "Rows Removed by Join Filter", "tasks_running_idx"] {
                assert!(!plan.contains(bad), "{mode}: the completion's plan has a {bad}:\n{plan}");
            }
            assert!(plan.contains("tasks_pkey"), "{mode}:\n{plan}");
        }
    }

    /// On the completer's session (nested loops off), the look for another holder goes
    /// by key, whatever the number of holders: a task taking its key back reads one
    /// entry of the index, not all of them.
    #[test]
    fn taking_a_key_back_looks_up_its_key_alone_on_the_completer_s_session() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (task_class, unique_key) SELECT 'noop', 'k' || n FROM generate_series(1, 20000) n;
             INSERT INTO tasks (task_class, unique_key, unique_scope) VALUES ('noop', 'back', 'released');
             ANALYZE tasks;",
        )
        .unwrap();
        Session::Own.prepare(&mut conn, SETTINGS).unwrap();
        conn.batch_execute(&format!("BEGIN; {}", unique::KEY_WAIT)).unwrap();
        let plan: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN (ANALYZE, COSTS OFF) {}", unique::KEEP_KEYS))
            .bind::<Array<BigInt>, _>(vec![20001i64])
            .load(&mut conn)
            .unwrap();
        conn.batch_execute("ROLLBACK").unwrap();
        let plan = plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n");
        assert!(plan.contains("Nested Loop Anti Join") && plan.contains("tasks_unique_key_idx"), "{plan}");
        assert!(!plan.contains("Seq Scan") && !plan.contains("Hash"), "{plan}");
    }
}
