//! `engine retry`: a failed or cancelled task, or every one the filters match, back to
//! waiting.

use super::filter::Filter;
use super::Context;
use crate::outln;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The task's id (or use the filters).
    #[arg(required_unless_present = "status", conflicts_with = "status")]
    id: Option<i64>,
    #[command(flatten)]
    filter: Filter,
}

/// Puts the task, or each task the filters match, back to waiting.
pub fn run(args: Args, ctx: &Context) -> anyhow::Result<()> {
    let Args { id, filter } = args;
    let (_, mut conn) = ctx.open_migrated()?;
    match (id, filter.task_filter()) {
        (Some(id), _) => {
            task_engine::retry(&mut conn, id)?;
            outln!("task {id} is waiting again");
        }
        (None, Some(matching)) => {
            let n = task_engine::retry_many(&mut conn, &matching, filter.batch)?;
            outln!("{n} task(s) waiting again");
            if n == 0 {
                filter.warn_if_unknown(&mut conn, &ctx.registry)?;
            }
        }
        (None, None) => unreachable!("clap requires an id or --status"),
    }
    Ok(())
}
