//! `engine queue`: lists the queues, pauses and resumes one, sets its limits.

use std::time::Duration;

use clap::Subcommand;

use super::{status, Context};
use crate::{duration, outln};

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

/// Lists the queues, or changes one queue's setting and says what it is now.
pub fn run(command: QueueCommand, ctx: &Context) -> anyhow::Result<()> {
    let (_, mut conn) = ctx.open_migrated()?;
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
