//! Which database a command uses: `DATABASE_URL`, or the embedded default, a private
//! PostgreSQL cluster under the data directory that is created and started on first
//! use and left running for the next command.

use std::path::Path;

use anyhow::{bail, Context as _};
use diesel::PgConnection;
use pg_cluster::{Cluster, ClusterOptions};
use task_engine::redact_url;

use crate::UsageError;

/// The embedded cluster's database.
const EMBEDDED_DATABASE: &str = "task_engine";

pub struct Database {
    url: String,
    /// The embedded cluster, when there is no `DATABASE_URL`.
    embedded: Option<Embedded>,
}

struct Embedded {
    cluster: Cluster,
    /// Whether this command started it (it was not running before).
    started_here: bool,
}

impl Database {
    /// Uses `url`, or else the embedded cluster under `data_dir`, started if needed.
    pub fn open(url: Option<String>, data_dir: &Path) -> anyhow::Result<Self> {
        if let Some(url) = url.filter(|u| !u.trim().is_empty()) {
            check_form(&url)?;
            return Ok(Self { url, embedded: None });
        }
        let data_dir = std::path::absolute(data_dir.join("pg"))
            .with_context(|| format!("bad data directory {}", data_dir.display()))?;
        // Commit timestamps let `bench latency` time a pickup from the enqueue's
        // commit as the server saw it.
        let options = ClusterOptions {
            settings: vec![("track_commit_timestamp".into(), "on".into())],
            ..ClusterOptions::default()
        };
        let mut cluster = Cluster::init_or_open(&data_dir, options)?;
        let started_here = !cluster.is_running();
        // The same port at every start of this directory (unless another server took
        // it), so that a URL written down once keeps working.
        cluster.prefer_port(preferred_port(&data_dir));
        cluster.start()?;
        cluster.create_database_if_missing(EMBEDDED_DATABASE)?;
        let url = cluster.url(EMBEDDED_DATABASE);
        if started_here {
            let as_postgres = if cluster.runs_as_postgres() { "runuser -u postgres -- " } else { "" };
            log::info!(
                "embedded PostgreSQL started: {} on port {}; its URL: {url}; psql: `{as_postgres}psql {url}`; \
                 stop it with `{as_postgres}pg_ctl -D {} stop`",
                data_dir.display(),
                cluster.port(),
                data_dir.display()
            );
        }
        Ok(Self { url, embedded: Some(Embedded { cluster, started_here }) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects, with an error that names the server without its password.
    pub fn connect(&self) -> anyhow::Result<PgConnection> {
        Ok(task_engine::connect(&self.url)?)
    }

    /// Connects and makes sure the schema is there: the embedded cluster is migrated
    /// on the spot; a server of the user's is never changed unasked.
    pub fn connect_migrated(&self) -> anyhow::Result<PgConnection> {
        let mut conn = self.connect()?;
        if self.embedded.is_some() {
            task_engine::run_migrations(&mut conn)?;
            return Ok(conn);
        }
        let pending = task_engine::pending_migrations(&mut conn)?;
        if !pending.is_empty() {
            bail!(
                "the database at {} lacks {} migration(s) ({}): run `engine migrate` first",
                redact_url(&self.url),
                pending.len(),
                pending.join(", ")
            );
        }
        Ok(conn)
    }

    /// Stops the embedded cluster if this command started it.
    pub fn stop_if_started_here(&self) -> anyhow::Result<()> {
        if let Some(Embedded { cluster, started_here: true }) = &self.embedded {
            cluster.stop()?;
            log::info!("embedded PostgreSQL stopped");
        }
        Ok(())
    }
}

/// Refuses (exit 2) a connection string of neither form libpq reads, saying what it
/// was given (its password hidden); libpq judges the rest when it connects.
fn check_form(url: &str) -> anyhow::Result<()> {
    let url = url.trim();
    let is_url = ["postgres://", "postgresql://"].iter().any(|scheme| url.starts_with(scheme));
    let is_key_value = !url.contains("://") && url.contains('=');
    if !is_url && !is_key_value {
        return Err(UsageError(format!(
            "DATABASE_URL (or --database-url) is neither a URL (postgres://user:password@host:port/database) \
             nor key=value pairs (host=... dbname=...): {}",
            redact_url(url)
        ))
        .into());
    }
    Ok(())
}

/// A port in 20000-29999 that depends only on the data directory's path.
fn preferred_port(data_dir: &Path) -> u16 {
    // FNV-1a: the same value from one build (and Rust version) to the next.
    let hash = data_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    20_000 + (hash % 10_000) as u16
}
