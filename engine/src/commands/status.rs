//! `engine status`: what the tables say, for a person. `engine queue list` and
//! `engine cron list` print a part of it.

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::PgConnection;
use task_engine::models::TaskExecution;
use task_engine::{report, Registry};

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
    let line = |name: &str, n: &[String]| {
        format!("{:<16} {}", name, n.iter().map(|c| format!("{c:>10}")).collect::<Vec<_>>().join(""))
    };
    outln!("{}", line("TYPE", &report::STATES.map(str::to_owned)));
    for (task_class, n) in &by_type {
        outln!("{}", line(&plain(task_class), &n.map(|c| c.to_string())));
    }
    outln!("{}", line("(all)", &totals.map(|c| c.to_string())));
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
        outln!("{:>8} {:<16} {:>5} {:<20}  LAST ERROR", "TASK", "TYPE", "TRIES", "FAILED");
        for f in failed {
            let error = f.last_error.as_deref().map(plain).unwrap_or_else(|| "-".into());
            let error: String =
                if error.chars().count() > 100 { error.chars().take(99).chain(['…']).collect() } else { error };
            outln!(
                "{:>8} {:<16} {:>5} {:<20}  {}",
                f.id,
                plain(&f.task_class),
                f.attempts,
                f.failed_at.format("%Y-%m-%d %H:%M:%S"),
                error
            );
        }
    }

    let instances = report::instances(conn)?;
    if !instances.is_empty() {
        outln!("\ninstances:");
        outln!(
            "{:<24} {:<16} {:>8} {:<20} {:<20} {:>8}  STATE",
            "NAME",
            "HOST",
            "PID",
            "STARTED",
            "LAST SEEN",
            "RUNNING"
        );
        for i in instances {
            outln!(
                "{:<24} {:<16} {:>8} {:<20} {:<20} {:>8}  {}",
                plain(&i.name),
                plain(&i.host),
                i.pid,
                i.started_at.format("%Y-%m-%d %H:%M:%S"),
                format!("{:.1} s ago", i.silent_for),
                i.running,
                if i.dead { "dead (silent past its lease; forgotten after ten)" } else { "live" }
            );
        }
    }

    let executions = report::recent_executions(conn, recent)?;
    if executions.is_empty() {
        return Ok(());
    }
    outln!("\nlatest executions:");
    outln!(
        "{:>8} {:>8} {:<10} {:>3} {:<24} {:<20} {:>10}  OUTCOME",
        "EXEC",
        "TASK",
        "TYPE",
        "TRY",
        "STARTED",
        "INSTANCE",
        "MS"
    );
    for (execution, task_class) in executions {
        print_execution(&execution, Some(&task_class))?;
    }
    Ok(())
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
        outln!(
            "{:>8} {:>8} {:<10} {:>3} {:<24} {:<20} {:>10}  OUTCOME",
            "EXEC",
            "TASK",
            "",
            "TRY",
            "STARTED",
            "INSTANCE",
            "MS"
        );
    }
    for execution in &executions {
        print_execution(execution, None)?;
    }
    Ok(())
}

fn print_execution(e: &TaskExecution, task_class: Option<&str>) -> anyhow::Result<()> {
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
    outln!(
        "{:>8} {:>8} {:<10} {:>3} {:<24} {:<20} {:>10}  {}",
        e.id,
        e.task_id,
        plain(task_class.unwrap_or("")),
        e.attempt,
        e.started_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        format!("{}/{}", plain(&e.instance), e.worker),
        ms,
        outcome
    );
    Ok(())
}

/// Text from the database as it may be printed on a terminal: control characters
/// (an escape sequence in a type name inserted by SQL, a line feed in an error)
/// escaped, so that nothing read from a row can drive the terminal or break a table.
fn plain(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// The schedules of recurring tasks, with their last and next tick.
pub fn print_schedules(conn: &mut PgConnection) -> anyhow::Result<()> {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    };
    outln!(
        "{:<20} {:<16} {:<16} {:<16} {:>8} {:<23} NEXT TICK",
        "SCHEDULE",
        "CRON",
        "TIME ZONE",
        "TYPE",
        "CATCH-UP",
        "LAST TICK"
    );
    for s in task_engine::list_schedules(conn)? {
        outln!(
            "{:<20} {:<16} {:<16} {:<16} {:>8} {:<23} {}",
            plain(&s.schedule.name),
            plain(&s.schedule.cron),
            plain(&s.schedule.time_zone),
            plain(&s.schedule.task_type),
            s.schedule.catch_up,
            time(s.last_tick),
            s.error.map_or_else(|| time(s.next_tick), |e| format!("never: {}", plain(&e)))
        );
    }
    Ok(())
}

/// The queues: what waits and runs in each, paused or not, its limits.
pub fn print_queues(conn: &mut PgConnection) -> anyhow::Result<()> {
    let queues = report::queues(conn)?;
    outln!(
        "{:<20} {:>9} {:>9} {:>9} {:<7} {:>7} {:>7} {:<14} OLDEST DUE",
        "QUEUE",
        "WAITING",
        "LATER",
        "RUNNING",
        "STATE",
        "LIMIT",
        "PER KEY",
        "RATE"
    );
    let or_dash = |n: Option<i32>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for q in queues {
        let rate = match (q.rate_limit, q.rate_period_s) {
            (Some(n), Some(s)) => format!("{n}/{:?}", Duration::from_secs_f64(s)),
            _ => "-".to_owned(),
        };
        let oldest =
            q.oldest_due_s.map_or_else(|| "-".to_owned(), |s| format!("{:.1?}", Duration::from_secs_f64(s.max(0.0))));
        outln!(
            "{:<20} {:>9} {:>9} {:>9} {:<7} {:>7} {:>7} {:<14} {}",
            plain(&q.name),
            q.waiting,
            q.later,
            q.running,
            if q.paused { "paused" } else { "active" },
            or_dash(q.concurrency),
            or_dash(q.key_concurrency),
            rate,
            oldest
        );
    }
    Ok(())
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
