//! `engine demo`: the main job on the embedded default. Enqueues a mix of the example
//! tasks in a database of its own, runs them with a few workers until every one has
//! ended, and prints a summary read back from `task_executions`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use task_engine::{redact_url, report, NewTask, Registry, Runner};

use super::table::Align::{Left, Right};
use super::table::Table;
use super::Context;
use crate::database::Database;
use crate::outln;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of worker threads.
    #[arg(long, default_value_t = 4)]
    workers: usize,
}

/// Runs the demo, then stops the embedded cluster if the demo started it.
pub fn run(args: Args, ctx: Context) -> anyhow::Result<()> {
    // SIGINT or SIGTERM stops the demo as `engine run` stops: its instance finishes the
    // tasks in flight and removes its row, the embedded cluster is stopped, and it
    // exits 1. Heard from the start: one that comes while the cluster starts must not
    // kill the process (exit 130) and leave the cluster running.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted)).context("could not install signal handlers")?;
    }
    let db = ctx.open()?;
    let result = run_on(&db, ctx.registry, args.workers, &interrupted);
    // Leave the machine as we found it, even when the demo failed.
    db.stop_if_started_here()?;
    if result.is_ok() && db.is_embedded_started_here() {
        outln!("(the embedded cluster is stopped again: `engine db-url` starts it)");
    }
    result
}

fn run_on(db: &Database, registry: Registry, workers: usize, interrupted: &AtomicBool) -> anyhow::Result<()> {
    let stop_if_interrupted = |when: &str| match interrupted.load(Ordering::SeqCst) {
        true => Err(anyhow::anyhow!("interrupted {when}")),
        false => Ok(()),
    };
    stop_if_interrupted("before the demo enqueued anything")?;
    // A database of its own: an instance running on the main one would take the
    // demo's tasks, and an interrupted demo would leave them there.
    let url = db.fresh_demo_database()?;
    stop_if_interrupted("before the demo enqueued anything")?;
    let mut conn = task_engine::connect(&url)?;
    let mix = mix(&registry)?;
    let ids = task_engine::enqueue_many(&mut conn, &mix)?;
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    outln!("enqueued {} tasks ({}..={}): noop, echo, sleep, fail, panic", ids.len(), first, last);

    let started = Instant::now();
    let engine = Runner::new(&url, registry).workers(workers).instance("demo").start()?;
    // Wait until each of our tasks has ended; give up after a minute.
    let outcome = loop {
        if interrupted.load(Ordering::SeqCst) {
            break Err(anyhow::anyhow!(
                "interrupted: the demo stopped its instance; its tasks stay in its database until the next demo"
            ));
        }
        let unfinished =
            report::unfinished_tasks(&mut conn, first..=last).context("could not follow the demo's tasks")?;
        if unfinished == 0 {
            break Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            break Err(anyhow::anyhow!("{unfinished} demo tasks still unfinished after a minute"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    engine.shutdown();
    outcome?;
    let elapsed = started.elapsed();

    outln!("ran them with {workers} workers in {:.2} s\n", elapsed.as_secs_f64());
    let mut table = Table::new(&[
        ("TYPE", Left),
        ("TASKS", Right),
        ("EXECUTIONS", Right),
        ("FAILURES", Right),
        ("MEAN MS", Right),
        ("P95 MS", Right),
    ]);
    for s in report::type_summaries(&mut conn, first)? {
        table.row(vec![
            s.task_class,
            s.tasks.to_string(),
            s.executions.to_string(),
            s.failures.to_string(),
            format!("{:.3}", s.mean_ms.unwrap_or(0.0)),
            format!("{:.3}", s.p95_ms.unwrap_or(0.0)),
        ]);
    }
    table.print()?;
    outln!(
        "\nthe demo's tasks stay in its own database until the next demo: \
         `engine --database-url {} status` shows them (`status --task ID`, one task's history)",
        redact_url(&url)
    );
    Ok(())
}

/// The demo's tasks: mostly quick ones, some sleeping, a few failing (tried twice,
/// the retry some 4 s later) and panicking (once).
fn mix(registry: &Registry) -> anyhow::Result<Vec<NewTask>> {
    let mut mix = Vec::new();
    let mut add = |task_type: &str, parameters: serde_json::Value| -> anyhow::Result<()> {
        let attempts = match task_type {
            "fail" => 2,
            "panic" => 1,
            _ => 3,
        };
        mix.push(NewTask::from_json(registry, task_type, parameters)?.max_attempts(attempts));
        Ok(())
    };
    for i in 0..100 {
        add("noop", serde_json::json!({}))?;
        if i % 2 == 0 {
            add("echo", serde_json::json!({ "greeting": "hello", "n": i }))?;
        }
        if i % 4 == 0 {
            add("sleep", serde_json::json!({ "ms": 5 + (i * 7) % 45 }))?;
        }
        if i % 10 == 0 {
            add("fail", serde_json::json!({ "message": format!("demo failure {i}") }))?;
        }
        if i % 20 == 0 {
            add("panic", serde_json::json!({ "message": format!("demo panic {i}") }))?;
        }
    }
    Ok(mix)
}
