//! `engine demo`: the main job on the embedded default. Enqueues a mix of the example
//! tasks, runs them with a few workers until every one has ended, and prints a
//! summary read back from `task_executions`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use task_engine::{report, NewTask, Registry, Runner};

use super::Context;
use crate::database::Database;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of worker threads.
    #[arg(long, default_value_t = 4)]
    workers: usize,
}

/// Runs the demo, then stops the embedded cluster if the demo started it.
pub fn run(args: Args, ctx: Context) -> anyhow::Result<()> {
    let db = ctx.open()?;
    let result = run_on(&db, ctx.registry, args.workers);
    // Leave the machine as we found it, even when the demo failed.
    db.stop_if_started_here()?;
    result
}

fn run_on(db: &Database, registry: Registry, workers: usize) -> anyhow::Result<()> {
    // SIGINT or SIGTERM stops the demo as `engine run` stops: its instance finishes the
    // tasks in flight and removes its row, and the embedded cluster is stopped.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted)).context("could not install signal handlers")?;
    }
    let mut conn = db.connect_migrated()?;
    let mix = mix(&registry)?;
    let ids = task_engine::enqueue_many(&mut conn, &mix)?;
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    println!("enqueued {} tasks ({}..={}): noop, echo, sleep, fail, panic", ids.len(), first, last);

    let started = Instant::now();
    let engine = Runner::new(db.url(), registry).workers(workers).instance("demo").start()?;
    // Wait until each of our tasks has ended; give up after a minute.
    let outcome = loop {
        if interrupted.load(Ordering::SeqCst) {
            break Err(anyhow::anyhow!("interrupted: the demo stopped its instance; its tasks stay in the database"));
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

    println!("ran them with {workers} workers in {:.2} s\n", elapsed.as_secs_f64());
    println!("{:<8} {:>6} {:>11} {:>9} {:>10} {:>10}", "TYPE", "TASKS", "EXECUTIONS", "FAILURES", "MEAN MS", "P95 MS");
    for s in report::type_summaries(&mut conn, first)? {
        println!(
            "{:<8} {:>6} {:>11} {:>9} {:>10.3} {:>10.3}",
            s.task_class,
            s.tasks,
            s.executions,
            s.failures,
            s.mean_ms.unwrap_or(0.0),
            s.p95_ms.unwrap_or(0.0)
        );
    }
    println!("\nsee every task with `engine status`, one task's history with `engine status --task ID`");
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
