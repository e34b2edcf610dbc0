//! Instance liveness and the rescue of lost attempts.
//!
//! Each instance has a heartbeat thread with a connection of its own (outside the
//! pool). At start it takes a session-level advisory lock on the instance's name: a
//! second live instance cannot use the name, and an instance restarted under its name
//! knows the previous holder is gone and puts that one's running tasks back at once.
//! Then, several times per lease, it renews `task_engine_instances.last_seen_at` and
//! rescues:
//!
//! - the running tasks of instances whose lease has expired (no heartbeat for a whole
//!   lease), or that have no row at all;
//! - its own "ghosts": tasks marked running on this instance that no worker here runs
//!   (a claim whose answer was lost with the connection, or a completion that could
//!   not be recorded in time).
//!
//! A rescued attempt is closed on its execution (`stopped_at`, an error saying the
//! instance was lost) and counts as an attempt: the task waits again, due at once, or
//! fails if that was its last attempt.
//!
//! An instance rescues others only once its own heartbeat has succeeded for a whole
//! lease without a break: after a database restart every instance gets a full lease to
//! renew its row before anyone judges it dead. A live instance's tasks are never taken,
//! however long they run: its heartbeat does not depend on its workers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Text};
use diesel::PgConnection;

use crate::cluster::redact_url;
use crate::runner::Shared;
use crate::Error;

/// The first key of the instance-name advisory locks ("task" in ASCII).
const LOCK_CLASS: i32 = 0x7461_736b;

/// How an instance proves it is alive.
pub(crate) struct Heartbeat {
    shared: Arc<Shared>,
    url: String,
    lease: Duration,
    conn: Option<PgConnection>,
    /// Since when the heartbeat has succeeded without a break.
    healthy_since: Option<Instant>,
}

impl Heartbeat {
    /// Connects, takes the instance's name, registers it, and recovers the tasks a
    /// previous instance of that name left running.
    pub(crate) fn start(shared: Arc<Shared>, url: &str, lease: Duration) -> Result<Self, Error> {
        let mut heartbeat = Self { shared, url: url.to_owned(), lease, conn: None, healthy_since: None };
        let mut conn = heartbeat.connect()?;
        let recovered = rescue(&mut conn, &heartbeat.shared, Scope::PreviousSelf, lease)?;
        if recovered > 0 {
            log::warn!(
                "instance {}: {recovered} task(s) left running by its previous run put back to waiting",
                heartbeat.shared.instance
            );
            heartbeat.shared.wakeup.wake(recovered);
        }
        heartbeat.conn = Some(conn);
        heartbeat.healthy_since = Some(Instant::now());
        Ok(heartbeat)
    }

    /// Opens the heartbeat connection, takes the name lock, renews the row.
    fn connect(&self) -> Result<PgConnection, Error> {
        let mut conn = PgConnection::establish(&self.url)
            .map_err(|e| Error::Config(format!("could not connect to {}: {e}", redact_url(&self.url))))?;
        #[derive(QueryableByName)]
        struct Locked {
            #[diesel(sql_type = Bool)]
            locked: bool,
        }
        let locked: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1, hashtext($2)) AS locked")
            .bind::<Integer, _>(LOCK_CLASS)
            .bind::<Text, _>(&self.shared.instance)
            .get_result(&mut conn)?;
        if !locked.locked {
            return Err(Error::Config(format!(
                "instance name `{}` is in use by a running instance: give this one another name",
                self.shared.instance
            )));
        }
        diesel::sql_query(
            "INSERT INTO task_engine_instances (name, host, pid, task_types)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE
             SET host = EXCLUDED.host, pid = EXCLUDED.pid, task_types = EXCLUDED.task_types,
                 started_at = now(), last_seen_at = now()",
        )
        .bind::<Text, _>(&self.shared.instance)
        .bind::<Text, _>(host_name())
        .bind::<Integer, _>(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind::<Array<Text>, _>(&self.shared.task_classes)
        .execute(&mut conn)?;
        Ok(conn)
    }

    /// Runs until the instance stops.
    pub(crate) fn run(mut self) {
        let interval = self.lease / 6;
        while !self.shared.stop.wait(interval) {
            if let Err(error) = self.beat() {
                if self.healthy_since.take().is_some() {
                    log::error!("instance {}: heartbeat failed: {error}", self.shared.instance);
                }
                self.conn = None;
            }
        }
        log::debug!("heartbeat stopped");
    }

    fn beat(&mut self) -> Result<(), Error> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let conn = self.connect()?;
                log::info!("instance {}: heartbeat connection back", self.shared.instance);
                self.healthy_since = Some(Instant::now());
                self.conn.insert(conn)
            }
        };
        diesel::sql_query("UPDATE task_engine_instances SET last_seen_at = now() WHERE name = $1")
            .bind::<Text, _>(&self.shared.instance)
            .execute(conn)?;
        let counters = &self.shared.counters;
        counters.heartbeats.fetch_add(1, Ordering::Relaxed);

        let ghosts = rescue(conn, &self.shared, Scope::OwnGhosts, self.lease)?;
        let steady = self.healthy_since.is_some_and(|since| since.elapsed() >= self.lease);
        let others = if steady { rescue(conn, &self.shared, Scope::Dead, self.lease)? } else { 0 };
        if steady {
            counters.rescue_passes.fetch_add(1, Ordering::Relaxed);
        }
        let rescued = ghosts + others;
        if rescued > 0 {
            counters.rescued.fetch_add(rescued as u64, Ordering::Relaxed);
            log::warn!("instance {}: {rescued} lost attempt(s) recorded; their tasks wait again", self.shared.instance);
            self.shared.wakeup.wake(rescued);
        }
        Ok(())
    }
}

/// Whose running tasks a rescue takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// A previous instance of this name (at start, under the name lock).
    PreviousSelf,
    /// Tasks marked running here that no worker here runs, claimed over a lease ago.
    OwnGhosts,
    /// Instances whose lease expired, or without a row.
    Dead,
}

/// Closes the lost attempts of the scope's running tasks and puts their tasks back to
/// waiting (or failed, after their last attempt; cancelled, if cancelled), in one
/// statement. Returns how many tasks wait again.
fn rescue(conn: &mut PgConnection, shared: &Shared, scope: Scope, lease: Duration) -> Result<usize, Error> {
    let (lost, why) = match scope {
        Scope::PreviousSelf => ("t.instance = $1", "its instance restarted"),
        Scope::OwnGhosts => (
            "t.instance = $1 AND NOT (t.id = ANY($3)) AND t.updated_at < now() - $2 * interval '1 microsecond'",
            "its outcome never reached the database",
        ),
        Scope::Dead => (
            "t.instance <> $1 AND NOT EXISTS (
                 SELECT FROM task_engine_instances i
                 WHERE i.name = t.instance AND i.last_seen_at >= now() - $2 * interval '1 microsecond')",
            "its instance stopped sending heartbeats",
        ),
    };
    let running: Vec<i64> = shared.cancels.running_ids();
    #[derive(QueryableByName)]
    struct Rescued {
        #[diesel(sql_type = BigInt)]
        waiting: i64,
    }
    let sql = format!(
        "WITH lost AS (
             SELECT t.id, t.instance, t.attempts, t.max_attempts, t.cancel_requested_at FROM tasks t
             WHERE t.status = 'running' AND {lost}
             FOR UPDATE OF t SKIP LOCKED
         ), closed AS (
             UPDATE task_executions e
             SET stopped_at = now(), updated_at = now(),
                 error = format('lost: %s (instance %s, attempt %s)', $4::text, e.instance, e.attempt)
             FROM lost
             WHERE e.task_id = ANY(ARRAY(SELECT id FROM lost)) AND e.task_id = lost.id
               AND e.attempt = lost.attempts AND e.stopped_at IS NULL
         ), moved AS (
             UPDATE tasks t
             SET status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                               WHEN t.attempts >= t.max_attempts THEN 'failed'
                               ELSE 'waiting' END,
                 run_at = now(), updated_at = now()
             WHERE t.id = ANY(ARRAY(SELECT id FROM lost))
             RETURNING t.status
         )
         SELECT count(*) FILTER (WHERE status = 'waiting') AS waiting FROM moved"
    );
    let rescued: Rescued = diesel::sql_query(sql)
        .bind::<Text, _>(&shared.instance)
        .bind::<BigInt, _>(i64::try_from(lease.as_micros()).unwrap_or(i64::MAX))
        .bind::<Array<BigInt>, _>(running)
        .bind::<Text, _>(why)
        .get_result(conn)?;
    if scope == Scope::Dead {
        // Instances long gone with nothing left running: forget them.
        diesel::sql_query(
            "DELETE FROM task_engine_instances i
             WHERE i.last_seen_at < now() - 10 * $1 * interval '1 microsecond'
               AND NOT EXISTS (SELECT FROM tasks t WHERE t.status = 'running' AND t.instance = i.name)",
        )
        .bind::<BigInt, _>(i64::try_from(lease.as_micros()).unwrap_or(i64::MAX))
        .execute(conn)?;
    }
    Ok(usize::try_from(rescued.waiting).unwrap_or(0))
}

/// Removes the instance's row after a clean stop.
pub(crate) fn deregister(shared: &Shared) {
    let removed = shared.pool.get().map_err(Error::from).and_then(|mut conn| {
        Ok(diesel::sql_query("DELETE FROM task_engine_instances WHERE name = $1")
            .bind::<Text, _>(&shared.instance)
            .execute(&mut conn)?)
    });
    if let Err(error) = removed {
        log::warn!("instance {}: could not remove its row: {error}", shared.instance);
    }
}

/// This machine's name.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
