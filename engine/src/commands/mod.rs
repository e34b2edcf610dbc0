//! What each subcommand does, a subcommand a file; what they share is here.

pub mod cancel;
pub mod cron;
pub mod db_url;
pub mod demo;
pub mod enqueue;
pub mod filter;
pub mod migrate;
pub mod prune;
pub mod queue;
pub mod retry;
pub mod run;
pub mod status;
pub mod tasks;

use std::path::PathBuf;

use task_engine::Registry;

/// What the subcommands share: the task types linked in, and where the database is.
pub struct Context {
    /// The task types of every task crate linked in.
    pub registry: Registry,
    /// `--database-url` (or `DATABASE_URL`); unset: the embedded cluster.
    pub database_url: Option<String>,
    /// Where the embedded cluster lives.
    pub data_dir: PathBuf,
}
