//! `engine cancel`: a waiting task, a running one (its instance is asked to stop it),
//! or every waiting task the filters match.

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

/// Cancels the task, or each waiting task the filters match, and says what became of it.
pub fn run(args: Args, ctx: &Context) -> anyhow::Result<()> {
    match args {
        Args { id: None, filter } => {
            let (_, mut conn) = ctx.open_migrated()?;
            let matching = filter.task_filter().expect("clap requires an id or --status");
            let n = task_engine::cancel_many(&mut conn, &matching, filter.batch)?;
            outln!("{n} waiting task(s) cancelled");
            if n == 0 {
                filter.warn_if_unknown(&mut conn, &ctx.registry)?;
            }
            Ok(())
        }
        Args { id: Some(id), .. } => {
            let (_, mut conn) = ctx.open_migrated()?;
            match task_engine::cancel(&mut conn, id)? {
                task_engine::Cancelled::Waiting => outln!("task {id} cancelled: it will not run"),
                task_engine::Cancelled::Running => outln!(
                    "task {id} is running: its instance is asked to stop it; it ends cancelled unless this attempt succeeds"
                ),
            }
            Ok(())
        }
    }
}
