//! The command line: subcommands, configuration (flags win over environment
//! variables), logging set-up, and what each subcommand does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::LevelFilter;
use task_engine::{NewTask, OnConflict, Registry, Runner, Upserted};

use crate::commands::{demo, status, Context};
use crate::database::Database;
use crate::{bench, duration, outln, UsageError};

#[derive(Debug, Parser)]
#[command(name = "engine", version, about = "A background task engine that keeps its tasks in PostgreSQL")]
pub struct Cli {
    /// PostgreSQL connection URL. Unset: a private cluster under --data-dir, created
    /// and started on first use.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where the embedded default keeps its PostgreSQL cluster (used without
    /// DATABASE_URL). Default: `.task_engine` in the nearest directory, from the current
    /// one up, that holds one or the workspace's `Cargo.lock`, else here.
    #[arg(long, env = "TASK_ENGINE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Log level: off, error, warn, info, debug, trace.
    #[arg(long, env = "TASK_ENGINE_LOG", global = true, default_value = "info")]
    pub log_level: LevelFilter,

    #[command(subcommand)]
    pub command: Command,
}

/// The filters of a bulk retry or cancel.
#[derive(Debug, clap::Args)]
pub struct Filter {
    /// Act on every task in this state that the other filters match: `failed` or
    /// `cancelled` for a retry, `waiting` for a cancel.
    #[arg(long)]
    status: Option<String>,
    /// Only tasks of this type.
    #[arg(long = "type", requires = "status")]
    task_type: Option<String>,
    /// Only tasks in this queue.
    #[arg(long, requires = "status")]
    queue: Option<String>,
    /// Only tasks last changed (failed, cancelled, inserted) at most this long ago: 1h, 2d.
    #[arg(long, requires = "status", value_parser = duration::parse)]
    since: Option<Duration>,
    /// Tasks changed per transaction.
    #[arg(long, default_value_t = 1000, requires = "status", value_parser = clap::value_parser!(i64).range(1..))]
    pub batch: i64,
}

impl Filter {
    pub fn task_filter(&self) -> Option<task_engine::TaskFilter> {
        Some(task_engine::TaskFilter {
            status: self.status.clone()?,
            task_type: self.task_type.clone(),
            queue: self.queue.clone(),
            since: self.since,
        })
    }
}

/// `--on-conflict`: [`OnConflict`], spelled for the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Conflict {
    Keep,
    Replace,
    ReplaceParams,
}

impl From<Conflict> for OnConflict {
    fn from(conflict: Conflict) -> Self {
        match conflict {
            Conflict::Keep => OnConflict::Keep,
            Conflict::Replace => OnConflict::Replace,
            Conflict::ReplaceParams => OnConflict::ReplaceParameters,
        }
    }
}

/// A queue's setting: a value, or `none` (clap reads an `Option` as an optional
/// argument).
#[derive(Debug, Clone, Copy)]
pub struct Setting<T>(Option<T>);

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Each queue with tasks or settings: waiting, due later, running, paused, limits,
    /// how long its oldest due task has waited.
    List,
    /// No instance claims from the queue until it is resumed (running tasks finish).
    Pause { queue: String },
    /// Claims from the queue again, and wakes the idle instances.
    Resume { queue: String },
    /// At most N of the queue's tasks run at once across every instance (`none`: no
    /// limit; 1 runs them one at a time, in order).
    Limit {
        queue: String,
        #[arg(value_parser = limit)]
        limit: Setting<u32>,
    },
    /// At most N tasks of one key run at once (`none`: no limit).
    KeyLimit {
        queue: String,
        #[arg(value_parser = limit)]
        limit: Setting<u32>,
    },
    /// At most N task starts per period across every instance: `100/1m`, `5/1s`
    /// (`none`: no limit).
    Rate {
        queue: String,
        #[arg(value_parser = rate)]
        rate: Setting<(u32, Duration)>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CronCommand {
    /// Adds a schedule (or changes the one of that name): a task of TYPE at each tick
    /// of CRON ("*/5 * * * *"; six fields: seconds first), each tick once across every
    /// instance.
    Add {
        name: String,
        cron: String,
        task_type: String,
        /// The task's parameters, as JSON.
        #[arg(long, default_value = "{}")]
        params: String,
        /// The time zone the expression is read in (an IANA name).
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// How many ticks missed while no instance ran to enqueue when one comes back
        /// (the most recent); 0 skips them.
        #[arg(long, default_value_t = 0)]
        catch_up: u32,
        /// The queue (default: the type's).
        #[arg(long)]
        queue: Option<String>,
        /// The tasks' priority.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
    },
    /// Lists the schedules, with their last and next tick.
    List,
    /// Removes a schedule (its tasks stay).
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Applies the schema's migrations (the same files `diesel migration run` applies).
    Migrate,
    /// Lists the registered task types.
    Tasks,
    /// Prints the database's URL (the embedded cluster's, started if it was not
    /// running, and left running; or `DATABASE_URL`, its password hidden), for psql or
    /// your own program.
    DbUrl,
    /// Enqueues tasks: prints the new task's id, or, with `--count`, how many were
    /// inserted and their ids' range (every id with `--ids`).
    Enqueue {
        /// The task type (see `engine tasks`).
        task_type: String,
        /// The parameters, as JSON.
        #[arg(long, default_value = "{}")]
        params: String,
        /// How many copies to insert (in one statement).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// With `--count`, print every new id, one a line.
        #[arg(long)]
        ids: bool,
        /// Run no earlier than this time (RFC 3339, e.g. 2026-12-01T09:00:00Z).
        #[arg(long, conflicts_with = "run_in", value_parser = parse_time)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// Run no earlier than this long from now (30s, 5m, 2h, 1d).
        #[arg(long = "in", value_parser = duration::parse)]
        run_in: Option<Duration>,
        /// Higher runs first among runnable tasks (default 0).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Attempts in all before the task fails for good (default: the type's).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        max_attempts: Option<i32>,
        /// The queue (default: the type's, `default` unless it declares one).
        #[arg(long)]
        queue: Option<String>,
        /// A key for fair dispatch within the queue (a tenant, a customer).
        #[arg(long)]
        key: Option<String>,
        /// At most one waiting task with this key: if one holds it, keep it (or see
        /// `--on-conflict`) and print its id.
        #[arg(long, conflicts_with = "count")]
        unique_key: Option<String>,
        /// With `--unique-key`: hold the key while the task runs too.
        #[arg(long, requires = "unique_key")]
        unique_while_running: bool,
        /// With `--unique-key`, what to do with a waiting task that holds the key: keep it,
        /// replace its parameters and due time (a debounce), or its parameters only.
        #[arg(long, requires = "unique_key", value_enum, default_value_t = Conflict::Keep)]
        on_conflict: Conflict,
        /// Each attempt's time limit (30s, 5m), overriding the type's.
        #[arg(long, value_parser = duration::parse)]
        timeout: Option<Duration>,
    },
    /// Lists queues, pauses and resumes one, sets its limits (taking effect at every
    /// instance's next claim).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Recurring tasks: adds, lists and removes schedules.
    #[command(subcommand)]
    Cron(CronCommand),
    /// Puts a failed or cancelled task back to waiting, keeping its history; or, with
    /// `--status`, every task the filters match (in batches).
    Retry {
        /// The task's id (or use the filters).
        #[arg(required_unless_present = "status", conflicts_with = "status")]
        id: Option<i64>,
        #[command(flatten)]
        filter: Filter,
    },
    /// Cancels a waiting task, or asks the instance running a task to stop it; or, with
    /// `--status waiting`, cancels every waiting task the filters match (in batches).
    Cancel {
        /// The task's id (or use the filters).
        #[arg(required_unless_present = "status", conflicts_with = "status")]
        id: Option<i64>,
        #[command(flatten)]
        filter: Filter,
    },
    /// Deletes finished tasks (stopped, failed, cancelled) older than a duration, with
    /// their executions, in bounded batches.
    Prune {
        /// Age of the last change beyond which a finished task goes (7d, 12h, ...).
        #[arg(long, value_parser = duration::parse)]
        older_than: Duration,
        /// Tasks deleted per transaction.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
        batch: i64,
    },
    /// Runs an engine instance until SIGINT or SIGTERM.
    Run {
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
        /// rescued; use the same value on every instance.
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
    },
    /// Shows tasks by type and status and the latest executions, or one task's history.
    Status {
        /// Show this task and every attempt at it.
        #[arg(long)]
        task: Option<i64>,
        /// How many recent executions to show.
        #[arg(long, default_value_t = 10)]
        recent: i64,
    },
    /// Measures the engine (see the README's Benchmarks section).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Runs a mix of the example tasks through the engine and prints a summary.
    Demo {
        /// Number of worker threads.
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
}

impl Cli {
    /// Returns the instance name `engine run` will use, for the log lines.
    fn instance_name(&self) -> Option<String> {
        match &self.command {
            Command::Run { instance, .. } => Some(instance.clone().unwrap_or_else(task_engine::default_instance_name)),
            Command::Demo { .. } => Some("demo".to_owned()),
            _ => None,
        }
    }
}

/// Sends log lines to stderr: time, level, instance, thread (`worker-N`), message.
pub fn setup_logging(cli: &Cli) {
    let instance = cli.instance_name().map(|name| format!("{name} ")).unwrap_or_default();
    let result = fern::Dispatch::new()
        .format(move |out, message, record| {
            let thread = std::thread::current();
            out.finish(format_args!(
                "{} {:<5} [{}{}] {}",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                record.level(),
                instance,
                thread.name().unwrap_or("main"),
                message
            ))
        })
        .level(cli.log_level)
        .chain(std::io::stderr())
        .apply();
    if let Err(error) = result {
        eprintln!("warning: logging not set up: {error}");
    }
}

/// Sends panic reports to the log at debug level: a task's panic is caught by its
/// worker and logged there once, with the task id, so the default report on stderr
/// would only say it twice.
pub fn route_panics_to_the_log() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let on_worker = std::thread::current().name().is_some_and(|name| name.starts_with("worker-"));
        if on_worker {
            log::debug!("{info}");
        } else {
            default_hook(info);
        }
    }));
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let registry = Registry::from_inventory()?;
    let data_dir = match &cli.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    let ctx = Context { registry, database_url: cli.database_url, data_dir };
    match cli.command {
        Command::Tasks => {
            for entry in ctx.registry.entries() {
                outln!("{}\t{}\tmax attempts {}", entry.name(), entry.rust_type(), entry.max_attempts());
            }
            Ok(())
        }
        Command::DbUrl => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            outln!("{}", task_engine::redact_url(db.url()));
            Ok(())
        }
        Command::Migrate => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let mut conn = db.connect()?;
            let applied = task_engine::run_migrations(&mut conn)?;
            if applied.is_empty() {
                outln!("the schema is up to date");
            }
            for name in applied {
                outln!("applied {name}");
            }
            Ok(())
        }
        Command::Enqueue {
            task_type,
            params,
            count,
            ids: print_ids,
            at,
            run_in,
            priority,
            max_attempts,
            queue,
            key,
            unique_key,
            unique_while_running,
            on_conflict,
            timeout,
        } => {
            // Check everything before touching the database: bad input inserts nothing.
            let parameters: serde_json::Value =
                serde_json::from_str(&params).map_err(|e| UsageError(format!("--params is not valid JSON: {e}")))?;
            let mut task = NewTask::from_json(&ctx.registry, &task_type, parameters)?.priority(priority);
            if let Some(at) = at {
                task = task.run_at(at);
            }
            if let Some(delay) = run_in {
                task = task.run_in(delay);
            }
            if let Some(max_attempts) = max_attempts {
                task = task.max_attempts(max_attempts);
            }
            if let Some(queue) = queue {
                task = task.queue(queue);
            }
            if let Some(key) = key {
                task = task.key(key);
            }
            if let Some(timeout) = timeout {
                task = task.timeout(timeout);
            }
            if let Some(unique_key) = unique_key {
                task = task.unique_key(unique_key).on_conflict(on_conflict.into());
                if unique_while_running {
                    task = task.unique_while_running();
                }
            }
            task.validate()?;
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let mut conn = db.connect_migrated()?;
            let ids = if count == 1 {
                let done = task.upsert(&mut conn)?;
                match done {
                    Upserted::Inserted(_) => {}
                    Upserted::Kept(id) => eprintln!("task {id} holds the unique key: kept as it is"),
                    Upserted::Replaced(id) => eprintln!("task {id} holds the unique key: its parameters replaced"),
                }
                vec![done.id()]
            } else {
                task.insert_copies(&mut conn, count)?
            };
            match (&ids[..], print_ids) {
                ([id], _) => outln!("{id}"),
                (_, true) => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for id in &ids {
                        use std::io::Write as _;
                        writeln!(out, "{id}")?;
                    }
                    use std::io::Write as _;
                    out.flush()?;
                }
                ([first, .., last], false) => {
                    let gaps = if last - first + 1 == ids.len() as i64 { "" } else { ", with gaps" };
                    outln!("{} tasks inserted, ids {first} to {last}{gaps} (--ids prints each)", ids.len());
                }
                ([], false) => {}
            }
            Ok(())
        }
        Command::Run {
            queues,
            workers,
            instance,
            poll_interval,
            lease,
            claim_buffer,
            max_queue_wait,
            summary_every,
            timeout_grace,
        } => {
            let workers = usize::from(workers);
            let all_workers = if queues.is_empty() { workers } else { queues.iter().map(|(_, w)| *w).sum() };
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            db.connect_migrated()?;
            log::info!("task crates linked in: {}", crate::task_crates::TASK_CRATES.join(", "));
            let runner = queues.into_iter().fold(Runner::new(db.url(), ctx.registry), |r, (q, w)| r.queue(q, w));
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
        Command::Status { task, recent } => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let mut conn = db.connect_migrated()?;
            match task {
                Some(id) => status::print_task(&mut conn, id),
                None => status::print_overview(&mut conn, &ctx.registry, recent),
            }
        }
        Command::Queue(command) => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let mut conn = db.connect_migrated()?;
            match command {
                QueueCommand::List => status::print_queues(&mut conn)?,
                QueueCommand::Pause { queue } => {
                    task_engine::pause_queue(&mut conn, &queue)?;
                    outln!("queue {queue} paused: no instance claims from it until `engine queue resume {queue}`");
                }
                QueueCommand::Resume { queue } => {
                    task_engine::resume_queue(&mut conn, &queue)?;
                    outln!("queue {queue} resumed");
                }
                QueueCommand::Limit { queue, limit: Setting(limit) } => {
                    task_engine::set_queue_concurrency(&mut conn, &queue, limit)?;
                    outln!("queue {queue}: {} at once", shown(limit));
                }
                QueueCommand::KeyLimit { queue, limit: Setting(limit) } => {
                    task_engine::set_queue_key_limit(&mut conn, &queue, limit)?;
                    outln!("queue {queue}: {} of one key at once", shown(limit));
                }
                QueueCommand::Rate { queue, rate: Setting(rate) } => {
                    task_engine::set_queue_rate_limit(&mut conn, &queue, rate)?;
                    match rate {
                        Some((n, per)) => outln!("queue {queue}: at most {n} starts per {per:?}"),
                        None => outln!("queue {queue}: no rate limit"),
                    }
                }
            }
            Ok(())
        }
        Command::Cron(command) => {
            let open = || Database::open(ctx.database_url.clone(), &ctx.data_dir);
            match command {
                CronCommand::Add { name, cron, task_type, params, tz, catch_up, queue, priority } => {
                    // Checked before the database is touched: bad input changes nothing.
                    let parameters: serde_json::Value = serde_json::from_str(&params)
                        .map_err(|e| UsageError(format!("--params is not valid JSON: {e}")))?;
                    let mut schedule =
                        task_engine::Schedule::from_json(&ctx.registry, name, cron, &task_type, parameters)?
                            .time_zone(&tz)?
                            .catch_up(catch_up)
                            .priority(priority);
                    if let Some(queue) = queue {
                        schedule = schedule.queue(queue);
                    }
                    let added = task_engine::add_schedule(&mut open()?.connect_migrated()?, &schedule)?;
                    outln!("schedule {} {}", schedule.name, if added { "added" } else { "changed" });
                }
                CronCommand::List => status::print_schedules(&mut open()?.connect_migrated()?)?,
                CronCommand::Remove { name } => {
                    if !task_engine::remove_schedule(&mut open()?.connect_migrated()?, &name)? {
                        return Err(UsageError(format!("there is no schedule {name:?}")).into());
                    }
                    outln!("schedule {name} removed");
                }
            }
            Ok(())
        }
        Command::Retry { id, filter } => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let mut conn = db.connect_migrated()?;
            match (id, filter.task_filter()) {
                (Some(id), _) => {
                    task_engine::retry(&mut conn, id)?;
                    outln!("task {id} is waiting again");
                }
                (None, Some(matching)) => {
                    let n = task_engine::retry_many(&mut conn, &matching, filter.batch)?;
                    outln!("{n} task(s) waiting again");
                }
                (None, None) => unreachable!("clap requires an id or --status"),
            }
            Ok(())
        }
        Command::Prune { older_than, batch } => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let deleted = task_engine::prune(&mut db.connect_migrated()?, older_than, batch)?;
            outln!("{deleted} finished task(s) deleted, with their executions");
            Ok(())
        }
        Command::Cancel { id: None, filter } => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            let matching = filter.task_filter().expect("clap requires an id or --status");
            let n = task_engine::cancel_many(&mut db.connect_migrated()?, &matching, filter.batch)?;
            outln!("{n} waiting task(s) cancelled");
            Ok(())
        }
        Command::Cancel { id: Some(id), .. } => {
            let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
            match task_engine::cancel(&mut db.connect_migrated()?, id)? {
                task_engine::Cancelled::Waiting => println!("task {id} cancelled: it will not run"),
                task_engine::Cancelled::Running => println!(
                    "task {id} is running: its instance is asked to stop it; it ends cancelled unless this attempt succeeds"
                ),
            }
            Ok(())
        }
        Command::Demo { workers } => demo::run(ctx.database_url, &ctx.data_dir, ctx.registry, workers),
        Command::Bench(bench) => bench::run(bench, ctx.database_url, &ctx.data_dir),
    }
}

/// Starts the signal thread: the first SIGINT or SIGTERM stops the instance
/// gracefully, a second one exits at once.
/// `.task_engine` in the nearest directory, from the current one up, that holds one or
/// `Cargo.lock` (the workspace's root), else here: the commands find the same cluster
/// from any directory of the workspace.
fn default_data_dir() -> anyhow::Result<PathBuf> {
    const NAME: &str = ".task_engine";
    let here = std::env::current_dir().context("could not read the current directory")?;
    // The first level up that has either: nothing above the workspace's root counts.
    let home = here.ancestors().find(|d| d.join(NAME).is_dir() || d.join("Cargo.lock").is_file()).unwrap_or(&here);
    Ok(home.join(NAME))
}

/// What an instance recorded between two readings of its counters, for a person.
fn summary(before: &task_engine::EngineStats, after: &task_engine::EngineStats, over: Duration) -> String {
    let recorded = after.completions - before.completions;
    let rate = recorded as f64 / over.as_secs_f64().max(1e-9);
    format!(
        "{recorded} attempts recorded ({rate:.1}/s): {} succeeded, {} failed and to be retried, {} failed for good; \
         {} tasks given back, {} rescued from dead instances",
        after.succeeded - before.succeeded,
        after.retried - before.retried,
        after.failed - before.failed,
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

/// A limit, or `none`.
fn limit(text: &str) -> Result<Setting<u32>, String> {
    if text == "none" {
        return Ok(Setting(None));
    }
    text.parse().map(|n| Setting(Some(n))).map_err(|_| format!("{text:?}: a number, or none"))
}

/// `N/PERIOD` (`100/1m`), or `none`.
fn rate(text: &str) -> Result<Setting<(u32, Duration)>, String> {
    if text == "none" {
        return Ok(Setting(None));
    }
    let (n, per) = text.split_once('/').ok_or("expected N/PERIOD, e.g. 100/1m, or none")?;
    let n: u32 = n.parse().map_err(|_| format!("{n:?} is not a number of starts"))?;
    let per = duration::parse(per)?;
    if n == 0 || per < Duration::from_millis(1) {
        return Err("at least 1 start per at least 1ms".into());
    }
    Ok(Setting(Some((n, per))))
}

/// A limit as a person reads it.
fn shown(limit: Option<u32>) -> String {
    limit.map_or_else(|| "no limit on how many run".to_owned(), |n| format!("at most {n}"))
}

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time (e.g. 2026-12-01T09:00:00Z): {e}"))
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
            "120 attempts recorded (2.0/s): 106 succeeded, 4 failed and to be retried, 10 failed for good; \
             2 tasks given back, 0 rescued from dead instances"
        );
    }
}
