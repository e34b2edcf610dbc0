//! `engine bench drain`: no-op tasks drained by one instance, every attempt recorded, in
//! the situations users meet: a burst into an idle instance whose table was analyzed
//! while empty, the same behind a backlog it cannot run, or (for comparison with older
//! figures) a queue filled and analyzed before the instance starts. Reports the rate of
//! each tenth (a deep queue must drain as fast at its end as at its start), and the CPU
//! and WAL each task cost.

use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::{NewTask, Registry, Runner, RunningEngine};

use super::meter::{Cost, Meter};
use super::tasks::{Nap, Noop};
use super::{drop_schema, exactly_once, fresh_schema, round3};
use crate::database::Database;

/// How the tasks reach the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The instance idles, listening, on an empty table analyzed while empty (what
    /// autovacuum leaves after a quiet spell); the tasks arrive in one insert. The rate
    /// counts from the insert's commit.
    Burst,
    /// A burst, behind 200,000 waiting tasks of a type no instance runs at a higher
    /// priority and 100,000 of the drained type due tomorrow at a higher priority.
    Backlog,
    /// The tasks are inserted, then `VACUUM ANALYZE`, then the instance starts: the
    /// benchmark as it was before; a preparation production never makes.
    Prepared,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Mode {
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

#[derive(Debug, Clone, Copy)]
pub(super) struct Options {
    pub tasks: u32,
    /// Instances draining together, each with `workers`.
    pub instances: usize,
    pub workers: usize,
    pub runs: usize,
    pub batched_only: bool,
    pub buffer: Option<usize>,
    pub scenario: Scenario,
    /// Tasks spread over this many keys (0: none).
    pub keys: u32,
    /// A limit on how many of the queue's tasks run at once.
    pub limit: Option<u32>,
    /// How long each task sleeps (0: a no-op).
    pub task_ms: u64,
    /// Every task has a unique key of its own.
    pub unique: bool,
    /// The instances' `DATABASE_URL`, a transaction pooler (their session on the
    /// benchmark's URL).
    pub pooler: Option<&'static str>,
}

pub(super) fn run(db: &Database, registry: &Registry, options: &Options) -> anyhow::Result<()> {
    if options.tasks < 10 || options.instances == 0 || options.workers == 0 || options.runs == 0 {
        bail!(crate::UsageError("--tasks must be at least 10, --instances, --workers and --runs at least 1".into()));
    }
    let modes: &[Mode] = if options.batched_only { &[Mode::Batched] } else { &[Mode::Batched, Mode::SingleRoundTrip] };
    let mut medians = Vec::new();
    for &mode in modes {
        let mut rates = Vec::new();
        for run in 1..=options.runs {
            rates.push(drain_once(db, registry, options, mode, run)?.rate);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!("drain, {}: median {median:.0} tasks/s over {} run(s)", mode.name(), options.runs);
        medians.push(median);
    }
    if let [batched, single] = medians[..] {
        println!("drain: batched / one task per round trip = {:.1}x", batched / single);
    }
    Ok(())
}

/// A drain's rate (tasks/s) and cost.
pub(super) struct Drained {
    pub rate: f64,
    pub cost: Cost,
}

/// One drain.
pub(super) fn drain_once(
    db: &Database,
    registry: &Registry,
    options: &Options,
    mode: Mode,
    run: usize,
) -> anyhow::Result<Drained> {
    let Options { tasks, instances, workers, scenario, buffer, keys, limit, task_ms, unique, pooler, .. } = *options;
    let url = fresh_schema(db)?;
    let mut conn = PgConnection::establish(&url)?;
    if limit.is_some() {
        task_engine::set_queue_concurrency(&mut conn, task_engine::DEFAULT_QUEUE, limit)?;
    }
    let meter = Meter::new(&mut conn)?;
    // The statistics of an empty table, as a freshly migrated or long-idle queue has them.
    conn.batch_execute("ANALYZE tasks")?;
    if scenario == Scenario::Backlog {
        conn.batch_execute(
            "INSERT INTO tasks (task_class, priority) SELECT 'bench_unknown', 5 FROM generate_series(1, 200000);
             INSERT INTO tasks (task_class, priority, run_at)
                 SELECT 'bench_noop', 10, now() + interval '1 day' FROM generate_series(1, 100000)",
        )?;
    }
    let runner = |i: usize| {
        let mut runner = Runner::new(pooler.unwrap_or(&url), registry.clone())
            .instance(format!("drain-{run}-{i}"))
            .workers(workers)
            // The fallback poll must not explain a pickup.
            .poll_interval(Duration::from_secs(3600));
        if let Some(buffer) = buffer {
            runner = runner.claim_buffer(buffer);
        }
        if pooler.is_some() {
            runner = runner.listen_url(&url);
        }
        if mode == Mode::SingleRoundTrip {
            runner = runner.max_claim(1).claim_buffer(0).max_completion_batch(1).flush_delay(Duration::ZERO);
        }
        runner
    };
    let start_all = || (0..instances).map(|i| runner(i).start()).collect::<Result<Vec<_>, _>>();

    let before = meter.read(&mut conn)?;
    let task = || if task_ms == 0 { NewTask::new(&Noop {}) } else { NewTask::new(&Nap { ms: task_ms }) };
    let insert = |conn: &mut PgConnection| -> anyhow::Result<()> {
        if keys == 0 && !unique {
            task()?.insert_copies(conn, tasks)?;
        } else {
            let batch: Vec<NewTask> = (0..tasks)
                .map(|i| {
                    let task = if keys == 0 { task()? } else { task()?.key(format!("key{}", i % keys)) };
                    Ok(if unique { task.unique_key(format!("u{i}")) } else { task })
                })
                .collect::<Result<_, task_engine::Error>>()?;
            task_engine::enqueue_many(conn, &batch)?;
        }
        Ok(())
    };
    let (engines, inserted_at, visible_at) = if scenario == Scenario::Prepared {
        let inserted_at = Instant::now();
        insert(&mut conn)?;
        conn.batch_execute("VACUUM ANALYZE tasks")?;
        let started_at = Instant::now();
        (start_all()?, inserted_at, started_at)
    } else {
        let engines = start_all()?;
        if !super::wait_idle(&engines, workers, instances as u64 - 1, Duration::from_secs(30)) {
            bail!("the instances did not fall idle");
        }
        let inserted_at = Instant::now();
        insert(&mut conn)?;
        (engines, inserted_at, Instant::now())
    };
    let sampler = limit.map(|_| Sampler::start(&url));
    let tenths = wait_tenths(&engines, u64::from(tasks), visible_at)?;
    let running = sampler.map(Sampler::finish).transpose()?;
    let after = meter.read(&mut conn)?;
    let (claims, wasted_claims, completion_batches) = engines
        .iter()
        .map(|e| e.stats())
        .fold((0, 0, 0), |a, s| (a.0 + s.claims, a.1 + s.wasted_claims, a.2 + s.completion_batches));
    engines.into_iter().for_each(RunningEngine::shutdown);
    let cost = Meter::cost(before, after, u64::from(tasks));
    if scenario == Scenario::Backlog {
        conn.batch_execute("DELETE FROM tasks WHERE task_class = 'bench_unknown' OR priority = 10")?;
    }
    let check = exactly_once(&mut conn)?;
    drop_schema(db)?;

    let secs = tenths.last().expect("ten tenths").as_secs_f64();
    let with_insert = tenths[9] + (visible_at - inserted_at);
    let rate = f64::from(tasks) / secs;
    let tenth = f64::from(tasks) / 10.0;
    let tenth_rates: Vec<f64> = std::iter::once(Duration::ZERO)
        .chain(tenths.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (tenth / (w[1] - w[0]).as_secs_f64()).round())
        .collect();
    let last_over_first = tenth_rates[9] / tenth_rates[0];
    let shape = match (keys, limit, task_ms) {
        (0, None, 0) => String::new(),
        (keys, limit, ms) => format!(", {keys} keys, limit {limit:?}, tasks of {ms} ms"),
    } + if unique { ", a unique key each" } else { "" };
    println!(
        "drain ({scenario:?}, {}{shape}), run {run}: {tasks} tasks, {instances} x {workers} workers: {rate:.0} tasks/s \
         ({secs:.3} s; {:.0} tasks/s from the insert's start); last tenth / first {last_over_first:.2}; {} claims, {} \
         completion statements; {cost}; {check}",
        mode.name(),
        f64::from(tasks) / with_insert.as_secs_f64(),
        claims,
        completion_batches,
    );
    if let (Some(samples), Some(limit)) = (&running, limit) {
        println!("running under a limit of {limit}: {}", samples.summary(i64::from(limit)));
    }
    let mut json = serde_json::json!({
        "bench": "drain",
        "scenario": format!("{scenario:?}").to_lowercase(),
        "mode": mode.name(),
        "run": run,
        "tasks": tasks,
        "instances": instances,
        "workers": workers,
        "seconds": round3(secs),
        "tasks_per_s": rate.round(),
        "tasks_per_s_from_insert_start": (f64::from(tasks) / with_insert.as_secs_f64()).round(),
        "tasks_per_s_by_tenth": tenth_rates,
        "last_tenth_over_first": round3(last_over_first),
        "claims": claims,
        "wasted_claims_per_task": round3(wasted_claims as f64 / f64::from(tasks)),
        "completion_statements": completion_batches,
        "ran_exactly_once": check.ok(),
        "keys": keys,
        "limit": limit,
        "task_ms": task_ms,
        "unique": unique,
    });
    json.as_object_mut().expect("an object").extend(cost.json("engine").as_object().expect("an object").clone());
    println!("{json}");
    if !check.ok() {
        bail!("the drain's tasks did not all run exactly once ({check})");
    }
    Ok(Drained { rate, cost })
}

/// Waits until `engines` have completed `tasks`; returns when each tenth was done,
/// counted from `from`.
fn wait_tenths(engines: &[RunningEngine], tasks: u64, from: Instant) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut tenths = Vec::with_capacity(10);
    while tenths.len() < 10 {
        let done: u64 = engines.iter().map(|e| e.stats().completions).sum();
        while tenths.len() < 10 && done * 10 >= tasks * (tenths.len() as u64 + 1) {
            tenths.push(from.elapsed());
        }
        if Instant::now() > deadline {
            bail!("the drain did not finish in an hour");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(tenths)
}

/// Samples how many tasks run (status `running`: claimed, in a buffer or a worker)
/// every 5 ms on a connection of its own, until finished.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<i64>>>,
}

impl Sampler {
    fn start(url: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let url = url.to_owned();
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            #[derive(QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let mut conn = PgConnection::establish(&url)?;
            let mut samples = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let n: N = diesel::sql_query("SELECT count(*) AS n FROM tasks WHERE status = 'running'")
                    .get_result(&mut conn)?;
                samples.push(n.n);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(samples)
        });
        Self { stop, thread }
    }

    fn finish(self) -> anyhow::Result<Samples> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.thread.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))??;
        Ok(Samples(samples))
    }
}

/// How many ran, sample by sample.
struct Samples(Vec<i64>);

impl Samples {
    /// The samples taken while tasks remained (the drain's tail aside: the last 10% of
    /// samples), their mean, their least, the share at the limit and above it.
    fn summary(&self, limit: i64) -> String {
        let body = &self.0[..self.0.len() * 9 / 10];
        if body.is_empty() {
            return "no sample".into();
        }
        let mean = body.iter().sum::<i64>() as f64 / body.len() as f64;
        let at = body.iter().filter(|&&n| n == limit).count() as f64 / body.len() as f64;
        let over = body.iter().filter(|&&n| n > limit).count();
        format!(
            "{} samples (the first 90%), mean {mean:.1}, least {}, at the limit {:.0}%, over it {over}",
            body.len(),
            body.iter().min().expect("not empty"),
            at * 100.0
        )
    }
}
