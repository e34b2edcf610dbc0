//! `engine cron`: adds, lists and removes the schedules of recurring tasks.

use clap::Subcommand;
use diesel::PgConnection;

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

/// The schedules, one a line, each column as wide as its widest value.
fn print_schedules(conn: &mut PgConnection) -> anyhow::Result<()> {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    };
    let header = ["SCHEDULE", "ORIGIN", "CRON", "TIME ZONE", "TYPE", "CATCH-UP", "LAST TICK", "NEXT TICK"];
    let rows: Vec<[String; 8]> = task_engine::list_schedules(conn)?
        .into_iter()
        .map(|s| {
            [
                plain(&s.schedule.name),
                s.declared_in
                    .map_or_else(|| "added by hand".to_owned(), |scope| format!("declared in {}", plain(&scope))),
                plain(&s.schedule.cron),
                plain(&s.schedule.time_zone),
                plain(&s.schedule.task_type),
                s.schedule.catch_up.to_string(),
                time(s.last_tick),
                s.error.map_or_else(|| time(s.next_tick), |e| format!("never: {}", plain(&e))),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let line = |values: [&str; 8]| {
        let cells: Vec<String> = values
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(column, (value, width))| match column {
                // The catch-up is a number: right-aligned. The last column is not padded.
                5 => format!("{value:>width$}"),
                7 => (*value).to_owned(),
                _ => format!("{value:<width$}"),
            })
            .collect();
        cells.join(" ")
    };
    outln!("{}", line(header));
    for row in &rows {
        outln!("{}", line(row.each_ref().map(String::as_str)));
    }
    Ok(())
}

/// Text from the database as it may be printed on a terminal: control characters
/// escaped, so that nothing read from a row can drive the terminal or break the table.
fn plain(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}
