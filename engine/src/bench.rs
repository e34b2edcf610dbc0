//! `engine bench`: reproducible measurements of the engine, on the embedded default
//! or on `DATABASE_URL`. Each run works in a schema of its own (`task_engine_bench`,
//! created, migrated and dropped), prints a human summary and one JSON line, and checks
//! that every task ran exactly once.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable};
use task_engine::{EngineStats, NewTask, Registry, Runner, RunningEngine};

use crate::database::Database;
use crate::duration;

/// The schema a benchmark works in.
const SCHEMA: &str = "task_engine_bench";
/// How long a benchmark waits for a task before it counts it as missed.
const MISSED_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Pickup latency of an idle engine: tasks inserted one at a time by plain SQL, with gaps; time
    /// from the enqueue's commit (the server's commit timestamp when it keeps them,
    /// else when the insert returned) to the attempt's start; also from the insert's
    /// start (`created_at`), which adds the insert and its commit.
    Latency {
        /// Tasks to enqueue, one at a time.
        #[arg(long, default_value_t = 200)]
        tasks: usize,
        /// Instances to run at once; repeat the option for several runs (default: 1 then 3).
        #[arg(long = "instances")]
        instances: Vec<usize>,
        /// Workers per instance.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Pause between a task's start and the next enqueue.
        #[arg(long, value_parser = duration::parse, default_value = "10ms")]
        gap: Duration,
    },
    /// Drain: no-op tasks enqueued in bulk, then one instance runs them all; every
    /// attempt recorded. Runs the batched engine, then the same engine with one task
    /// per round trip, for the ratio.
    Drain {
        /// Tasks to drain.
        #[arg(long, default_value_t = 20_000)]
        tasks: u32,
        /// Workers of the instance.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Runs of each mode (the figure is their median).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Skip the one-task-per-round-trip runs.
        #[arg(long)]
        batched_only: bool,
        /// Tasks claimed beyond the idle workers (default: the engine's).
        #[arg(long)]
        buffer: Option<usize>,
    },
    /// Sustained: a million tasks queued, then drained by one instance; compares the
    /// rate of the last tenth with the first and samples the claim's buffers as the
    /// queue drains.
    Sustained {
        /// Tasks queued.
        #[arg(long, default_value_t = 1_000_000)]
        tasks: u32,
        /// Workers of the instance.
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// Enqueue rates: bulk (one statement, one notification), then 8 clients
    /// inserting single tasks by plain SQL without the notifying trigger, with an idle
    /// engine, and with a busy one.
    Enqueue {
        /// Tasks in the bulk insert.
        #[arg(long, default_value_t = 200_000)]
        bulk: u32,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// How long each concurrent phase lasts.
        #[arg(long, value_parser = duration::parse, default_value = "3s")]
        duration: Duration,
    },
}

pub fn run(bench: Bench, url: Option<String>, data_dir: &std::path::Path, registry: Registry) -> anyhow::Result<()> {
    let db = Database::open(url, data_dir)?;
    let result = match bench {
        Bench::Latency { tasks, instances, workers, gap } => {
            let instances = if instances.is_empty() { vec![1, 3] } else { instances };
            instances.into_iter().try_for_each(|n| latency(&db, &registry, tasks, n, workers, gap))
        }
        Bench::Enqueue { bulk, clients, duration } => enqueue(&db, &registry, bulk, clients, duration),
        Bench::Sustained { tasks, workers } => sustained(&db, &registry, tasks, workers),
        Bench::Drain { tasks, workers, runs, batched_only, buffer } => {
            drain(&db, &registry, Drain { tasks, workers, runs, batched_only, buffer })
        }
    };
    db.stop_if_started_here()?;
    result
}

/// The benchmark's schema, fresh and migrated, and a URL whose connections use it.
fn fresh_schema(db: &Database) -> anyhow::Result<String> {
    let mut conn = db.connect_migrated()?;
    conn.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}"))?;
    let separator = if db.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options=-csearch_path%3D{SCHEMA}", db.url());
    let mut conn = PgConnection::establish(&url).context("connect to the benchmark schema")?;
    task_engine::run_migrations(&mut conn)?;
    Ok(url)
}

fn drop_schema(db: &Database) -> anyhow::Result<()> {
    db.connect()?.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))?;
    Ok(())
}

fn start(url: &str, registry: &Registry, name: String, workers: usize) -> anyhow::Result<RunningEngine> {
    Ok(Runner::new(url, registry.clone())
        .instance(name)
        .workers(workers)
        // The fallback poll must not explain a start.
        .poll_interval(Duration::from_secs(3600))
        .start()?)
}

fn total_claims(engines: &[RunningEngine]) -> u64 {
    engines.iter().map(|e| e.stats().claims).sum()
}

/// Waits until the instances have made more than `claims` claims in all and every one
/// of them sleeps and listens; false after `patience`.
fn wait_idle(engines: &[RunningEngine], workers: usize, claims: u64, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        let idle = engines.iter().all(|e| {
            let s = e.stats();
            s.listening && s.sleeping_workers == workers
        });
        if idle && total_claims(engines) > claims {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn latency(
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
    let mut missed = 0;
    // (task id, transaction id, when the insert returned on the server's clock)
    let mut inserted = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let claims = total_claims(&engines);
        // One statement, as a client would send it; `xmin` names its transaction
        // (32 bits, as `pg_xact_commit_timestamp` takes) without another round trip.
        let inserted_row: InsertedRow = diesel::sql_query(
            "INSERT INTO tasks (task_class, task_parameters) VALUES ('noop', '{}')
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
         (from the insert's start p50 {:.2} ms, p99 {:.2} ms); wasted claims per task {:.2}; missed {missed}; {check}",
        p(0.50),
        p(0.95),
        p(0.99),
        p(1.0),
        i(0.50),
        i(0.99),
        wasted as f64 / tasks as f64,
    );
    println!(
        "{}",
        serde_json::json!({
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
        })
    );
    if !check.ok() || missed > 0 {
        bail!("the benchmark's tasks did not all run exactly once ({check}, {missed} missed)");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Batched,
    SingleRoundTrip,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Batched => "batched",
            Mode::SingleRoundTrip => "one task per round trip",
        }
    }
}

struct Drain {
    tasks: u32,
    workers: usize,
    runs: usize,
    batched_only: bool,
    buffer: Option<usize>,
}

fn drain(db: &Database, registry: &Registry, options: Drain) -> anyhow::Result<()> {
    let Drain { tasks, workers, runs, batched_only, buffer } = options;
    if tasks == 0 || workers == 0 || runs == 0 {
        bail!(crate::UsageError("--tasks, --workers and --runs must be at least 1".into()));
    }
    let modes: &[Mode] = if batched_only { &[Mode::Batched] } else { &[Mode::Batched, Mode::SingleRoundTrip] };
    let mut medians = Vec::new();
    for &mode in modes {
        let mut rates = Vec::new();
        for run in 1..=runs {
            rates.push(drain_once(db, registry, tasks, workers, mode, run, buffer)?);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!("drain, {}: median {median:.0} tasks/s over {runs} run(s)", mode.name());
        medians.push(median);
    }
    if let [batched, single] = medians[..] {
        println!("drain: batched / one task per round trip = {:.1}x", batched / single);
    }
    Ok(())
}

fn drain_once(
    db: &Database,
    registry: &Registry,
    tasks: u32,
    workers: usize,
    mode: Mode,
    run: usize,
    buffer: Option<usize>,
) -> anyhow::Result<f64> {
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    let enqueue_started = Instant::now();
    NewTask::new(&tasks::Noop {})?.insert_copies(&mut conn, tasks)?;
    let enqueue_secs = enqueue_started.elapsed().as_secs_f64();
    conn.batch_execute("VACUUM ANALYZE tasks")?;

    let cpu_before = (process_cpu(std::process::id()), db.server_pid().map(server_cpu));
    let started = Instant::now();
    let mut runner = Runner::new(&url, registry.clone())
        .instance(format!("drain-{run}"))
        .workers(workers)
        .poll_interval(Duration::from_secs(3600));
    if let Some(buffer) = buffer {
        runner = runner.claim_buffer(buffer);
    }
    if mode == Mode::SingleRoundTrip {
        runner = runner.max_claim(1).claim_buffer(0).max_completion_batch(1).flush_delay(Duration::ZERO);
    }
    let engine = runner.start()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while engine.stats().completions < u64::from(tasks) {
        if Instant::now() > deadline {
            bail!("the drain did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    engine.shutdown();
    let engine_cpu = process_cpu(std::process::id()) - cpu_before.0;
    let server_cpu = match (cpu_before.1, db.server_pid()) {
        (Some(before), Some(pid)) => Some(server_cpu(pid) - before),
        _ => None,
    };
    let check = exactly_once(&mut conn)?;
    drop_schema(db)?;

    let rate = f64::from(tasks) / secs;
    let per_thousand = |cpu: f64| round3(cpu / f64::from(tasks) * 1000.0);
    println!(
        "drain ({}), run {run}: {tasks} tasks, {workers} workers: {rate:.0} tasks/s ({secs:.3} s); {} claims, \
         {} completion statements; engine CPU {:.3} s/1000 tasks{}; bulk enqueue {:.0} tasks/s; {check}",
        mode.name(),
        stats.claims,
        stats.completion_batches,
        engine_cpu / f64::from(tasks) * 1000.0,
        server_cpu
            .map(|c| format!(", PostgreSQL CPU {:.3} s/1000 tasks", c / f64::from(tasks) * 1000.0))
            .unwrap_or_default(),
        f64::from(tasks) / enqueue_secs,
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "drain",
            "mode": mode.name(),
            "run": run,
            "tasks": tasks,
            "workers": workers,
            "seconds": round3(secs),
            "tasks_per_s": rate.round(),
            "claims": stats.claims,
            "wasted_claims_per_task": round3(stats.wasted_claims as f64 / f64::from(tasks)),
            "completion_statements": stats.completion_batches,
            "engine_cpu_s_per_1000": per_thousand(engine_cpu),
            "postgres_cpu_s_per_1000": server_cpu.map(per_thousand),
            "bulk_enqueue_tasks_per_s": (f64::from(tasks) / enqueue_secs).round(),
            "ran_exactly_once": check.ok(),
        })
    );
    if !check.ok() {
        bail!("the drain's tasks did not all run exactly once ({check})");
    }
    Ok(rate)
}

/// CPU seconds (user + system) a process has used, with its waited-for children.
fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<f64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    // utime, stime, cutime, cstime are fields 14-17, i.e. 11-14 after the state.
    let ticks: f64 = fields.get(11..15).map(|f| f.iter().sum()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// CPU seconds of the PostgreSQL server: the postmaster (with the backends it has
/// reaped) and its live children.
fn server_cpu(postmaster: u32) -> f64 {
    let mut total = process_cpu(postmaster);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let parent = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(postmaster) {
            let fields: Vec<f64> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect())
                .unwrap_or_default();
            total += fields.get(11..13).map(|f| f.iter().sum::<f64>()).unwrap_or(0.0) / 100.0;
        }
    }
    total
}

fn enqueue(db: &Database, registry: &Registry, bulk: u32, clients: usize, duration: Duration) -> anyhow::Result<()> {
    if bulk == 0 || clients == 0 || duration.is_zero() {
        bail!(crate::UsageError("--bulk and --clients must be at least 1, --duration more than 0".into()));
    }
    // Bulk: one statement whatever the number, one notification.
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    let started = Instant::now();
    NewTask::new(&tasks::Noop {})?.insert_copies(&mut conn, bulk)?;
    let copies = f64::from(bulk) / started.elapsed().as_secs_f64();
    let batch: Vec<NewTask> = (0..bulk).map(|_| NewTask::new(&tasks::Noop {})).collect::<Result<_, _>>()?;
    let started = Instant::now();
    task_engine::enqueue_many(&mut conn, &batch)?;
    let many = f64::from(bulk) / started.elapsed().as_secs_f64();
    drop_schema(db)?;
    println!(
        "enqueue, bulk of {bulk}: insert_copies (--count) {copies:.0} tasks/s, enqueue_many (arrays) {many:.0} tasks/s"
    );
    println!(
        "{}",
        serde_json::json!({"bench": "enqueue_bulk", "tasks": bulk, "copies_tasks_per_s": copies.round(),
                           "enqueue_many_tasks_per_s": many.round()})
    );

    // Concurrent single inserts, four ways. The engine runs `noop` tasks; the other
    // type is one no instance runs.
    let mut rates = Vec::new();
    for phase in [
        "no trigger",
        "no trigger, engine polling every ms",
        "engine idle",
        "engine idle, tasks it does not run",
        "engine busy",
    ] {
        let url = fresh_schema(db)?;
        let mut conn = PgConnection::establish(&url)?;
        let mut engine = None;
        match phase {
            "no trigger" => conn.batch_execute("DROP TRIGGER tasks_notify_insert ON tasks")?,
            "no trigger, engine polling every ms" => {
                // The same work as "engine idle" (the engine runs what is inserted),
                // found by polling instead of notifications.
                conn.batch_execute("DROP TRIGGER tasks_notify_insert ON tasks")?;
                let e = Runner::new(&url, registry.clone())
                    .instance("bench-polling")
                    .workers(8)
                    .poll_interval(Duration::from_millis(1))
                    .start()?;
                engine = Some(e);
            }
            "engine idle" | "engine idle, tasks it does not run" => {
                // An instance with nothing to do. With tasks it runs, it wakes for the
                // first ones and stays awake while they stream in; with tasks it does
                // not run, every insert finds it asleep and notifies.
                let e = start(&url, registry, "bench-idle".into(), 8)?;
                if !wait_idle(std::slice::from_ref(&e), 8, 0, Duration::from_secs(30)) {
                    bail!("the engine did not become idle");
                }
                engine = Some(e);
            }
            _ => {
                // Every worker on a long task, no room: the instance is busy.
                let e = Runner::new(&url, registry.clone())
                    .instance("bench-busy")
                    .workers(8)
                    .claim_buffer(0)
                    .poll_interval(Duration::from_secs(3600))
                    .start()?;
                NewTask::new(&tasks::Sleep { ms: 600_000 })?.insert_copies(&mut conn, 8)?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while e.stats().marked_idle || e.stats().claims == 0 || running(&mut conn)? < 8 {
                    if Instant::now() > deadline {
                        bail!("the engine did not become busy");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                engine = Some(e);
            }
        }
        let before = engine.as_ref().map(|e| e.stats().notifications).unwrap_or(0);
        let runs_them = phase == "engine idle" || phase == "no trigger, engine polling every ms";
        let class = if runs_them { "noop" } else { "bench_nobody_runs_this" };
        let total = concurrent_inserts(&url, class, clients, duration)?;
        let rate = total as f64 / duration.as_secs_f64();
        let notifications = engine.as_ref().map(|e| e.stats().notifications - before);
        let mut check = None;
        if runs_them {
            // No wake-up missed: every inserted task runs, once, without the
            // fallback poll (an hour).
            let deadline = Instant::now() + MISSED_AFTER;
            let mut c = exactly_once(&mut conn)?;
            while c.not_stopped > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                c = exactly_once(&mut conn)?;
            }
            check = Some((c.not_stopped, c));
        }
        if let Some(engine) = engine {
            // The long sleeps end when cancelled (the listener hears it): stop after.
            for id in running_ids(&mut conn)? {
                task_engine::cancel(&mut conn, id)?;
            }
            engine.shutdown();
        }
        drop_schema(db)?;
        println!(
            "enqueue, {clients} clients x single plain-SQL inserts, {phase}: {rate:.0} tasks/s{}{}",
            notifications.map(|n| format!(" ({n} notifications)")).unwrap_or_default(),
            check.as_ref().map(|(left, c)| format!("; {left} missed; {c}")).unwrap_or_default()
        );
        println!(
            "{}",
            serde_json::json!({"bench": "enqueue_concurrent", "phase": phase, "clients": clients,
                               "tasks": total, "tasks_per_s": rate.round(), "notifications": notifications,
                               "missed": check.as_ref().map(|(left, _)| left),
                               "ran_exactly_once": check.as_ref().map(|(_, c)| c.ok())})
        );
        if let Some((left, c)) = &check {
            if *left > 0 || !c.ok() {
                bail!("the inserted tasks did not all run exactly once ({c}, {left} missed)");
            }
        }
        rates.push(rate);
    }
    println!(
        "enqueue: idle engine {:.0}% of the rate without the trigger with an engine polling for the same tasks \
         ({:.0}% of the rate without trigger nor engine; with tasks it does not run {:.0}%); \
         busy engine {:.0}% of the rate without the trigger",
        rates[2] / rates[1] * 100.0,
        rates[2] / rates[0] * 100.0,
        rates[3] / rates[0] * 100.0,
        rates[4] / rates[0] * 100.0
    );
    Ok(())
}

fn running(conn: &mut PgConnection) -> anyhow::Result<i64> {
    Ok(running_ids(conn)?.len() as i64)
}

fn running_ids(conn: &mut PgConnection) -> anyhow::Result<Vec<i64>> {
    use task_engine::schema::tasks::dsl;
    Ok(dsl::tasks.filter(dsl::status.eq("running")).select(dsl::id).load(conn)?)
}

/// `clients` threads insert single tasks of type `class` (a plain SQL literal) for
/// `duration`; returns how many went in.
fn concurrent_inserts(url: &str, class: &'static str, clients: usize, duration: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + duration;
    let handles: Vec<std::thread::JoinHandle<anyhow::Result<u64>>> = (0..clients)
        .map(|_| {
            let url = url.to_owned();
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url)?;
                let mut n = 0;
                while Instant::now() < deadline {
                    conn.batch_execute(&format!("INSERT INTO tasks (task_class) VALUES ('{class}')"))?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.join().map_err(|_| anyhow::anyhow!("an inserting client panicked"))??;
    }
    Ok(total)
}

fn sustained(db: &Database, registry: &Registry, tasks: u32, workers: usize) -> anyhow::Result<()> {
    if tasks < 10 || workers == 0 {
        bail!(crate::UsageError("--tasks must be at least 10 and --workers at least 1".into()));
    }
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    let chunk = 100_000;
    let mut left = tasks;
    while left > 0 {
        let n = left.min(chunk);
        NewTask::new(&tasks::Noop {})?.insert_copies(&mut conn, n)?;
        left -= n;
    }
    conn.batch_execute("VACUUM ANALYZE tasks")?;
    let mut probe = PgConnection::establish(&url)?;
    let started = Instant::now();
    let engine = start(&url, registry, "sustained".into(), workers)?;
    let total = u64::from(tasks);
    let tenth = total / 10;
    let (mut first_tenth, mut last_tenth_start) = (None, None);
    let mut samples: Vec<(u64, u64)> = Vec::new(); // (done, claim buffers)
    let mut next_sample = 0;
    // When each tenth was done.
    let mut tenths: Vec<Duration> = Vec::with_capacity(10);
    loop {
        let done = engine.stats().completions;
        while tenths.len() < 10 && done >= tenth * (tenths.len() as u64 + 1) {
            tenths.push(started.elapsed());
        }
        if first_tenth.is_none() && done >= tenth {
            first_tenth = Some(started.elapsed());
        }
        if last_tenth_start.is_none() && done >= total - tenth {
            last_tenth_start = Some(started.elapsed());
        }
        if done >= next_sample && done < total {
            samples.push((done, claim_buffers(&mut probe)?));
            next_sample = done + tenth;
        }
        if done >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("the sustained drain did not finish in an hour");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let stats = engine.stats();
    engine.shutdown();
    let check = exactly_once(&mut conn)?;
    drop_schema(db)?;

    let first = tenth as f64 / first_tenth.unwrap_or(elapsed).as_secs_f64();
    let last = tenth as f64 / (elapsed - last_tenth_start.unwrap_or_default()).as_secs_f64();
    println!(
        "sustained: {tasks} tasks, {workers} workers, {:.1} s ({:.0} tasks/s overall); first tenth {first:.0} tasks/s, \
         last tenth {last:.0} tasks/s ({:.0}%); {} claims; {check}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        last / first * 100.0,
        stats.claims
    );
    let tenth_rates: Vec<f64> = tenths
        .iter()
        .scan(Duration::ZERO, |previous, &t| {
            let rate = tenth as f64 / (t - *previous).as_secs_f64();
            *previous = t;
            Some(rate.round())
        })
        .collect();
    println!(
        "sustained: tasks/s by tenth: {}",
        tenth_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "sustained: claim buffers (EXPLAIN ANALYZE of a 100-task claim walk) at tasks done: {}",
        samples.iter().map(|(done, b)| format!("{done}: {b}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "sustained", "tasks": tasks, "workers": workers,
            "seconds": round3(elapsed.as_secs_f64()),
            "tasks_per_s": (total as f64 / elapsed.as_secs_f64()).round(),
            "first_tenth_tasks_per_s": first.round(), "last_tenth_tasks_per_s": last.round(),
            "last_over_first": round3(last / first),
            "tasks_per_s_by_tenth": tenth_rates,
            "claim_buffers": samples.iter().map(|(d, b)| serde_json::json!([d, b])).collect::<Vec<_>>(),
            "ran_exactly_once": check.ok(),
        })
    );
    if !check.ok() {
        bail!("the sustained drain's tasks did not all run exactly once ({check})");
    }
    Ok(())
}

/// Buffers the claim's walk of the waiting-tasks index reads for 100 tasks, now
/// (without locking or claiming anything).
fn claim_buffers(conn: &mut PgConnection) -> anyhow::Result<u64> {
    #[derive(QueryableByName)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let plan: Vec<Plan> = diesel::sql_query(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) SELECT id FROM tasks
         WHERE status = 'waiting' AND run_at <= now() AND task_class = ANY(ARRAY['noop'])
         ORDER BY priority DESC, run_at, id LIMIT 100",
    )
    .load(conn)?;
    let number_after = |line: &str, key: &str| -> u64 {
        line.split(key).nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).unwrap_or(0)
    };
    Ok(plan
        .iter()
        .take_while(|p| !p.line.starts_with("Planning"))
        .filter(|p| p.line.contains("Buffers: shared"))
        .map(|p| number_after(&p.line, "hit=") + number_after(&p.line, "read="))
        .max()
        .unwrap_or(0))
}

/// What the exactly-once check found.
struct Check {
    tasks: i64,
    not_stopped: i64,
    without_one_execution: i64,
}

impl Check {
    fn ok(&self) -> bool {
        self.not_stopped == 0 && self.without_one_execution == 0
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok() {
            write!(f, "all {} tasks ran exactly once", self.tasks)
        } else {
            write!(
                f,
                "{} tasks: {} not stopped, {} without exactly one execution",
                self.tasks, self.not_stopped, self.without_one_execution
            )
        }
    }
}

/// Every task stopped, each with exactly one execution.
fn exactly_once(conn: &mut PgConnection) -> anyhow::Result<Check> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        tasks: i64,
        #[diesel(sql_type = BigInt)]
        not_stopped: i64,
        #[diesel(sql_type = BigInt)]
        without_one_execution: i64,
    }
    let row: Row = diesel::sql_query(
        "SELECT count(*) AS tasks,
                count(*) FILTER (WHERE status <> 'stopped') AS not_stopped,
                count(*) FILTER (WHERE (SELECT count(*) FROM task_executions e WHERE e.task_id = t.id) <> 1)
                    AS without_one_execution
         FROM tasks t",
    )
    .get_result(conn)?;
    Ok(Check { tasks: row.tasks, not_stopped: row.not_stopped, without_one_execution: row.without_one_execution })
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

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.5), 7.0);
    }
}
