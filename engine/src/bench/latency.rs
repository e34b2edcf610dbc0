//! `engine bench latency`: the pickup of an idle engine, from the enqueue's commit to
//! the attempt's start.

use std::time::{Duration, SystemTime};

use anyhow::bail;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable};
use task_engine::{EngineStats, Registry, RunningEngine};

use super::meter::Meter;
use super::{
    drop_schema, exactly_once, fresh_schema, percentile, round3, start, total_claims, wait_idle, MISSED_AFTER,
};
use crate::database::Database;

pub(super) fn run(
    db: &Database,
    registry: &Registry,
    tasks: usize,
    instances: usize,
    workers: usize,
    gap: Duration,
) -> anyhow::Result<()> {
    if tasks == 0 || instances == 0 || workers == 0 {
        bail!(crate::UsageError("--tasks, --instances and --workers must be at least 1".into()));
    }
    let url = fresh_schema(db)?;
    let engines: Vec<RunningEngine> =
        (0..instances).map(|i| start(&url, registry, format!("bench-{i}"), workers)).collect::<anyhow::Result<_>>()?;
    if !wait_idle(&engines, workers, 0, Duration::from_secs(30)) {
        bail!("the engine did not become idle");
    }
    let before: Vec<EngineStats> = engines.iter().map(RunningEngine::stats).collect();
    let mut conn = PgConnection::establish(&url)?;
    // The commit's time: the server's commit timestamp when it keeps them, else
    // when the insert returned (a little late: the reply comes after the commit).
    let server_commit_times =
        diesel::sql_query("SELECT 1 AS one WHERE current_setting('track_commit_timestamp') = 'on'")
            .execute(&mut conn)?
            == 1;
    let offset = clock_offset(&mut conn)?;
    let meter = Meter::new(&mut conn)?;
    let cost_before = meter.read(&mut conn)?;
    let mut missed = 0;
    // (task id, transaction id, when the insert returned on the server's clock)
    let mut inserted = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let claims = total_claims(&engines);
        // One statement, as a client would send it; `xmin` names its transaction
        // (32 bits, as `pg_xact_commit_timestamp` takes) without another round trip.
        let inserted_row: InsertedRow = diesel::sql_query(
            "INSERT INTO tasks (task_class, task_parameters) VALUES ('bench_noop', '{}')
             RETURNING id, xmin::text::bigint AS xid",
        )
        .get_result(&mut conn)?;
        let (id, xid) = (inserted_row.id, inserted_row.xid);
        inserted.push((id, xid, unix_seconds(SystemTime::now()) + offset));
        // Until the task has been claimed and every worker sleeps again: the next
        // task finds the engine idle.
        if !wait_idle(&engines, workers, claims, MISSED_AFTER) {
            missed += 1;
        }
        std::thread::sleep(gap);
    }
    let wasted: u64 = engines.iter().zip(&before).map(|(e, b)| e.stats().wasted_claims - b.wasted_claims).sum();
    let cost = Meter::cost(cost_before, meter.read(&mut conn)?, tasks as u64);
    for engine in engines {
        engine.shutdown();
    }

    #[derive(QueryableByName)]
    struct Pickup {
        #[diesel(sql_type = BigInt)]
        id: i64,
        #[diesel(sql_type = Double)]
        started: f64,
        #[diesel(sql_type = Double)]
        created: f64,
        #[diesel(sql_type = Nullable<Double>)]
        committed: Option<f64>,
    }
    let (ids, xids): (Vec<i64>, Vec<i64>) = inserted.iter().map(|&(id, xid, _)| (id, xid)).unzip();
    let started: std::collections::HashMap<i64, Pickup> = diesel::sql_query(
        "SELECT t.id, extract(epoch FROM e.started_at)::float8 AS started,
                extract(epoch FROM t.created_at)::float8 AS created,
                CASE WHEN $3 THEN extract(epoch FROM pg_xact_commit_timestamp(i.xid::text::xid))::float8 END
                    AS committed
         FROM unnest($1::bigint[], $2::bigint[]) AS i(id, xid)
         JOIN tasks t ON t.id = i.id JOIN task_executions e ON e.task_id = t.id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(xids)
    .bind::<Bool, _>(server_commit_times)
    .load::<Pickup>(&mut conn)?
    .into_iter()
    .map(|p| (p.id, p))
    .collect();
    let mut pickups = Vec::with_capacity(tasks);
    let mut from_insert = Vec::with_capacity(tasks);
    for (id, _, returned_at) in &inserted {
        if let Some(p) = started.get(id) {
            pickups.push((p.started - p.committed.unwrap_or(*returned_at)) * 1000.0);
            from_insert.push((p.started - p.created) * 1000.0);
        }
    }
    pickups.sort_by(f64::total_cmp);
    from_insert.sort_by(f64::total_cmp);
    let check = exactly_once(&mut conn)?;
    drop_schema(db)?;

    let p = |q: f64| percentile(&pickups, q);
    let i = |q: f64| percentile(&from_insert, q);
    let commit_clock = if server_commit_times { "server's commit timestamps" } else { "when the insert returned" };
    println!(
        "latency: {instances} instance(s) x {workers} workers, {tasks} tasks one at a time: \
         pickup from commit ({commit_clock}) p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         (from the insert's start p50 {:.2} ms, p99 {:.2} ms); wasted claims per task {:.2}; missed {missed}; \
         {cost} (the gaps' idle work included); {check}",
        p(0.50),
        p(0.95),
        p(0.99),
        p(1.0),
        i(0.50),
        i(0.99),
        wasted as f64 / tasks as f64,
    );
    let mut json = serde_json::json!({
            "bench": "latency",
            "instances": instances,
            "workers": workers,
            "tasks": tasks,
            "gap_ms": gap.as_secs_f64() * 1000.0,
            "p50_ms": round3(p(0.50)),
            "p95_ms": round3(p(0.95)),
            "p99_ms": round3(p(0.99)),
            "max_ms": round3(p(1.0)),
            "from_insert_p50_ms": round3(i(0.50)),
            "from_insert_p99_ms": round3(i(0.99)),
            "clock_offset_ms": round3(offset * 1000.0),
            "commit_times": if server_commit_times { "server" } else { "client" },
            "wasted_claims_per_task": round3(wasted as f64 / tasks as f64),
            "missed": missed,
            "ran_exactly_once": check.ok(),
    });
    json.as_object_mut().expect("an object").extend(cost.json("engine").as_object().expect("an object").clone());
    println!("{json}");
    if !check.ok() || missed > 0 {
        bail!("the benchmark's tasks did not all run exactly once ({check}, {missed} missed)");
    }
    Ok(())
}

#[derive(QueryableByName)]
struct InsertedRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    xid: i64,
}

/// Seconds since the Unix epoch.
fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The server's clock minus ours, in seconds (zero when both are the machine's), from
/// the quickest of a few round trips: the server read its clock about halfway through.
fn clock_offset(conn: &mut PgConnection) -> anyhow::Result<f64> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = Double)]
        now: f64,
    }
    let mut best: Option<(Duration, f64)> = None;
    for _ in 0..20 {
        let sent = SystemTime::now();
        let server: Now =
            diesel::sql_query("SELECT extract(epoch FROM clock_timestamp())::float8 AS now").get_result(conn)?;
        let back = SystemTime::now();
        let trip = back.duration_since(sent).unwrap_or_default();
        let offset = server.now - (unix_seconds(sent) + unix_seconds(back)) / 2.0;
        if best.map_or(true, |(t, _)| trip < t) {
            best = Some((trip, offset));
        }
    }
    Ok(best.map_or(0.0, |(_, offset)| offset))
}
