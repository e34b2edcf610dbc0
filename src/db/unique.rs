//! Unique tasks in SQL: the three statements of an insert with a unique key. The
//! partial unique index `tasks_unique_key_idx` holds the keys of the tasks that hold
//! them (migration 16); these statements never lock a running task, so an insert that
//! meets a running holder, inside a caller's long transaction, holds up no completion.

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};

use crate::db::insert::TaskInsert;
use crate::db::transitions::notify_waiting;

/// The predicate of `tasks_unique_key_idx`, spelled as the migration spells it (an
/// `ON CONFLICT` target must repeat it to use the index). `holds_key!()` leaves the
/// columns unqualified, as a conflict target needs on PostgreSQL 13 (which refuses the
/// table's name there: "invalid reference to FROM-clause entry"); `holds_key!("t")`
/// qualifies them with `t.`.
macro_rules! holds_key {
    () => {
        "unique_key IS NOT NULL AND (status = 'waiting' AND unique_scope <> 'released' OR \
         status = 'running' AND unique_scope = 'running')"
    };
    ($t:literal) => {
        concat!(
            $t,
            ".unique_key IS NOT NULL AND (",
            $t,
            ".status = 'waiting' AND ",
            $t,
            ".unique_scope <> 'released' OR ",
            $t,
            ".status = 'running' AND ",
            $t,
            ".unique_scope = 'running')"
        )
    };
}

/// A task, and its key, that a statement of this module wrote or found.
#[derive(QueryableByName, Debug)]
pub(crate) struct Holder {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub unique_key: String,
    #[diesel(sql_type = Bool)]
    pub waiting: bool,
}

/// The columns of a batch of unique inserts, as arrays.
struct Columns<'a> {
    types: Vec<&'a str>,
    parameters: Vec<&'a serde_json::Value>,
    priorities: Vec<i32>,
    run_ats: Vec<Option<DateTime<Utc>>>,
    max_attempts: Vec<i32>,
    delays_us: Vec<i64>,
    queues: Vec<&'a str>,
    keys: Vec<&'a str>,
    unique_keys: Vec<&'a str>,
    scopes: Vec<&'a str>,
    timeouts: Vec<Option<i32>>,
}

impl<'a> Columns<'a> {
    fn of(tasks: &[&'a TaskInsert<'a>]) -> Self {
        Self {
            types: tasks.iter().map(|t| t.task_type).collect(),
            parameters: tasks.iter().map(|t| t.parameters).collect(),
            priorities: tasks.iter().map(|t| t.priority).collect(),
            run_ats: tasks.iter().map(|t| t.run_at).collect(),
            max_attempts: tasks.iter().map(|t| t.max_attempts).collect(),
            delays_us: tasks.iter().map(|t| t.delay_us).collect(),
            queues: tasks.iter().map(|t| t.queue).collect(),
            keys: tasks.iter().map(|t| t.key).collect(),
            unique_keys: tasks.iter().map(|t| t.unique_key.unwrap_or_default()).collect(),
            scopes: tasks.iter().map(|t| t.unique_scope).collect(),
            timeouts: tasks.iter().map(|t| t.timeout_ms).collect(),
        }
    }
}

/// Makes the waiting tasks that hold the keys the new tasks, as graphile-worker does:
/// their type, parameters, priority, queue, fair key, time limit, key scope and
/// attempts allowed (at least one more than they used), and the due time where
/// `replace_due` says so (a debounce); a checkpoint is kept only by a task of the same
/// type (another cannot read it), and its progress too. Each keeps its id and its history. Wakes the
/// instances when one became due, or arms their timers. Locks the waiting holders' rows
/// only (a claim holding one makes it wait, then finds it running and leaves it).
/// Returns the replaced tasks.
pub(crate) fn replace_waiting(
    conn: &mut PgConnection,
    tasks: &[&TaskInsert<'_>],
    replace_due: &[bool],
) -> QueryResult<Vec<Holder>> {
    let c = Columns::of(tasks);
    diesel::sql_query(REPLACE_WAITING)
        .bind::<Array<Text>, _>(c.unique_keys)
        .bind::<Array<Jsonb>, _>(c.parameters)
        .bind::<Array<Integer>, _>(c.priorities)
        .bind::<Array<Nullable<Timestamptz>>, _>(c.run_ats)
        .bind::<Array<BigInt>, _>(c.delays_us)
        .bind::<Array<Bool>, _>(replace_due)
        .bind::<Array<Text>, _>(c.types)
        .bind::<Array<Integer>, _>(c.max_attempts)
        .bind::<Array<Text>, _>(c.queues)
        .bind::<Array<Text>, _>(c.keys)
        .bind::<Array<Text>, _>(c.scopes)
        .bind::<Array<Nullable<Integer>>, _>(c.timeouts)
        .load(conn)
}

/// The statement of [`replace_waiting`].
pub(crate) const REPLACE_WAITING: &str = concat!(
    "WITH replaced AS (
             UPDATE tasks t
             SET task_class = d.c, task_parameters = d.p, priority = d.pr, queue = d.q, fair_key = d.fk,
                 unique_scope = d.s, timeout_ms = d.tm, max_attempts = greatest(d.m, t.attempts + 1),
                 checkpoint = CASE WHEN t.task_class = d.c THEN t.checkpoint END,
                 progress = CASE WHEN t.task_class = d.c THEN t.progress END,
                 progress_message = CASE WHEN t.task_class = d.c THEN t.progress_message END,
                 run_at = CASE WHEN d.due THEN COALESCE(d.r, now() + d.d * interval '1 microsecond')
                               ELSE t.run_at END,
                 updated_at = now()
             FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::bigint[], $6::bool[],
                         $7::text[], $8::int[], $9::text[], $10::text[], $11::text[], $12::int[])
                  AS d(k, p, pr, r, d, due, c, m, q, fk, s, tm)
             WHERE t.unique_key = ANY($1) AND t.unique_key = d.k AND t.status = 'waiting'
               AND t.unique_scope <> 'released'
             RETURNING t.id, t.unique_key, t.run_at
         ), notified AS (
             SELECT ",
    notify_waiting!(
        "count(*) FILTER (WHERE run_at <= now())",
        "extract(epoch FROM min(run_at) FILTER (WHERE run_at > now()) - now())"
    ),
    "
             FROM replaced HAVING count(*) > 0
         )
         SELECT id, unique_key, true AS waiting FROM replaced
         WHERE (SELECT count(*) FROM notified) >= 0"
);

/// Inserts the tasks whose key no task holds, and skips the others (`ON CONFLICT DO
/// NOTHING`: no lock on the holder). Waits for a transaction that inserted one of the
/// keys and has not ended. Takes no lock beyond the new rows; the insert trigger may
/// notify. Returns the inserted tasks.
pub(crate) fn insert_free(conn: &mut PgConnection, tasks: &[&TaskInsert<'_>]) -> QueryResult<Vec<Holder>> {
    let c = Columns::of(tasks);
    diesel::sql_query(concat!(
        "INSERT INTO tasks (task_class, task_parameters, priority, run_at, max_attempts, queue, fair_key,
                            unique_key, unique_scope, timeout_ms)
         SELECT c, p, pr, COALESCE(r, now() + d * interval '1 microsecond'), m, q, k, u, s, tm
         FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::int[], $6::bigint[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::int[])
              WITH ORDINALITY AS n(c, p, pr, r, m, d, q, k, u, s, tm, ord)
         ORDER BY ord
         ON CONFLICT (unique_key) WHERE ",
        holds_key!(),
        " DO NOTHING
         RETURNING id, unique_key, true AS waiting"
    ))
    .bind::<Array<Text>, _>(c.types)
    .bind::<Array<Jsonb>, _>(c.parameters)
    .bind::<Array<Integer>, _>(c.priorities)
    .bind::<Array<Nullable<Timestamptz>>, _>(c.run_ats)
    .bind::<Array<Integer>, _>(c.max_attempts)
    .bind::<Array<BigInt>, _>(c.delays_us)
    .bind::<Array<Text>, _>(c.queues)
    .bind::<Array<Text>, _>(c.keys)
    .bind::<Array<Text>, _>(c.unique_keys)
    .bind::<Array<Text>, _>(c.scopes)
    .bind::<Array<Nullable<Integer>>, _>(c.timeouts)
    .load(conn)
}

/// The tasks that hold `keys` now, waiting or running. Reads, locks nothing.
pub(crate) fn holders(conn: &mut PgConnection, keys: &[&str]) -> QueryResult<Vec<Holder>> {
    diesel::sql_query(concat!(
        "SELECT id, unique_key, status = 'waiting' AS waiting FROM tasks t
         WHERE t.unique_key = ANY($1) AND ",
        holds_key!("t")
    ))
    .bind::<Array<Text>, _>(keys)
    .load(conn)
}

/// The statement of [`keep_keys`].
pub(crate) const KEEP_KEYS: &str = concat!(
    "UPDATE tasks t SET unique_scope = 'waiting'
     WHERE t.id = ANY($1) AND t.status = 'waiting' AND t.unique_scope = 'released'
       AND NOT EXISTS (SELECT 1 FROM tasks o WHERE o.unique_key = t.unique_key AND o.id <> t.id AND ",
    holds_key!("o"),
    ")"
);

/// How long taking a key back may wait for a transaction that inserts the same key:
/// such a transaction gets the key, and a completion is held up no longer than this.
/// Nested loops on, for this transaction: the completer's session turns them off, and
/// the look for another holder must go by key (`tasks_unique_key_idx`), not through
/// every holder.
pub(crate) const KEY_WAIT: &str = "SET LOCAL lock_timeout = '50ms'; SET LOCAL enable_nestloop = on";

/// Gives back their unique key to the tasks of `ids` that went back to waiting after a
/// run (a retry, a snooze, an interrupt, a claim given back) and let it go
/// (`lets_waiting_key_go!`, in the statement that moved them), where no other task
/// holds it now: a task keeps its key while it waits again unless a newer task took it
/// while it ran. A separate statement, after the move has committed, so that a
/// transaction inserting the same key, which the move cannot see, makes it wait
/// [`KEY_WAIT`] at most and fail alone: the key then stays with the newer task. Locks
/// the rows it changes. Never fails: a task that could not take its key back waits
/// without it, as before.
pub(crate) fn keep_keys(conn: &mut PgConnection, ids: &[i64]) {
    let take_back = |conn: &mut PgConnection, ids: &[i64]| {
        conn.transaction(|conn| {
            conn.batch_execute(KEY_WAIT)?;
            diesel::sql_query(KEEP_KEYS).bind::<Array<BigInt>, _>(ids).execute(conn)
        })
    };
    if ids.is_empty() || take_back(conn, ids).is_ok() {
        return;
    }
    // One key taken meanwhile fails the others: each alone.
    for id in ids {
        if let Err(error) = take_back(conn, std::slice::from_ref(id)) {
            log::debug!("task {id} waits without its unique key, which another task takes: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    /// Whitespace runs made single spaces.
    fn squeezed(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn both_spellings_of_the_holders_predicate_are_the_index_predicate() {
        let migration = squeezed(include_str!("../../migrations/2026-11-30-000016_unique/up.sql"));
        assert!(migration.contains(&format!("ON tasks (unique_key) WHERE {};", holds_key!())), "{migration}");
        assert_eq!(holds_key!("t").replace("t.", ""), holds_key!());
    }
}
