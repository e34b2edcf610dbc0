//! `engine status`: what the tables say, for a person. `engine queue list` and
//! `engine cron list` print a part of it.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::PgConnection;
use task_engine::models::TaskExecution;
use task_engine::{report, Registry};

use super::table::Align::{self, Left, Right};
use super::table::Table;
use super::Context;
use crate::{outln, UsageError};

/// Failed tasks listed by `engine status`.
const FAILED_SHOWN: i64 = 10;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show this task and every attempt at it.
    #[arg(long)]
    task: Option<i64>,
    /// How many recent executions to show.
    #[arg(long, default_value_t = 10)]
    recent: i64,
}

/// Prints the overview, or one task's history.
pub fn run(args: Args, ctx: &Context) -> anyhow::Result<()> {
    let Args { task, recent } = args;
    let (_, mut conn) = ctx.open_migrated()?;
    match task {
        Some(id) => print_task(&mut conn, id),
        None => print_overview(&mut conn, &ctx.registry, recent),
    }
}

/// Prints counts by type and state, the queues, the latest failed tasks with their
/// last error, the instances, then the latest executions.
pub fn print_overview(conn: &mut PgConnection, registry: &Registry, recent: i64) -> anyhow::Result<()> {
    const N: usize = report::STATES.len();
    let counts = report::status_counts(conn)?;
    let mut by_type: BTreeMap<&str, [i64; N]> = BTreeMap::new();
    let mut totals = [0i64; N];
    for row in &counts {
        if let Some(column) = report::STATES.iter().position(|s| *s == row.state) {
            by_type.entry(&row.task_class).or_default()[column] += row.count;
            totals[column] += row.count;
        }
    }
    let headers: Vec<(&str, Align)> = [("TYPE", Left)].into_iter().chain(report::STATES.map(|s| (s, Right))).collect();
    let mut table = Table::new(&headers);
    for (task_class, n) in &by_type {
        table.row([plain(task_class)].into_iter().chain(n.map(|c| c.to_string())).collect());
    }
    table.row(["(all)".to_owned()].into_iter().chain(totals.map(|c| c.to_string())).collect());
    table.print()?;
    // Instances claim only the types they know: tasks of other types wait.
    let unknown: Vec<String> = by_type
        .iter()
        .map(|(task_class, n)| (task_class, n[0] + n[1] + n[2]))
        .filter(|(task_class, waiting)| *waiting > 0 && registry.get(task_class).is_err())
        .map(|(task_class, waiting)| format!("{} ({waiting} waiting)", plain(task_class)))
        .collect();
    if !unknown.is_empty() {
        outln!("\ntypes this engine does not know (they wait for an instance that does): {}", unknown.join(", "));
    }

    outln!();
    print_queues(conn)?;
    if !task_engine::list_schedules(conn)?.is_empty() {
        outln!();
        print_schedules(conn)?;
    }

    let failed = report::failed_tasks(conn, FAILED_SHOWN)?;
    if !failed.is_empty() {
        outln!("\nfailed tasks, latest first (engine retry ID puts one back):");
        let mut table =
            Table::new(&[("TASK", Right), ("TYPE", Left), ("TRIES", Right), ("FAILED", Left), ("LAST ERROR", Left)]);
        for f in failed {
            let error = f.last_error.as_deref().map(plain).unwrap_or_else(|| "-".into());
            let error: String =
                if error.chars().count() > 100 { error.chars().take(99).chain(['…']).collect() } else { error };
            table.row(vec![
                f.id.to_string(),
                plain(&f.task_class),
                f.attempts.to_string(),
                f.failed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                error,
            ]);
        }
        table.print()?;
    }

    let instances = report::instances(conn)?;
    if !instances.is_empty() {
        outln!("\ninstances:");
        let mut table = Table::new(&[
            ("NAME", Left),
            ("HOST", Left),
            ("PID", Right),
            ("STARTED", Left),
            ("LAST SEEN", Left),
            ("RUNNING", Right),
            ("QUEUES", Left),
            ("CONNECTIONS", Left),
            ("STATE", Left),
        ]);
        for i in instances {
            // An older version's row does not say: it may run any queue.
            let queues = i.queues.map_or_else(|| "?".to_owned(), |q| plain(&q.join(",")));
            table.row(vec![
                plain(&i.name),
                plain(&i.host),
                i.pid.to_string(),
                i.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                format!("{:.1} s ago", i.silent_for),
                i.running.to_string(),
                queues,
                i.connections.unwrap_or_else(|| "?".to_owned()),
                if i.dead { "dead (silent past its lease; forgotten after ten)" } else { "live" }.to_owned(),
            ]);
        }
        table.print()?;
    }

    let executions = report::recent_executions(conn, recent)?;
    if executions.is_empty() {
        return Ok(());
    }
    outln!("\nlatest executions:");
    let mut table = executions_table("TYPE");
    for (execution, task_class) in executions {
        table.row(execution_row(&execution, &task_class));
    }
    table.print()
}

/// Prints one task and every attempt at it; an unknown id is a usage error.
pub fn print_task(conn: &mut PgConnection, id: i64) -> anyhow::Result<()> {
    // As text: a row the models cannot read (by hand, by another program) still shows.
    let Some((task, executions)) = report::task_shown(conn, id)? else {
        return Err(UsageError(format!("there is no task {id}")).into());
    };
    outln!("task {}: {}", task.id, plain(&task.task_class));
    // `stopped` is the series' word; other queues say succeeded (or completed).
    let succeeded = if task.status == "stopped" { " (succeeded)" } else { "" };
    outln!("  status       {}{succeeded}", task.status);
    outln!("  parameters   {}", plain(&task.task_parameters));
    outln!("  priority     {}", task.priority);
    outln!("  run at       {}", task.run_at);
    outln!("  attempts     {} of {}", task.attempts, task.max_attempts);
    outln!("  instance     {}", plain(task.instance.as_deref().unwrap_or("-")));
    if let Some(at) = task.cancel_requested_at {
        outln!("  cancel asked {at}");
    }
    if let Some(percent) = task.progress {
        outln!("  progress     {percent}% {}", plain(task.progress_message.as_deref().unwrap_or("")));
    }
    if let Some(key) = &task.unique_key {
        let scope = match task.unique_scope.as_str() {
            "running" => "held while waiting or running",
            "released" => "let go (it went back to waiting after a run, or was retried)",
            _ => "held while waiting",
        };
        outln!("  unique key   {} ({scope})", plain(key));
    }
    if let Some(checkpoint) = &task.checkpoint {
        outln!("  checkpoint   {}", plain(checkpoint));
    }
    outln!("  created      {}", task.created_at);
    outln!("  updated      {}", task.updated_at);
    if task.status == "running" {
        // A running attempt's execution is written when it ends; its start is the claim.
        outln!("  running      attempt {} since {} (recorded when it ends)", task.attempts, task.updated_at);
    }
    outln!("executions: {}", executions.len());
    if !executions.is_empty() {
        let mut table = executions_table("");
        for execution in &executions {
            table.row(execution_row(execution, ""));
        }
        table.print()?;
    }
    Ok(())
}

/// The table of executions, its type column headed `type_header`.
fn executions_table(type_header: &str) -> Table {
    Table::new(&[
        ("EXEC", Right),
        ("TASK", Right),
        (type_header, Left),
        ("TRY", Right),
        ("STARTED", Left),
        ("INSTANCE", Left),
        ("MS", Right),
        ("OUTCOME", Left),
    ])
}

/// An execution as a row of [`executions_table`]: where it ran is `instance/worker`,
/// `instance/-` for an attempt recorded as lost (which worker ran it died with its
/// instance).
fn execution_row(e: &TaskExecution, task_class: &str) -> Vec<String> {
    let ms = e
        .stopped_at
        .map(|stopped| format!("{:.3}", (stopped - e.started_at).num_microseconds().unwrap_or(0) as f64 / 1000.0))
        .unwrap_or_else(|| "-".to_owned());
    let outcome = match (&e.stopped_at, &e.error, &e.result) {
        (None, _, _) => "running".to_owned(),
        (Some(_), None, None) if e.snoozed_until.is_some() => {
            format!("snoozed until {}", e.snoozed_until.expect("checked").format("%Y-%m-%d %H:%M:%S%.3f"))
        }
        (Some(_), Some(error), _) if e.interrupted => format!("interrupted by its instance's stop: {}", plain(error)),
        (Some(_), Some(error), _) => format!("error: {}", plain(error)),
        (Some(_), None, Some(result)) => format!("ok: {result}"),
        (Some(_), None, None) => "ok".to_owned(),
    };
    let worker = if e.worker < 0 { "-".to_owned() } else { e.worker.to_string() };
    vec![
        e.id.to_string(),
        e.task_id.to_string(),
        plain(task_class),
        e.attempt.to_string(),
        e.started_at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        format!("{}/{worker}", plain(&e.instance)),
        ms,
        outcome,
    ]
}

/// Text from the database as it may be printed on a terminal: control characters
/// (an escape sequence in a type name inserted by SQL, a line feed in an error)
/// escaped, so that nothing read from a row can drive the terminal or break a table.
pub fn plain(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// The schedules of recurring tasks, with their last and next tick.
pub fn print_schedules(conn: &mut PgConnection) -> anyhow::Result<()> {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    };
    let mut table = Table::new(&[
        ("SCHEDULE", Left),
        ("ORIGIN", Left),
        ("CRON", Left),
        ("TIME ZONE", Left),
        ("TYPE", Left),
        ("CATCH-UP", Right),
        ("LAST TICK", Left),
        ("NEXT TICK", Left),
    ]);
    for s in task_engine::list_schedules(conn)? {
        table.row(vec![
            plain(&s.schedule.name),
            s.declared_in.map_or_else(|| "added by hand".to_owned(), |scope| format!("declared in {}", plain(&scope))),
            plain(&s.schedule.cron),
            plain(&s.schedule.time_zone),
            plain(&s.schedule.task_type),
            s.schedule.catch_up.to_string(),
            time(s.last_tick),
            s.error.map_or_else(|| time(s.next_tick), |e| format!("never: {}", plain(&e))),
        ]);
    }
    table.print()
}

/// The queues: what waits and runs in each, whether it is paused or held (a limit of
/// 0), its limits; and a note for a queue whose tasks wait where no live instance runs
/// it.
pub fn print_queues(conn: &mut PgConnection) -> anyhow::Result<()> {
    let mut table = Table::new(&[
        ("QUEUE", Left),
        ("WAITING", Right),
        ("LATER", Right),
        ("RUNNING", Right),
        ("STATE", Left),
        ("LIMIT", Right),
        ("PER KEY", Right),
        ("RATE", Left),
        ("OLDEST DUE", Left),
        ("NOTE", Left),
    ]);
    let or_dash = |n: Option<i32>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for q in report::queues(conn)? {
        let rate = match (q.rate_limit, q.rate_period_s) {
            (Some(n), Some(s)) => format!("{n}/{:?}", Duration::from_secs_f64(s)),
            _ => "-".to_owned(),
        };
        let oldest =
            q.oldest_due_s.map_or_else(|| "-".to_owned(), |s| format!("{:.1?}", Duration::from_secs_f64(s.max(0.0))));
        table.row(vec![
            plain(&q.name),
            q.waiting.to_string(),
            q.later.to_string(),
            q.running.to_string(),
            queue_state(&q).to_owned(),
            or_dash(q.concurrency),
            or_dash(q.key_concurrency),
            rate,
            oldest,
            if q.waiting > 0 && !q.served { "no live instance runs this queue" } else { "" }.to_owned(),
        ]);
    }
    table.print()
}

/// `paused`; `held (limit 0)` for a limit of 0, which holds the queue as a pause
/// does; else `active`.
fn queue_state(q: &report::QueueRow) -> &'static str {
    match (q.paused, q.concurrency) {
        (true, _) => "paused",
        (false, Some(0)) => "held (limit 0)",
        (false, _) => "active",
    }
}

#[cfg(test)]
mod tests {
    use super::plain;

    #[test]
    fn control_characters_from_the_database_are_printed_escaped() {
        assert_eq!(plain("send_email"), "send_email");
        assert_eq!(plain("red\u{1b}[31m\nline"), "red\\u{1b}[31m\\nline");
    }
}
