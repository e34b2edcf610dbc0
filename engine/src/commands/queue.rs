//! `engine queue`: lists the queues, pauses and resumes one, sets its limits, removes
//! its settings. A setting for a queue nothing here knows is stored all the same (a
//! queue may be set up before its first task, by a program with types this binary does
//! not link), with a warning: it may be a typo.

use std::time::Duration;

use clap::Subcommand;
use diesel::PgConnection;
use task_engine::{report, Registry, DEFAULT_QUEUE};

use super::{status, Context};
use crate::{duration, outln, UsageError};

/// A queue's setting: a value, or `none` (clap reads an `Option` as an optional
/// argument).
#[derive(Debug, Clone, Copy)]
pub struct Setting<T>(Option<T>);

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Each queue with tasks or settings: waiting, due later, running, its state
    /// (active, paused, held by a limit of 0), limits, how long its oldest due task has
    /// waited, and a note when its tasks wait where no live instance runs it.
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
    /// Removes the queue's settings (pause, limits): its tasks are not touched, and
    /// run as those of any queue without settings (not paused, no limit). Exits 2 if
    /// the queue has no settings.
    Remove { queue: String },
}

/// Lists the queues, or changes one queue's setting and says what it is now.
pub fn run(command: QueueCommand, ctx: &Context) -> anyhow::Result<()> {
    let (_, mut conn) = ctx.open_migrated()?;
    match &command {
        QueueCommand::List | QueueCommand::Remove { .. } => {}
        QueueCommand::Pause { queue }
        | QueueCommand::Resume { queue }
        | QueueCommand::Limit { queue, .. }
        | QueueCommand::KeyLimit { queue, .. }
        | QueueCommand::Rate { queue, .. } => warn_if_unknown(&mut conn, &ctx.registry, queue)?,
    }
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
            if limit == Some(0) {
                outln!("queue {queue}: at most 0 at once: held, none of its tasks starts until the limit is raised");
            } else {
                outln!("queue {queue}: {} at once", shown(limit));
            }
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
        QueueCommand::Remove { queue } => {
            if !task_engine::remove_queue(&mut conn, &queue)? {
                return Err(UsageError(format!("queue {queue} has no settings to remove")).into());
            }
            outln!("queue {queue}: settings removed; its tasks, if any, run as those of a queue without settings");
        }
    }
    Ok(())
}

/// Warns on stderr about a queue that no task type linked here declares and that no
/// task or schedule names: a typo, or a queue set up ahead of its tasks.
fn warn_if_unknown(conn: &mut PgConnection, registry: &Registry, queue: &str) -> anyhow::Result<()> {
    let declared = queue == DEFAULT_QUEUE || registry.entries().any(|entry| entry.queue() == queue);
    if !declared && !report::queue_in_use(conn, queue)? {
        eprintln!(
            "warning: queue {queue}: no task type this engine knows declares it, and no task or schedule names it \
             (a typo?); the setting is stored all the same (`engine queue remove {queue}` removes it)"
        );
    }
    Ok(())
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
