//! The command line: the global flags and the subcommands (flags win over environment
//! variables), logging set-up, and the dispatch to `commands/`, where each subcommand
//! has a file.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::LevelFilter;
use task_engine::Registry;

use crate::bench;
use crate::commands::{cancel, cron, db_url, demo, enqueue, migrate, prune, queue, retry, run, status, tasks, Context};

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
    Enqueue(enqueue::Args),
    /// Lists queues, pauses and resumes one, sets its limits (taking effect at every
    /// instance's next claim), removes its settings. Warns about a queue nothing names.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Recurring tasks: adds, lists and removes schedules.
    #[command(subcommand)]
    Cron(cron::CronCommand),
    /// Puts a failed or cancelled task back to waiting, keeping its history; or, with
    /// `--status`, every task the filters match (in batches).
    Retry(retry::Args),
    /// Cancels a waiting task, or asks the instance running a task to stop it; or, with
    /// `--status waiting`, cancels every waiting task the filters match (in batches).
    Cancel(cancel::Args),
    /// Deletes finished tasks (stopped, failed, cancelled) older than a duration, with
    /// their executions, in bounded batches.
    Prune(prune::Args),
    /// Runs an engine instance until SIGINT or SIGTERM.
    Run(run::Args),
    /// Shows tasks by type and status and the latest executions, or one task's history.
    Status(status::Args),
    /// Measures the engine (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Runs a mix of the example tasks through the engine and prints a summary.
    Demo(demo::Args),
}

impl Cli {
    /// Returns the instance name `engine run` will use, for the log lines.
    fn instance_name(&self) -> Option<String> {
        match &self.command {
            Command::Run(args) => Some(args.instance_name()),
            Command::Demo(_) => Some("demo".to_owned()),
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

/// Builds what the subcommands share, then runs the one given.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let registry = Registry::from_inventory()?;
    let data_dir = match &cli.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    let ctx = Context { registry, database_url: cli.database_url, data_dir };
    match cli.command {
        Command::Migrate => migrate::run(&ctx),
        Command::Tasks => tasks::run(&ctx),
        Command::DbUrl => db_url::run(&ctx),
        Command::Enqueue(args) => enqueue::run(args, &ctx),
        Command::Queue(command) => queue::run(command, &ctx),
        Command::Cron(command) => cron::run(command, &ctx),
        Command::Retry(args) => retry::run(args, &ctx),
        Command::Cancel(args) => cancel::run(args, &ctx),
        Command::Prune(args) => prune::run(args, &ctx),
        Command::Run(args) => run::run(args, ctx),
        Command::Status(args) => status::run(args, &ctx),
        Command::Demo(args) => demo::run(args, ctx),
        Command::Bench(bench) => bench::run(bench, ctx.database_url, &ctx.data_dir),
    }
}

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
