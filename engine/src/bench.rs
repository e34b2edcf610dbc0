//! `engine bench`: reproducible measurements of the engine, on the embedded default
//! or on `DATABASE_URL`. Each run works in a schema of its own (`task_engine_bench`,
//! created, migrated and dropped), prints a human summary and one JSON line, and checks
//! that every task ran exactly once.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double};
use task_engine::{EngineStats, NewTask, Registry, Runner, RunningEngine};

use crate::database::Database;
use crate::duration;

/// The schema a benchmark works in.
const SCHEMA: &str = "task_engine_bench";
/// How long a benchmark waits for a task before it counts it as missed.
const MISSED_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Pickup latency of an idle engine: tasks enqueued one at a time, with gaps; time
    /// from the enqueue (its transaction's start, so its commit included) to the
    /// attempt's `started_at`.
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
}

pub fn run(bench: Bench, url: Option<String>, data_dir: &std::path::Path, registry: Registry) -> anyhow::Result<()> {
    let db = Database::open(url, data_dir)?;
    let result = match bench {
        Bench::Latency { tasks, instances, workers, gap } => {
            let instances = if instances.is_empty() { vec![1, 3] } else { instances };
            instances.into_iter().try_for_each(|n| latency(&db, &registry, tasks, n, workers, gap))
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
    let task = NewTask::new(&tasks::Noop {})?;
    let mut missed = 0;
    for _ in 0..tasks {
        let claims = total_claims(&engines);
        task.insert(&mut conn)?;
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
        #[diesel(sql_type = Double)]
        ms: f64,
    }
    let mut pickups: Vec<f64> = diesel::sql_query(
        "SELECT extract(epoch FROM e.started_at - t.created_at)::float8 * 1000 AS ms
         FROM tasks t JOIN task_executions e ON e.task_id = t.id",
    )
    .load::<Pickup>(&mut conn)?
    .into_iter()
    .map(|p| p.ms)
    .collect();
    pickups.sort_by(f64::total_cmp);
    let check = exactly_once(&mut conn)?;
    drop_schema(db)?;

    let p = |q: f64| percentile(&pickups, q);
    println!(
        "latency: {instances} instance(s) x {workers} workers, {tasks} tasks one at a time: \
         pickup p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms; wasted claims per task {:.2}; missed {missed}; {check}",
        p(0.50),
        p(0.95),
        p(0.99),
        p(1.0),
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
