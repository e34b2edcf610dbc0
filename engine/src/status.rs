//! `engine status`: what the tables say, for a person.

use std::collections::BTreeMap;

use diesel::PgConnection;
use task_engine::models::{status, TaskExecution};
use task_engine::{report, Registry};

use crate::{outln, UsageError};

const STATES: [&str; 5] = [status::WAITING, status::RUNNING, status::STOPPED, status::FAILED, status::CANCELLED];

/// Prints counts by type and state, then the latest executions.
pub fn print_overview(conn: &mut PgConnection, registry: &Registry, recent: i64) -> anyhow::Result<()> {
    let counts = report::status_counts(conn)?;
    let mut by_type: BTreeMap<&str, [i64; 5]> = BTreeMap::new();
    let mut totals = [0i64; 5];
    for row in &counts {
        if let Some(column) = STATES.iter().position(|s| *s == row.status) {
            by_type.entry(&row.task_class).or_default()[column] += row.count;
            totals[column] += row.count;
        }
    }
    outln!("{:<16} {:>9} {:>9} {:>9} {:>9} {:>9}", "TYPE", STATES[0], STATES[1], STATES[2], STATES[3], STATES[4]);
    for (task_class, n) in &by_type {
        outln!("{:<16} {:>9} {:>9} {:>9} {:>9} {:>9}", plain(task_class), n[0], n[1], n[2], n[3], n[4]);
    }
    let t = totals;
    outln!("{:<16} {:>9} {:>9} {:>9} {:>9} {:>9}", "(all)", t[0], t[1], t[2], t[3], t[4]);
    // Instances claim only the types they know: tasks of other types wait.
    let unknown: Vec<String> = by_type
        .iter()
        .filter(|(task_class, n)| n[0] > 0 && registry.get(task_class).is_err())
        .map(|(task_class, n)| format!("{} ({} waiting)", plain(task_class), n[0]))
        .collect();
    if !unknown.is_empty() {
        outln!("\ntypes this engine does not know (they wait for an instance that does): {}", unknown.join(", "));
    }

    let instances = report::instances(conn)?;
    if !instances.is_empty() {
        outln!("\ninstances:");
        outln!("{:<24} {:<16} {:>8} {:<20} {:<20} {:>8}", "NAME", "HOST", "PID", "STARTED", "LAST SEEN", "RUNNING");
        for i in instances {
            outln!(
                "{:<24} {:<16} {:>8} {:<20} {:<20} {:>8}",
                plain(&i.name),
                plain(&i.host),
                i.pid,
                i.started_at.format("%Y-%m-%d %H:%M:%S"),
                format!("{:.1} s ago", i.silent_for),
                i.running
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
    outln!("  status       {}", task.status);
    outln!("  parameters   {}", plain(&task.task_parameters));
    outln!("  priority     {}", task.priority);
    outln!("  run at       {}", task.run_at);
    outln!("  attempts     {} of {}", task.attempts, task.max_attempts);
    outln!("  instance     {}", plain(task.instance.as_deref().unwrap_or("-")));
    if let Some(at) = task.cancel_requested_at {
        outln!("  cancel asked {at}");
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

#[cfg(test)]
mod tests {
    use super::plain;

    #[test]
    fn control_characters_from_the_database_are_printed_escaped() {
        assert_eq!(plain("send_email"), "send_email");
        assert_eq!(plain("red\u{1b}[31m\nline"), "red\\u{1b}[31m\\nline");
    }
}
