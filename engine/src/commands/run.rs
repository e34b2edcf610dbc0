//! `engine run`: an engine instance, until SIGINT or SIGTERM, with a summary line every
//! so often and one at the stop.

use std::time::Duration;

use anyhow::Context as _;
use task_engine::Runner;

use super::Context;
use crate::duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The queues to run, each with its workers: `--queue default=8 --queue emails=2`
    /// (or TASK_ENGINE_QUEUES=default=8,emails=2). Default: `default` with --workers.
    #[arg(long = "queue", env = "TASK_ENGINE_QUEUES", value_delimiter = ',', value_parser = queue_workers)]
    queues: Vec<(String, usize)>,
    /// Number of worker threads (1 to 10000) of the queue `default`, when no --queue
    /// is given.
    #[arg(long, env = "TASK_ENGINE_WORKERS", default_value_t = Runner::DEFAULT_WORKERS as u16,
          value_parser = clap::value_parser!(u16).range(1..=10_000))]
    workers: u16,
    /// The instance's name (default: host name and process id).
    #[arg(long, env = "TASK_ENGINE_INSTANCE")]
    instance: Option<String>,
    /// Fallback poll: how long an idle instance waits before looking for work unprompted
    /// (500ms, 30s, 1h). A safety net only: inserts wake workers through LISTEN/NOTIFY.
    #[arg(long, env = "TASK_ENGINE_POLL_INTERVAL", value_parser = poll_interval, default_value = "10s")]
    poll_interval: Duration,
    /// An instance silent for this long is taken for dead and its running tasks are
    /// rescued. Each instance records its own and is judged by it, so instances may
    /// differ (during a rolling change of it, say).
    #[arg(long, env = "TASK_ENGINE_LEASE", value_parser = lease, default_value = "30s")]
    lease: Duration,
    /// The most tasks claimed ahead of the idle workers, per worker; the buffer in
    /// use follows the tasks' pace (none for tasks slower than two claims).
    #[arg(long, env = "TASK_ENGINE_CLAIM_BUFFER", default_value_t = Runner::DEFAULT_BUFFER_PER_WORKER)]
    claim_buffer: usize,
    /// A claimed task that waits this long for a worker goes back to the database
    /// for other instances.
    #[arg(long, env = "TASK_ENGINE_MAX_QUEUE_WAIT", value_parser = max_queue_wait, default_value = "1s")]
    max_queue_wait: Duration,
    /// How often to log a summary line (attempts recorded, their outcomes, the
    /// rate); one more comes at the stop.
    #[arg(long, env = "TASK_ENGINE_SUMMARY_EVERY", value_parser = summary_every, default_value = "1m")]
    summary_every: Duration,
    /// How long a task past its time limit has, once asked to stop, before its
    /// worker is abandoned (recorded as timed out) and replaced.
    #[arg(long, env = "TASK_ENGINE_TIMEOUT_GRACE", value_parser = timeout_grace, default_value = "10s")]
    timeout_grace: Duration,
    /// Where the instance's session connects: the one connection that LISTENs for
    /// wake-ups and cancels and holds the instance's name lock and the wake-up stripes.
    /// PostgreSQL itself, when DATABASE_URL is a transaction pooler (PgBouncer in
    /// transaction mode); `none`: no session, the instance polls every
    /// --poll-interval. Default: DATABASE_URL.
    #[arg(long, env = "TASK_ENGINE_LISTEN_URL", hide_env_values = true)]
    listen_url: Option<String>,
    /// The most connections the tasks' own queries hold at once (`ctx.connection()`,
    /// progress, checkpoints), each opened when a task first asks. Default: one per
    /// worker.
    #[arg(long, env = "TASK_ENGINE_TASK_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    task_connections: Option<u32>,
}

impl Args {
    /// Returns the instance's name: `--instance`, or the host name and process id.
    pub fn instance_name(&self) -> String {
        self.instance.clone().unwrap_or_else(task_engine::default_instance_name)
    }
}

/// Starts the instance and logs a summary every `--summary-every` until a signal
/// stops it, then one for the whole run.
pub fn run(args: Args, ctx: Context) -> anyhow::Result<()> {
    let Args {
        queues,
        workers,
        instance,
        poll_interval,
        lease,
        claim_buffer,
        max_queue_wait,
        summary_every,
        timeout_grace,
        listen_url,
        task_connections,
    } = args;
    let workers = usize::from(workers);
    let all_workers = if queues.is_empty() { workers } else { queues.iter().map(|(_, w)| *w).sum() };
    // The connection only checked the schema (it is dropped here): the instance opens
    // its own.
    let (db, _) = ctx.open_migrated()?;
    log::info!("task crates linked in: {}", crate::task_crates::TASK_CRATES.join(", "));
    let mut runner = queues.into_iter().fold(Runner::new(db.url(), ctx.registry), |r, (q, w)| r.queue(q, w));
    runner = match listen_url.as_deref() {
        None => runner,
        Some("none") => runner.without_listener(),
        Some(url) => runner.listen_url(url),
    };
    if let Some(n) = task_connections {
        runner = runner.task_connections(n as usize);
    }
    let engine = runner
        .workers(workers)
        .instance(instance.unwrap_or_else(task_engine::default_instance_name))
        .poll_interval(poll_interval)
        .lease(lease)
        .claim_buffer(claim_buffer.saturating_mul(all_workers))
        .max_queue_wait(max_queue_wait)
        .timeout_grace(timeout_grace)
        .start()?;
    let (stopped, stop_heard) = std::sync::mpsc::channel();
    stop_on_signals(engine.stop_handle(), stopped)?;
    let started = std::time::Instant::now();
    let mut last = (started, task_engine::EngineStats::default());
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop_heard.recv_timeout(summary_every) {
        let now = (std::time::Instant::now(), engine.stats());
        log::info!(
            "instance {}: last {:.0?}: {}",
            engine.instance(),
            now.0 - last.0,
            summary(&last.1, &now.1, now.0 - last.0)
        );
        last = now;
    }
    let name = engine.instance().to_owned();
    let end = engine.join();
    let ran = started.elapsed();
    let zero = task_engine::EngineStats::default();
    log::info!("instance {name} ran {:.0?}: {}", ran, summary(&zero, &end, ran));
    Ok(())
}

/// What an instance recorded between two readings of its counters, for a person.
fn summary(before: &task_engine::EngineStats, after: &task_engine::EngineStats, over: Duration) -> String {
    let recorded = after.completions - before.completions;
    let rate = recorded as f64 / over.as_secs_f64().max(1e-9);
    format!(
        "{recorded} attempts recorded ({rate:.1}/s): {} succeeded, {} failed and to be retried, {} failed for good, {} interrupted \
         by the stop; {} tasks given back, {} rescued from dead instances",
        after.succeeded - before.succeeded,
        after.retried - before.retried,
        after.failed - before.failed,
        after.interrupted - before.interrupted,
        after.given_back - before.given_back,
        after.rescued - before.rescued,
    )
}

/// `--summary-every`: at least a second.
fn summary_every(text: &str) -> Result<Duration, String> {
    let every = duration::parse(text)?;
    if every < Duration::from_secs(1) {
        return Err("the summary comes at most every 1s".into());
    }
    Ok(every)
}

/// Starts the signal thread: the first SIGINT or SIGTERM stops the instance
/// gracefully, a second one exits at once.
fn stop_on_signals(stop: task_engine::StopHandle, stopped: std::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("could not install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                received += 1;
                if received == 1 {
                    log::info!("signal {signal} received: stopping (send it again to exit at once)");
                    stop.stop();
                    let _ = stopped.send(());
                } else {
                    log::warn!("second signal: exiting at once; tasks in flight will be rescued as lost");
                    std::process::exit(1);
                }
            }
        })
        .context("could not start the signal thread")?;
    Ok(())
}

/// `--poll-interval`: a duration of at least a millisecond (0 would spin).
fn poll_interval(text: &str) -> Result<Duration, String> {
    let interval = duration::parse(text)?;
    if interval < Duration::from_millis(1) {
        return Err("the fallback poll must be at least 1ms".into());
    }
    Ok(interval)
}

/// `--max-queue-wait`: at least [`Runner::MIN_MAX_QUEUE_WAIT`] (the producer looks at
/// the queued tasks about this often).
fn max_queue_wait(text: &str) -> Result<Duration, String> {
    let wait = duration::parse(text)?;
    if wait < Runner::MIN_MAX_QUEUE_WAIT {
        return Err(format!("the wait for a worker must be at least {:?}", Runner::MIN_MAX_QUEUE_WAIT));
    }
    Ok(wait)
}

/// `--timeout-grace`: at most a day.
fn timeout_grace(text: &str) -> Result<Duration, String> {
    let grace = duration::parse(text)?;
    if grace > Duration::from_secs(86_400) {
        return Err("the grace must be at most 1d".into());
    }
    Ok(grace)
}

/// `--lease`: from a second (heartbeats go six times per lease) to a day.
fn lease(text: &str) -> Result<Duration, String> {
    let lease = duration::parse(text)?;
    if !Runner::LEASES.contains(&lease) {
        return Err("the lease must be from 1s to 1d".into());
    }
    Ok(lease)
}

/// `--queue NAME=WORKERS`.
fn queue_workers(text: &str) -> Result<(String, usize), String> {
    let (name, workers) = text.split_once('=').ok_or("expected NAME=WORKERS, e.g. emails=2")?;
    let workers: usize = workers.parse().map_err(|_| format!("{workers:?} is not a number of workers"))?;
    if name.is_empty() || workers == 0 || workers > Runner::MAX_WORKERS {
        return Err(format!("expected a queue name and 1 to {} workers", Runner::MAX_WORKERS));
    }
    Ok((name.to_owned(), workers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_says_what_was_recorded_between_two_readings() {
        let before = task_engine::EngineStats { completions: 10, succeeded: 9, failed: 1, ..Default::default() };
        let after = task_engine::EngineStats {
            completions: 130,
            succeeded: 115,
            retried: 4,
            failed: 11,
            given_back: 2,
            ..Default::default()
        };
        assert_eq!(
            summary(&before, &after, Duration::from_secs(60)),
            "120 attempts recorded (2.0/s): 106 succeeded, 4 failed and to be retried, 10 failed for good, 0 \
             interrupted by the stop; 2 tasks given back, 0 rescued from dead instances"
        );
    }
}
