//! `--status` and the filters that go with it: the tasks a bulk retry or cancel acts on.

use std::time::Duration;

use diesel::PgConnection;
use task_engine::{report, Registry};

use crate::duration;

/// The filters of a bulk retry or cancel.
#[derive(Debug, clap::Args)]
pub struct Filter {
    /// Act on every task in this state that the other filters match: `failed` or
    /// `cancelled` for a retry, `waiting` for a cancel.
    #[arg(long)]
    status: Option<String>,
    /// Only tasks of this type.
    #[arg(long = "type", requires = "status")]
    task_type: Option<String>,
    /// Only tasks in this queue.
    #[arg(long, requires = "status")]
    queue: Option<String>,
    /// Only tasks last changed (failed, cancelled, inserted) at most this long ago: 1h, 2d.
    #[arg(long, requires = "status", value_parser = duration::parse)]
    since: Option<Duration>,
    /// Tasks changed per transaction.
    #[arg(long, default_value_t = 1000, requires = "status", value_parser = clap::value_parser!(i64).range(1..))]
    pub batch: i64,
}

impl Filter {
    /// Returns the library's filter, or `None` without `--status` (an id was given).
    pub fn task_filter(&self) -> Option<task_engine::TaskFilter> {
        Some(task_engine::TaskFilter {
            status: self.status.clone()?,
            task_type: self.task_type.clone(),
            queue: self.queue.clone(),
            since: self.since,
        })
    }

    /// Warns on stderr when `--type` names a type that no task has and this engine
    /// does not know, or `--queue` a queue no task names: a typo, most likely. For a
    /// filter that matched nothing (one that matched needs no check).
    pub fn warn_if_unknown(&self, conn: &mut PgConnection, registry: &Registry) -> anyhow::Result<()> {
        if let Some(task_type) = &self.task_type {
            if registry.get(task_type).is_err() && !report::task_type_in_use(conn, task_type)? {
                eprintln!("warning: no task has type {task_type}, and this engine does not know it (a typo?)");
            }
        }
        if let Some(queue) = &self.queue {
            if !report::queue_in_use(conn, queue)? {
                eprintln!("warning: no task is in queue {queue} (a typo?)");
            }
        }
        Ok(())
    }
}
