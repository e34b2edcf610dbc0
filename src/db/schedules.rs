//! Schedules in `task_engine_schedules`: what `engine cron` and `Runner::schedule` write,
//! and what each instance's cron part reads and moves on. A tick is enqueued in the
//! transaction that moves the schedule's `last_tick`, under the row's lock.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Integer, Jsonb, Nullable, Text, Timestamptz};

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
}

const COLUMNS: &str =
    "name, cron, time_zone, task_class, task_parameters, queue, priority, max_attempts, catch_up, last_tick, created_at";

/// Adds a schedule, or changes the one of that name (its ticks already dealt with stay
/// dealt with). Locks and writes its row. Returns whether it was new.
pub(crate) fn upsert(conn: &mut PgConnection, row: &ScheduleRow) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Added {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        added: bool,
    }
    let added: Added = diesel::sql_query(
        "INSERT INTO task_engine_schedules (name, cron, time_zone, task_class, task_parameters, queue, priority,
                                            max_attempts, catch_up)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (name) DO UPDATE
         SET cron = EXCLUDED.cron, time_zone = EXCLUDED.time_zone, task_class = EXCLUDED.task_class,
             task_parameters = EXCLUDED.task_parameters, queue = EXCLUDED.queue, priority = EXCLUDED.priority,
             max_attempts = EXCLUDED.max_attempts, catch_up = EXCLUDED.catch_up, updated_at = now()
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
    .get_result(conn)?;
    Ok(added.added)
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

/// The server's clock, which every instance's cron part reads, so that instances whose
/// machines disagree on the time agree on the ticks.
pub(crate) fn now(conn: &mut PgConnection) -> QueryResult<DateTime<Utc>> {
    diesel::select(diesel::dsl::sql::<Timestamptz>("now()")).get_result::<DateTime<Utc>>(conn)
}
