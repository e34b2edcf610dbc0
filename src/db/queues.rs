//! A queue's settings in `task_engine_queues`: pause, limits. Each statement writes the
//! queue's row (creating it if need be, or deleting it), which every claim of the queue
//! reads; a claim of a queue with limits holds that row's lock while it runs, so a
//! change waits for the claim in progress and applies from the next one.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};

use crate::db::micros;

/// Pauses (`true`) or resumes a queue. Locks and writes the queue's row.
pub(crate) fn set_paused(conn: &mut PgConnection, queue: &str, paused: bool) -> QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO task_engine_queues (name, paused) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now()",
    )
    .bind::<Text, _>(queue)
    .bind::<Bool, _>(paused)
    .execute(conn)
    .map(drop)
}

/// What a limit sets: the column, and its value (`None`: no limit).
pub(crate) enum Limit {
    /// Tasks of the queue running at once, across instances.
    Concurrency(Option<u32>),
    /// Tasks of one key running at once.
    PerKey(Option<u32>),
    /// Claims per window of the period.
    Rate(Option<(u32, Duration)>),
}

/// Sets one of a queue's limits, leaving the others. Locks and writes the queue's row;
/// a new rate limit starts a new window.
pub(crate) fn set_limit(conn: &mut PgConnection, queue: &str, limit: &Limit) -> QueryResult<()> {
    let int = |n: Option<u32>| n.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    match limit {
        Limit::Concurrency(n) => diesel::sql_query(
            "INSERT INTO task_engine_queues (name, concurrency) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET concurrency = EXCLUDED.concurrency, updated_at = now()",
        )
        .bind::<Text, _>(queue)
        .bind::<Nullable<Integer>, _>(int(*n))
        .execute(conn),
        Limit::PerKey(n) => diesel::sql_query(
            "INSERT INTO task_engine_queues (name, key_concurrency) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET key_concurrency = EXCLUDED.key_concurrency, updated_at = now()",
        )
        .bind::<Text, _>(queue)
        .bind::<Nullable<Integer>, _>(int(*n))
        .execute(conn),
        Limit::Rate(rate) => diesel::sql_query(
            "INSERT INTO task_engine_queues (name, rate_limit, rate_period)
             VALUES ($1, $2, $3 * interval '1 microsecond')
             ON CONFLICT (name) DO UPDATE
             SET rate_limit = EXCLUDED.rate_limit, rate_period = EXCLUDED.rate_period,
                 window_start = NULL, window_count = 0, updated_at = now()",
        )
        .bind::<Text, _>(queue)
        .bind::<Nullable<Integer>, _>(int(rate.map(|(n, _)| n)))
        .bind::<Nullable<BigInt>, _>(rate.map(|(_, period)| micros(period)))
        .execute(conn),
    }
    .map(drop)
}

/// Deletes the queue's row, and with it every setting (pause, limits, the rate
/// window); its tasks are not touched. Locks the row (waiting for a claim in progress).
/// Returns how many rows it deleted: 0 or 1.
pub(crate) fn delete(conn: &mut PgConnection, queue: &str) -> QueryResult<usize> {
    diesel::sql_query("DELETE FROM task_engine_queues WHERE name = $1").bind::<Text, _>(queue).execute(conn)
}
