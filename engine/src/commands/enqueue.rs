//! `engine enqueue`: a task, or copies of it, checked and then inserted.

use std::time::Duration;

use task_engine::{NewTask, OnConflict, Upserted};

use super::Context;
use crate::{duration, outln, UsageError};

#[derive(Debug, clap::Args)]
pub struct Args {
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
}

/// Checks the task against its type before the database is touched, then inserts it
/// (or its copies) and prints the ids.
pub fn run(args: Args, ctx: &Context) -> anyhow::Result<()> {
    let Args {
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
    } = args;
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
    let (_, mut conn) = ctx.open_migrated()?;
    let ids = if count == 1 {
        let done = task.upsert(&mut conn)?;
        match done {
            Upserted::Inserted(_) => {}
            Upserted::Kept(id) => eprintln!("task {id} holds the unique key: kept as it is"),
            Upserted::Replaced(id) => match on_conflict {
                Conflict::Replace => {
                    eprintln!("task {id} holds the unique key: replaced by this task, its due time too")
                }
                _ => {
                    eprintln!("task {id} holds the unique key: replaced by this task, its due time kept")
                }
            },
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

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time (e.g. 2026-12-01T09:00:00Z): {e}"))
}
