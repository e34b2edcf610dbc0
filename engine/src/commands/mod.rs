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
pub mod table;
pub mod tasks;

use std::path::PathBuf;

use diesel::PgConnection;
use task_engine::Registry;

use crate::database::Database;

/// What the subcommands share: the task types linked in, and where the database is.
pub struct Context {
    /// The task types of every task crate linked in.
    pub registry: Registry,
    /// `--database-url` (or `DATABASE_URL`); unset: the embedded cluster.
    pub database_url: Option<String>,
    /// Where the embedded cluster lives.
    pub data_dir: PathBuf,
}

impl Context {
    /// Opens the database: `DATABASE_URL`, or the embedded cluster, created and started
    /// if need be.
    pub fn open(&self) -> anyhow::Result<Database> {
        Database::open(self.database_url.clone(), &self.data_dir)
    }

    /// Opens the database and connects to it, its schema up to date: the embedded
    /// cluster is migrated on the spot, a server of the user's only checked.
    pub fn open_migrated(&self) -> anyhow::Result<(Database, PgConnection)> {
        let db = self.open()?;
        let conn = db.connect_migrated()?;
        Ok((db, conn))
    }
}
