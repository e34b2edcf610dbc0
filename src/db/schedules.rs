//! Schedules in `task_engine_schedules`: what `engine cron`, `Runner::schedule` and the
//! declarations write, and what each instance's cron part reads and moves on. A tick is
//! enqueued in the transaction that moves the schedule's `last_tick`, under the row's
//! lock. The sets of declarations seen, in `task_engine_declarations`, say which
//! binary's declarations a crate's schedules follow.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Jsonb, Nullable, Text, Timestamptz};

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub(crate) struct ScheduleRow {
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub cron: String,
    #[diesel(sql_type = Text)]
    pub time_zone: String,
    #[diesel(sql_type = Text)]
    pub task_class: String,
    #[diesel(sql_type = Jsonb)]
    pub task_parameters: serde_json::Value,
    #[diesel(sql_type = Text)]
    pub queue: String,
    #[diesel(sql_type = Integer)]
    pub priority: i32,
    #[diesel(sql_type = Integer)]
    pub max_attempts: i32,
    #[diesel(sql_type = Integer)]
    pub catch_up: i32,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub last_tick: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    /// The crate whose declarations wrote it; `None`: added by hand.
    #[diesel(sql_type = Nullable<Text>)]
    pub declared_in: Option<String>,
}

const COLUMNS: &str = "name, cron, time_zone, task_class, task_parameters, queue, priority, max_attempts, catch_up, \
                       last_tick, created_at, declared_in";

/// What [`upsert`] did.
#[derive(Debug, PartialEq)]
pub(crate) enum Upserted {
    Added,
    Changed,
    /// Nothing: a schedule of that name is declared in code, by this crate.
    Declared(String),
}

/// Adds a schedule by hand, or changes the one of that name added by hand (its ticks
/// already dealt with stay dealt with); leaves one declared in code as it is. Locks and
/// writes its row.
pub(crate) fn upsert(conn: &mut PgConnection, row: &ScheduleRow) -> QueryResult<Upserted> {
    let added = write(conn, row, None)?;
    Ok(match added {
        Some(true) => Upserted::Added,
        Some(false) => Upserted::Changed,
        // The row was left: it is declared (the failed ON CONFLICT locked it, so it
        // cannot have changed since).
        None => Upserted::Declared(lock(conn, &row.name)?.and_then(|r| r.declared_in).unwrap_or_default()),
    })
}

/// Deletes a schedule (its tasks stay). Locks its row. Returns whether there was one.
pub(crate) fn remove(conn: &mut PgConnection, name: &str) -> QueryResult<bool> {
    Ok(diesel::sql_query("DELETE FROM task_engine_schedules WHERE name = $1").bind::<Text, _>(name).execute(conn)? == 1)
}

/// Every schedule, by name. Reads, locks nothing.
pub(crate) fn list(conn: &mut PgConnection) -> QueryResult<Vec<ScheduleRow>> {
    diesel::sql_query(format!("SELECT {COLUMNS} FROM task_engine_schedules ORDER BY name")).load(conn)
}

/// One schedule, its row locked for the rest of the transaction (`FOR UPDATE`): the
/// cron parts of other instances wait here, then read the `last_tick` this one moved.
pub(crate) fn lock(conn: &mut PgConnection, name: &str) -> QueryResult<Option<ScheduleRow>> {
    diesel::sql_query(format!("SELECT {COLUMNS} FROM task_engine_schedules WHERE name = $1 FOR UPDATE"))
        .bind::<Text, _>(name)
        .get_result(conn)
        .optional()
}

/// Moves a schedule's `last_tick` (in the transaction of [`lock`]). Writes its row.
pub(crate) fn record_tick(conn: &mut PgConnection, name: &str, tick: DateTime<Utc>) -> QueryResult<()> {
    diesel::sql_query("UPDATE task_engine_schedules SET last_tick = $2, updated_at = now() WHERE name = $1")
        .bind::<Text, _>(name)
        .bind::<Timestamptz, _>(tick)
        .execute(conn)
        .map(drop)
}

/// Writes a schedule declared by `scope`: adds it, or changes the one of that name this
/// scope declared (keeping its `last_tick`); leaves one added by hand or declared by
/// another scope. Locks and writes its row. Returns whether it wrote.
pub(crate) fn upsert_declared(conn: &mut PgConnection, row: &ScheduleRow, scope: &str) -> QueryResult<bool> {
    Ok(write(conn, row, Some(scope))?.is_some())
}

/// Adds a schedule, or changes the one of that name from the same origin (`declared_in`:
/// a scope, or `None` for by hand), keeping its `last_tick`; leaves one of another
/// origin. Locks and writes its row. Returns whether it added it (`Some(true)`),
/// changed it, or left it (`None`).
fn write(conn: &mut PgConnection, row: &ScheduleRow, declared_in: Option<&str>) -> QueryResult<Option<bool>> {
    #[derive(QueryableByName)]
    struct Added {
        #[diesel(sql_type = Bool)]
        added: bool,
    }
    let added: Option<Added> = diesel::sql_query(
        "INSERT INTO task_engine_schedules (name, cron, time_zone, task_class, task_parameters, queue, priority,
                                            max_attempts, catch_up, declared_in)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (name) DO UPDATE
         SET cron = EXCLUDED.cron, time_zone = EXCLUDED.time_zone, task_class = EXCLUDED.task_class,
             task_parameters = EXCLUDED.task_parameters, queue = EXCLUDED.queue, priority = EXCLUDED.priority,
             max_attempts = EXCLUDED.max_attempts, catch_up = EXCLUDED.catch_up, updated_at = now()
         WHERE task_engine_schedules.declared_in IS NOT DISTINCT FROM EXCLUDED.declared_in
         RETURNING (xmax = 0) AS added",
    )
    .bind::<Text, _>(&row.name)
    .bind::<Text, _>(&row.cron)
    .bind::<Text, _>(&row.time_zone)
    .bind::<Text, _>(&row.task_class)
    .bind::<Jsonb, _>(&row.task_parameters)
    .bind::<Text, _>(&row.queue)
    .bind::<Integer, _>(row.priority)
    .bind::<Integer, _>(row.max_attempts)
    .bind::<Integer, _>(row.catch_up)
    .bind::<Nullable<Text>, _>(declared_in)
    .get_result(conn)
    .optional()?;
    Ok(added.map(|a| a.added))
}

/// The schedules `scope` declared and those named `names`, their rows locked for the
/// rest of the transaction (`FOR UPDATE`), by name.
pub(crate) fn lock_declared(conn: &mut PgConnection, scope: &str, names: &[&str]) -> QueryResult<Vec<ScheduleRow>> {
    diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM task_engine_schedules WHERE declared_in = $1 OR name = ANY($2) ORDER BY name FOR UPDATE"
    ))
    .bind::<Text, _>(scope)
    .bind::<Array<Text>, _>(names)
    .load(conn)
}

/// Deletes the schedules named `names` that `scope` declared (their tasks stay). Locks
/// and deletes their rows.
pub(crate) fn remove_declared(conn: &mut PgConnection, scope: &str, names: &[&str]) -> QueryResult<()> {
    diesel::sql_query("DELETE FROM task_engine_schedules WHERE declared_in = $1 AND name = ANY($2)")
        .bind::<Text, _>(scope)
        .bind::<Array<Text>, _>(names)
        .execute(conn)
        .map(drop)
}

/// Where a set of declarations stands among its scope's.
#[derive(Debug, Clone, Copy, PartialEq, QueryableByName)]
pub(crate) struct SetStanding {
    /// Its place in the order its scope's sets were first seen.
    #[diesel(sql_type = BigInt)]
    pub generation: i64,
    /// The highest generation of the scope's sets seen within the window (this one
    /// counted).
    #[diesel(sql_type = BigInt)]
    pub newest_live: i64,
    /// Whether the scope's schedules were last written from this set.
    #[diesel(sql_type = Bool)]
    pub applied: bool,
}

/// Renews a known set's `last_seen` and says where it stands; `None` for a set not
/// seen before. Writes the set's row only (no table lock).
pub(crate) fn renew_set(
    conn: &mut PgConnection,
    scope: &str,
    set_hash: &str,
    live: std::time::Duration,
) -> QueryResult<Option<SetStanding>> {
    // The subquery reads the snapshot before the UPDATE: the set itself is counted
    // live by its hash.
    diesel::sql_query(
        "WITH mine AS (
             UPDATE task_engine_declarations SET last_seen = now()
             WHERE scope = $1 AND set_hash = $2
             RETURNING generation, applied)
         SELECT mine.generation, mine.applied,
                (SELECT max(generation) FROM task_engine_declarations
                 WHERE scope = $1 AND (last_seen > now() - $3 * interval '1 microsecond' OR set_hash = $2)) AS newest_live
         FROM mine",
    )
    .bind::<Text, _>(scope)
    .bind::<Text, _>(set_hash)
    .bind::<BigInt, _>(super::micros(live))
    .get_result(conn)
    .optional()
}

/// Records a set (the scope's next generation if it is new, or renews its `last_seen`)
/// and says where it stands, the declarations table locked against every other
/// instance's record until the transaction ends (`SHARE ROW EXCLUSIVE`, which readers
/// pass), so that two new sets get two generations and one applies at a time.
pub(crate) fn record_set(
    conn: &mut PgConnection,
    scope: &str,
    set_hash: &str,
    live: std::time::Duration,
) -> QueryResult<SetStanding> {
    diesel::sql_query("LOCK TABLE task_engine_declarations IN SHARE ROW EXCLUSIVE MODE").execute(conn)?;
    diesel::sql_query(
        "INSERT INTO task_engine_declarations (scope, set_hash, generation)
         SELECT $1, $2, coalesce(max(generation), 0) + 1 FROM task_engine_declarations WHERE scope = $1
         ON CONFLICT (scope, set_hash) DO UPDATE SET last_seen = now()",
    )
    .bind::<Text, _>(scope)
    .bind::<Text, _>(set_hash)
    .execute(conn)?;
    diesel::sql_query(
        "SELECT d.generation, d.applied,
                (SELECT max(generation) FROM task_engine_declarations
                 WHERE scope = $1 AND last_seen > now() - $3 * interval '1 microsecond') AS newest_live
         FROM task_engine_declarations d WHERE d.scope = $1 AND d.set_hash = $2",
    )
    .bind::<Text, _>(scope)
    .bind::<Text, _>(set_hash)
    .bind::<BigInt, _>(super::micros(live))
    .get_result(conn)
}

/// Marks `set_hash` as the set its scope's schedules were written from (and no other).
/// Writes the scope's set rows whose mark changes.
pub(crate) fn mark_applied(conn: &mut PgConnection, scope: &str, set_hash: &str) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE task_engine_declarations SET applied = (set_hash = $2)
         WHERE scope = $1 AND applied <> (set_hash = $2)",
    )
    .bind::<Text, _>(scope)
    .bind::<Text, _>(set_hash)
    .execute(conn)
    .map(drop)
}

/// The server's clock, which every instance's cron part reads, so that instances whose
/// machines disagree on the time agree on the ticks.
pub(crate) fn now(conn: &mut PgConnection) -> QueryResult<DateTime<Utc>> {
    diesel::select(diesel::dsl::sql::<Timestamptz>("now()")).get_result::<DateTime<Utc>>(conn)
}
