//! `engine bench drain`: no-op tasks enqueued in bulk, then one instance runs them all;
//! the batched engine, then one task per round trip, for the ratio.

use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::{NewTask, Registry, Runner};

use super::cpu::{process_cpu, server_cpu};
use super::tasks::Noop;
use super::{drop_schema, exactly_once, fresh_schema, round3};
use crate::database::Database;

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

pub(super) struct Options {
    pub tasks: u32,
    pub workers: usize,
    pub runs: usize,
    pub batched_only: bool,
    pub buffer: Option<usize>,
}

pub(super) fn run(db: &Database, registry: &Registry, options: Options) -> anyhow::Result<()> {
    let Options { tasks, workers, runs, batched_only, buffer } = options;
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
    NewTask::new(&Noop {})?.insert_copies(&mut conn, tasks)?;
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
