//! `engine cron`: adds, lists and removes the schedules of recurring tasks.

use clap::Subcommand;

use super::status::{plain, print_schedules};
use super::Context;
use crate::{outln, UsageError};

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
    /// Lists the schedules, with where each comes from (declared in code, or added by
    /// hand), their last and next tick.
    List,
    /// Removes a schedule (its tasks stay). One declared in code comes back at the next
    /// start of an instance of the newest code: remove it from the code instead.
    Remove { name: String },
}

/// Adds (after checking it), lists or removes a schedule.
pub fn run(command: CronCommand, ctx: &Context) -> anyhow::Result<()> {
    match command {
        CronCommand::Add { name, cron, task_type, params, tz, catch_up, queue, priority } => {
            // Checked before the database is touched: bad input changes nothing.
            let parameters: serde_json::Value =
                serde_json::from_str(&params).map_err(|e| UsageError(format!("--params is not valid JSON: {e}")))?;
            let mut schedule = task_engine::Schedule::from_json(&ctx.registry, name, cron, &task_type, parameters)?
                .time_zone(&tz)?
                .catch_up(catch_up)
                .priority(priority);
            if let Some(queue) = queue {
                schedule = schedule.queue(queue);
            }
            let (_, mut conn) = ctx.open_migrated()?;
            let added = task_engine::add_schedule(&mut conn, &schedule)?;
            outln!("schedule {} {}", schedule.name, if added { "added" } else { "changed" });
        }
        CronCommand::List => {
            let (_, mut conn) = ctx.open_migrated()?;
            print_schedules(&mut conn)?;
        }
        CronCommand::Remove { name } => {
            let (_, mut conn) = ctx.open_migrated()?;
            let declared_in = task_engine::list_schedules(&mut conn)?
                .into_iter()
                .find(|s| s.schedule.name == name)
                .and_then(|s| s.declared_in);
            if !task_engine::remove_schedule(&mut conn, &name)? {
                return Err(UsageError(format!("there is no schedule {name:?}")).into());
            }
            match declared_in {
                None => outln!("schedule {name} removed"),
                Some(scope) => outln!(
                    "schedule {name} removed; it is declared in code (in {}): the next instance of the newest code \
                     to start declares it again",
                    plain(&scope)
                ),
            }
        }
    }
    Ok(())
}
