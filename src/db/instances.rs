//! The instances' rows (`task_engine_instances`); the advisory locks on their names are
//! taken by their sessions ([`channel`](super::channel)).

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};
use diesel::PgConnection;

use crate::db::micros;

/// The first key of the instance-name advisory locks ("task" in ASCII); the second is
/// `hashtext(<channel>/<name>)`.
pub(crate) const NAME_LOCK: i32 = 0x7461_736b;

/// What an instance records of itself.
pub(crate) struct Registration<'a> {
    pub instance: &'a str,
    pub host: &'a str,
    pub pid: u32,
    pub task_types: &'a [&'a str],
    /// The queues it runs.
    pub queues: &'a [String],
    /// How long it may stay silent before others take it for dead.
    pub lease: Duration,
}

/// Inserts or renews the instance's row, as of now (a restart under the name replaces
/// the previous row). Locks that row.
pub(crate) fn register(conn: &mut PgConnection, registration: &Registration<'_>) -> QueryResult<()> {
    registering(
        "INSERT INTO task_engine_instances (name, host, pid, task_types, lease, queues)
         VALUES ($1, $2, $3, $4, $5 * interval '1 microsecond', $6)
         ON CONFLICT (name) DO UPDATE
         SET host = EXCLUDED.host, pid = EXCLUDED.pid, task_types = EXCLUDED.task_types, lease = EXCLUDED.lease,
             queues = EXCLUDED.queues, started_at = now(), last_seen_at = now(), connections = NULL",
        registration,
    )
    .execute(conn)
    .map(drop)
}

/// `statement` with the registration bound as its first six parameters.
fn registering<'a>(
    statement: &str,
    registration: &'a Registration<'a>,
) -> diesel::query_builder::BoxedSqlQuery<'a, diesel::pg::Pg, diesel::query_builder::SqlQuery> {
    diesel::sql_query(statement)
        .into_boxed()
        .bind::<Text, _>(registration.instance)
        .bind::<Text, _>(registration.host)
        .bind::<Integer, _>(i32::try_from(registration.pid).unwrap_or(i32::MAX))
        .bind::<Array<Text>, _>(registration.task_types)
        .bind::<BigInt, _>(micros(registration.lease))
        .bind::<Array<Text>, _>(registration.queues)
}

/// Registers a starting instance, as the one of its name, if the previous one is gone:
/// inserts its row, or takes over the row of its name if that row's instance is
/// silent past its lease, or if `listening` (this instance holds the name lock now, so
/// the previous holder's session is gone) and that row's instance had a listener too
/// (a row of an instance without one, which held no lock, proves nothing until it goes
/// silent). Without a listener, it never inserts while another session holds the name
/// (a live instance whose row was deleted). One statement, so two instances starting at
/// once cannot both see the name free. Locks that row. Returns whether it registered.
pub(crate) fn register_if_free(
    conn: &mut PgConnection,
    registration: &Registration<'_>,
    listening: bool,
    connections: &str,
) -> QueryResult<bool> {
    let taken = registering(
        "INSERT INTO task_engine_instances AS i (name, host, pid, task_types, lease, queues, connections)
         SELECT $1, $2, $3, $4, $5 * interval '1 microsecond', $6, $7::jsonb
         WHERE $8 OR NOT EXISTS (
             SELECT FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = $9::int4::oid AND l.objid = hashtext(task_engine_channel() || '/' || $1)::oid)
         ON CONFLICT (name) DO UPDATE
         SET host = EXCLUDED.host, pid = EXCLUDED.pid, task_types = EXCLUDED.task_types, lease = EXCLUDED.lease,
             queues = EXCLUDED.queues, started_at = now(), last_seen_at = now(), connections = EXCLUDED.connections
         WHERE i.last_seen_at < now() - coalesce(i.lease, EXCLUDED.lease)
            OR ($8 AND coalesce((i.connections->>'listener')::boolean, true))",
        registration,
    )
    .bind::<Text, _>(connections)
    .bind::<diesel::sql_types::Bool, _>(listening)
    .bind::<Integer, _>(NAME_LOCK)
    .execute(conn)?;
    Ok(taken == 1)
}

/// What a heartbeat sees besides renewing the row.
#[derive(Debug, PartialEq, QueryableByName)]
pub(crate) struct Beat {
    /// The tasks running on this instance that an operator asked to cancel: their
    /// notification may have been lost (the listener reconnecting, or none at all).
    #[diesel(sql_type = Array<BigInt>)]
    pub cancels: Vec<i64>,
    /// The settings of the instance's queues (pause, limits), spelled as one text,
    /// `None` when none has a row: a change since the last heartbeat means a resume or
    /// a limit whose notification may have been lost.
    #[diesel(sql_type = Nullable<Text>)]
    pub queues: Option<String>,
}

/// Renews the instance's heartbeat (`last_seen_at`) and records the connections it
/// holds (`connections`, JSON), locking its row, and in the same round trip reads (locking nothing) its running tasks with a cancel requested (the
/// partial index of running tasks, as the rescue's look for its own ghosts: no more
/// rows than it runs) and the settings rows of `queues` (by primary key). Returns
/// `None` if the row is gone.
pub(crate) fn beat(
    conn: &mut PgConnection,
    instance: &str,
    queues: &[String],
    connections: &str,
) -> QueryResult<Option<Beat>> {
    diesel::sql_query(BEAT)
        .bind::<Text, _>(instance)
        .bind::<Array<Text>, _>(queues)
        .bind::<Text, _>(connections)
        .get_result(conn)
        .optional()
}

/// The statement of [`beat`].
const BEAT: &str = "UPDATE task_engine_instances SET last_seen_at = now(), connections = $3::jsonb WHERE name = $1
     RETURNING
         ARRAY(SELECT t.id FROM tasks t
               WHERE t.status = 'running' AND t.instance = $1 AND t.cancel_requested_at IS NOT NULL
               ORDER BY t.id) AS cancels,
         (SELECT string_agg(format('%s/%s/%s/%s/%s/%s', q.name, q.paused, q.concurrency, q.key_concurrency,
                                   q.rate_limit, q.rate_period), ',' ORDER BY q.name)
          FROM task_engine_queues q WHERE q.name = ANY($2)) AS queues";

/// Deletes the instance's row, after a clean stop.
pub(crate) fn deregister(conn: &mut PgConnection, instance: &str) -> QueryResult<()> {
    diesel::sql_query("DELETE FROM task_engine_instances WHERE name = $1")
        .bind::<Text, _>(instance)
        .execute(conn)
        .map(drop)
}

/// Deletes the rows of instances silent for ten of their leases (or of `lease`, for
/// rows that record none) that have nothing left running: their tasks have been
/// rescued, nobody needs them any more.
pub(crate) fn forget_long_dead(conn: &mut PgConnection, lease: Duration) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM task_engine_instances i
         WHERE i.last_seen_at < now() - 10 * coalesce(i.lease, $1 * interval '1 microsecond')
           AND NOT EXISTS (SELECT FROM tasks t WHERE t.status = 'running' AND t.instance = i.name)",
    )
    .bind::<BigInt, _>(micros(lease))
    .execute(conn)
}

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;

    use super::*;
    use crate::db::claim::tests::PlanLine;

    /// The heartbeat's look reads the running tasks by their partial index and the
    /// queues by key, whatever the plan mode: a table of many ended tasks costs it
    /// nothing, and it cannot slow the renewal down.
    #[test]
    fn a_heartbeat_finds_its_cancels_and_its_queues_settings_by_index() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO task_engine_instances (name, host, pid) VALUES ('i', 'h', 1);
             INSERT INTO tasks (task_class, status) SELECT 'noop', 'stopped' FROM generate_series(1, 20000);
             INSERT INTO tasks (id, task_class, status, instance, cancel_requested_at)
             VALUES (-1, 'noop', 'running', 'i', now()), (-2, 'noop', 'running', 'i', NULL),
                    (-3, 'noop', 'running', 'j', now()), (-4, 'noop', 'stopped', 'i', now());
             INSERT INTO task_engine_queues (name, paused, concurrency) VALUES ('a', true, 3), ('b', false, NULL);
             ANALYZE tasks;",
        )
        .unwrap();
        let queues = ["a".to_owned(), "c".to_owned()];
        let seen = beat(&mut conn, "i", &queues, "{}").unwrap().unwrap();
        assert_eq!(seen, Beat { cancels: vec![-1], queues: Some("a/t/3///".into()) });
        assert_eq!(beat(&mut conn, "gone", &queues, "{}").unwrap(), None);
        for mode in ["force_custom_plan", "force_generic_plan"] {
            conn.batch_execute(&format!("BEGIN; SET LOCAL plan_cache_mode = {mode}")).unwrap();
            let plan: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN (ANALYZE, COSTS OFF) {BEAT}"))
                .bind::<Text, _>("i")
                .bind::<Array<Text>, _>(&queues[..])
                .bind::<Text, _>("{}")
                .load(&mut conn)
                .unwrap();
            conn.batch_execute("ROLLBACK").unwrap();
            let plan = plan.into_iter().map(|p| p.line).collect::<Vec<_>>().join("\n");
            assert!(!plan.contains("Seq Scan on tasks"), "{mode}: the heartbeat reads every task:\n{plan}");
            assert!(plan.contains("tasks_running_idx"), "{mode}:\n{plan}");
        }
    }
}
