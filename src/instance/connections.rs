//! Where every part of an instance gets its connections, so that what an instance opens
//! is decided in this one place:
//!
//! - the pool, shared by the tasks' own queries (`ctx.connection()`), the timer's look
//!   for the next due time and the workers' records of abandoned attempts: by default
//!   one connection per worker, and two more (the timer, and a spare);
//! - a connection of its own, outside the pool, for each producer, the completer, the
//!   heartbeat, the vacuum and cron: their session settings (plans, lock waits) and
//!   session locks (the stripes, the instance's name) must stay theirs;
//! - the listener's raw `postgres` connection, which LISTEN needs.

use std::sync::Arc;
use std::time::Duration;

use diesel::PgConnection;

use crate::db::connect::{connect, connection_pool, redact_url, with_keepalives, PgPool};
use crate::error::Error;

/// An instance's way to its database.
#[derive(Clone)]
pub(crate) struct Connections {
    database_url: Arc<str>,
    pool: PgPool,
}

impl Connections {
    /// Uses `pool` if given, or opens one for `workers` workers (and fails at once if the
    /// database cannot be reached); fails too on a URL the listener could not use, before
    /// any part starts.
    pub(crate) fn open(database_url: &str, pool: Option<PgPool>, workers: usize) -> Result<Self, Error> {
        let pool = match pool {
            Some(pool) => pool,
            // The timer, the tasks' own queries, and a spare.
            None => connection_pool(database_url, u32::try_from(workers + 2).unwrap_or(u32::MAX))?,
        };
        let connections = Self { database_url: database_url.into(), pool };
        connections.listener("")?;
        Ok(connections)
    }

    /// The pool.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A new connection of a part's own, outside the pool.
    pub(crate) fn own(&self) -> Result<PgConnection, Error> {
        connect(&self.database_url)
    }

    /// A new connection of the heartbeat's own, on which a vanished server or network is
    /// noticed within about half a minute (TCP keepalives): the instance's name lock
    /// lives on it.
    pub(crate) fn own_kept_alive(&self) -> Result<PgConnection, Error> {
        connect(&with_keepalives(&self.database_url))
    }

    /// The settings of the listener's connection, named for `instance` in
    /// `pg_stat_activity`, with TCP keepalives; fails if the URL cannot be read.
    pub(crate) fn listener(&self, instance: &str) -> Result<postgres::Config, Error> {
        let mut config: postgres::Config =
            self.database_url.parse().map_err(|e| Error::Config(format!("bad database URL {}: {e}", self.server())))?;
        config
            .application_name(&format!("task_engine listener {instance}"))
            .connect_timeout(Duration::from_secs(5))
            // A server or network that vanishes without closing the socket is noticed
            // within about half a minute.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        Ok(config)
    }

    /// The server, as messages may name it: without a password.
    pub(crate) fn server(&self) -> String {
        redact_url(&self.database_url)
    }
}
