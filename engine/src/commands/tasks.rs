//! `engine tasks`: the task types linked in.

use task_engine::TaskEntry;

use super::Context;
use crate::outln;

/// Prints each registered task type, a line each.
pub fn run(ctx: &Context) -> anyhow::Result<()> {
    for entry in ctx.registry.entries() {
        outln!("{}", line(entry));
    }
    Ok(())
}

/// A type's line, its fields separated by tabs: its name, its Rust type, its queue, its
/// attempts, its time limit per attempt.
fn line(entry: &TaskEntry) -> String {
    let timeout = entry.timeout().map_or_else(|| "no timeout".to_owned(), |t| format!("timeout {t:?}"));
    format!(
        "{}\t{}\tqueue {}\tmax attempts {}\t{timeout}",
        entry.name(),
        entry.rust_type(),
        entry.queue(),
        entry.max_attempts()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use task_engine::{Registry, Task, TaskContext, TaskError};

    use super::line;

    #[derive(Serialize, Deserialize)]
    struct Invoice {}

    impl Task for Invoice {
        const NAME: &'static str = "send_invoice";
        const QUEUE: &'static str = "invoices";
        const MAX_ATTEMPTS: i32 = 5;
        const TIMEOUT: Option<Duration> = Some(Duration::from_secs(90));
        type Output = ();

        fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[test]
    fn a_types_line_shows_its_queue_and_its_time_limit() {
        let mut registry = Registry::default();
        registry.register::<Invoice>().unwrap();
        let entry = registry.get("send_invoice").unwrap();
        let line = line(entry);
        assert!(line.starts_with("send_invoice\t"), "{line}");
        assert!(line.ends_with("\tqueue invoices\tmax attempts 5\ttimeout 90s"), "{line}");
    }
}
