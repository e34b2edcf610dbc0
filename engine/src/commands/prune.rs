//! `engine prune`: deletes old finished tasks with their executions.

use std::time::Duration;

use super::Context;
use crate::{duration, outln};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Age of the last change beyond which a finished task goes (7d, 12h, ...).
    #[arg(long, value_parser = duration::parse)]
    older_than: Duration,
    /// Tasks deleted per transaction.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
    batch: i64,
}

/// Deletes the finished tasks older than `--older-than`, in batches, and says how many.
pub fn run(args: Args, ctx: &Context) -> anyhow::Result<()> {
    let Args { older_than, batch } = args;
    let (_, mut conn) = ctx.open_migrated()?;
    let deleted = task_engine::prune(&mut conn, older_than, batch)?;
    outln!("{deleted} finished task(s) deleted, with their executions");
    Ok(())
}
