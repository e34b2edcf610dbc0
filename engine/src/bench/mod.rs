//! `engine bench`: reproducible measurements of the engine, on the embedded default or
//! on `DATABASE_URL`. Each run works in a schema of its own (`task_engine_bench`,
//! created, migrated and dropped), runs the bench's own task types (not the workspace's
//! task crates), prints a human summary and one JSON line, and checks that every task
//! ran exactly once. One file per benchmark; what they share is here.

mod drain;
mod enqueue;
mod fairness;
mod latency;
mod meter;
mod peer;
mod tasks;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use task_engine::{Registry, Runner, RunningEngine};

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
    /// Drain: no-op tasks reach one instance, which runs them all, every attempt
    /// recorded; the rate of each tenth and the CPU and WAL per task. Runs the batched
    /// engine, then the same engine with one task per round trip, for the ratio.
    Drain {
        #[command(flatten)]
        drain: DrainArgs,
        /// Skip the one-task-per-round-trip runs.
        #[arg(long)]
        batched_only: bool,
    },
    /// Our drain (batched) and another queue's benchmark, alternating in one sitting,
    /// each after a CHECKPOINT and a pause: medians, their ratio, CPU and WAL per task.
    /// The peer's command follows `--`; it gets DATABASE_URL (a database of its own on
    /// the same server, made anew for each run), N (tasks) and C (workers), and prints a
    /// JSON line with its rate.
    Peer {
        #[command(flatten)]
        drain: DrainArgs,
        /// The key of the peer's rate in its JSON line.
        #[arg(long, default_value = "drain_per_s")]
        rate_key: String,
        /// Pause after each CHECKPOINT.
        #[arg(long, value_parser = duration::parse, default_value = "5s")]
        pause: Duration,
        /// The peer's command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Fair dispatch: one key's backlog drains while another key's tasks arrive one at
    /// a time; the second key's pickup.
    Fairness {
        /// Tasks of the big key waiting at the start.
        #[arg(long, default_value_t = 1_000_000)]
        backlog: u32,
        /// Tasks of the small key, inserted one at a time.
        #[arg(long, default_value_t = 100)]
        small: usize,
        /// Workers of the instance.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Pause between the small key's inserts.
        #[arg(long, value_parser = duration::parse, default_value = "20ms")]
        gap: Duration,
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

/// What a drain is made of.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Tasks to drain.
    #[arg(long, default_value_t = 20_000)]
    tasks: u32,
    /// Instances draining together.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Workers of each instance.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Runs of each (the figure is their median).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tasks claimed beyond the idle workers (default: the engine's).
    #[arg(long)]
    buffer: Option<usize>,
    /// How the tasks reach the instance.
    #[arg(long, value_enum, default_value = "burst")]
    scenario: drain::Scenario,
    /// Each task sleeps this long (0: a no-op).
    #[arg(long, default_value_t = 0)]
    task_ms: u64,
    /// Spread the tasks over this many keys, in turn (0: no key).
    #[arg(long, default_value_t = 0)]
    keys: u32,
    /// Set this limit on how many tasks of the queue run at once (it then samples how
    /// many run, every 5 ms).
    #[arg(long)]
    limit: Option<u32>,
    /// Give every task a unique key of its own.
    #[arg(long)]
    unique: bool,
    /// Run the instances through this transaction pooler: their `DATABASE_URL` is this
    /// URL (PgBouncer in transaction mode, in front of the benchmark's database, its
    /// server connections on the benchmark's schema: `connect_query = 'SET search_path
    /// TO task_engine_bench'`), their session on the benchmark's own URL.
    #[arg(long)]
    pooler: Option<String>,
}

impl DrainArgs {
    fn options(&self) -> drain::Options {
        drain::Options {
            tasks: self.tasks,
            instances: self.instances,
            workers: self.workers,
            runs: self.runs,
            buffer: self.buffer,
            scenario: self.scenario,
            keys: self.keys,
            limit: self.limit,
            task_ms: self.task_ms,
            unique: self.unique,
            pooler: self.pooler.clone().map(|url| &*Box::leak(url.into_boxed_str())),
            batched_only: true,
        }
    }
}

pub fn run(bench: Bench, url: Option<String>, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let registry = tasks::registry()?;
    let db = Database::open(url, data_dir)?;
    let result = match bench {
        Bench::Latency { tasks, instances, workers, gap } => {
            let instances = if instances.is_empty() { vec![1, 3] } else { instances };
            instances.into_iter().try_for_each(|n| latency::run(&db, &registry, tasks, n, workers, gap))
        }
        Bench::Enqueue { bulk, clients, duration } => enqueue::run(&db, &registry, bulk, clients, duration),
        Bench::Fairness { backlog, small, workers, gap } => fairness::run(&db, &registry, backlog, small, workers, gap),
        Bench::Drain { drain, batched_only } => {
            drain::run(&db, &registry, &drain::Options { batched_only, ..drain.options() })
        }
        Bench::Peer { drain, rate_key, pause, command } => {
            peer::run(&db, &registry, &peer::Options { command, rate_key, pause, drain: drain.options() })
        }
    };
    db.stop_if_started_here()?;
    result
}

/// The benchmark's schema, fresh and migrated, and a URL whose connections use it.
pub(super) fn fresh_schema(db: &Database) -> anyhow::Result<String> {
    let mut conn = db.connect_migrated()?;
    conn.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}"))?;
    let separator = if db.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options=-csearch_path%3D{SCHEMA}", db.url());
    let mut conn = PgConnection::establish(&url).context("connect to the benchmark schema")?;
    task_engine::run_migrations(&mut conn)?;
    Ok(url)
}

pub(super) fn drop_schema(db: &Database) -> anyhow::Result<()> {
    db.connect()?.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))?;
    Ok(())
}

pub(super) fn start(url: &str, registry: &Registry, name: String, workers: usize) -> anyhow::Result<RunningEngine> {
    Ok(Runner::new(url, registry.clone())
        .instance(name)
        .workers(workers)
        // The fallback poll must not explain a start.
        .poll_interval(Duration::from_secs(3600))
        .start()?)
}

pub(super) fn total_claims(engines: &[RunningEngine]) -> u64 {
    engines.iter().map(|e| e.stats().claims).sum()
}

/// Waits until the instances have made more than `claims` claims in all and every one
/// of them sleeps and listens; false after `patience`.
pub(super) fn wait_idle(engines: &[RunningEngine], workers: usize, claims: u64, patience: Duration) -> bool {
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

/// What the exactly-once check found.
pub(super) struct Check {
    tasks: i64,
    pub not_stopped: i64,
    without_one_execution: i64,
}

impl Check {
    pub fn ok(&self) -> bool {
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
pub(super) fn exactly_once(conn: &mut PgConnection) -> anyhow::Result<Check> {
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
pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn round3(x: f64) -> f64 {
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
