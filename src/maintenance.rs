//! Keeping the claim fast: every claimed task leaves a dead entry at the head of
//! `tasks_waiting_idx` (a claim's update is never HOT, `status` being in the index's
//! predicate), and each claim walks past those entries until a vacuum removes them:
//! measured here, a 100-task claim read 5 buffers on a fresh queue and 900 after
//! 180,000 claims. Autovacuum comes too rarely for a queue (at most once a minute per
//! table), so each instance, once it has claimed `VACUUM_EVERY` tasks since the last
//! time, or `VACUUM_AFTER` tasks and `VACUUM_PERIOD` has passed (a slow stream of
//! claims piles up dead entries too), runs `VACUUM tasks` itself on a connection of
//! its own, unless another instance is doing it (an advisory lock). A plain VACUUM
//! does not block claims, inserts or completions.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Bool;

use crate::runner::Shared;

/// Tasks claimed by this instance between two vacuums.
const VACUUM_EVERY: u64 = 20_000;
/// Tasks claimed since the last vacuum that call for one once `VACUUM_PERIOD` has passed.
const VACUUM_AFTER: u64 = 1_000;
const VACUUM_PERIOD: Duration = Duration::from_secs(5);
/// How often the thread looks.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// The advisory lock key of the vacuum ("vacu" in ASCII).
const VACUUM_LOCK: i64 = 0x7661_6375;

pub(crate) fn run(shared: Arc<Shared>) {
    let mut last = 0u64;
    let mut last_at = Instant::now();
    let mut conn: Option<PgConnection> = None;
    let mut disabled = false;
    while !shared.stop.wait(LOOK_EVERY) {
        let claimed = shared.counters.claimed_tasks.load(Ordering::Relaxed);
        let due =
            claimed - last >= VACUUM_EVERY || (claimed - last >= VACUUM_AFTER && last_at.elapsed() >= VACUUM_PERIOD);
        if disabled || !due {
            continue;
        }
        last = claimed;
        last_at = Instant::now();
        if conn.is_none() {
            conn = PgConnection::establish(&shared.database_url).ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let started = Instant::now();
        match vacuum(c) {
            Ok(true) => {
                shared.counters.vacuums.fetch_add(1, Ordering::Relaxed);
                log::debug!("VACUUM tasks took {:?}", started.elapsed());
            }
            Ok(false) => {} // another instance is at it
            Err(error) => {
                let message = error.to_string();
                if message.contains("permission") || message.contains("owner") {
                    log::warn!("cannot VACUUM tasks ({message}): leaving it to autovacuum");
                    disabled = true;
                } else {
                    log::warn!("VACUUM tasks failed: {message}");
                }
                conn = None;
            }
        }
    }
}

fn vacuum(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let locked: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<diesel::sql_types::BigInt, _>(VACUUM_LOCK)
        .get_result(conn)?;
    if !locked.locked {
        return Ok(false);
    }
    let vacuumed = conn.batch_execute("VACUUM tasks");
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<diesel::sql_types::BigInt, _>(VACUUM_LOCK)
        .execute(conn)?;
    vacuumed.map(|_| true)
}
