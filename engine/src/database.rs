//! Which database a command uses: `DATABASE_URL`, or the embedded default, a private
//! PostgreSQL cluster under the data directory that is created and started on first
//! use and left running for the next command.

use std::path::Path;

use anyhow::{bail, Context as _};
use diesel::connection::CacheSize;
use diesel::RunQueryDsl;
use diesel::{Connection as _, PgConnection};
use pg_cluster::{quote_identifier, Cluster, ClusterOptions};
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
        let created = !data_dir.join("PG_VERSION").exists();
        let mut cluster = Cluster::init_or_open(&data_dir, options)?;
        let stop = format!(
            "{}{} -D {} stop",
            if cluster.runs_as_postgres() { "runuser -u postgres -- " } else { "" },
            cluster.bin_dir().join("pg_ctl").display(),
            data_dir.display()
        );
        if created {
            // Said whatever the log level: a new cluster (a command run outside the
            // workspace, say) is a second database the user may not expect.
            eprintln!(
                "note: created a new embedded PostgreSQL cluster in {} (DATABASE_URL is unset; --data-dir or \
                 TASK_ENGINE_DATA_DIR chooses another directory); it keeps running after each command but `demo` \
                 and `bench`: stop it with `{stop}`",
                data_dir.display()
            );
        }
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
                 stop it with `{stop}`",
                data_dir.display(),
                cluster.port(),
            );
        }
        Ok(Self { url, embedded: Some(Embedded { cluster, started_here }) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connects, with an error that names the server without its password; the
    /// connection keeps no prepared statement between statements, so that a command
    /// works through a transaction pooler (PgBouncer in transaction mode), where each
    /// transaction may run on another server connection, which the previous client may
    /// have left its own statements on. Diesel then sends each statement unnamed, with
    /// its parameters, in one round trip.
    pub fn connect(&self) -> anyhow::Result<PgConnection> {
        let mut conn = task_engine::connect(&self.url)?;
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        Ok(conn)
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

    /// Drops the demo's own database, `<this database>_demo` on the same server, if an
    /// earlier demo left it, creates it afresh and migrates it; returns its URL. The
    /// demo's tasks stay out of this database (an instance running on it would take
    /// them) and an interrupted demo's leftovers go with the next demo. Its DROP
    /// fails, changing nothing, while a session uses that database; its CREATE copies
    /// `template1`.
    pub fn fresh_demo_database(&self) -> anyhow::Result<String> {
        #[derive(diesel::QueryableByName)]
        struct Current {
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
        }
        let mut conn = self.connect()?;
        let current: Current = diesel::sql_query("SELECT current_database() AS name").get_result(&mut conn)?;
        let demo = format!("{}_demo", current.name);
        let server = redact_url(&self.url);
        log::info!("the demo's own database, {demo}: made afresh");
        diesel::sql_query(format!("DROP DATABASE IF EXISTS {}", quote_identifier(&demo)))
            .execute(&mut conn)
            .with_context(|| format!("could not drop the database {demo} of an earlier demo on {server}"))?;
        diesel::sql_query(format!("CREATE DATABASE {}", quote_identifier(&demo))).execute(&mut conn).with_context(
            || {
                format!(
                    "could not create the demo's database {demo} on {server}: the demo runs in a database of its \
                     own, on a server where it may create one (unset DATABASE_URL for the embedded cluster)"
                )
            },
        )?;
        let url = with_database(&self.url, &demo);
        task_engine::run_migrations(&mut task_engine::connect(&url)?)?;
        Ok(url)
    }

    /// Whether this is the embedded cluster and this command started it.
    pub fn is_embedded_started_here(&self) -> bool {
        matches!(self.embedded, Some(Embedded { started_here: true, .. }))
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

/// `url` with its database replaced by `database`: a URL's path, or a key=value
/// string's `dbname` (libpq takes the last value of a key).
fn with_database(url: &str, database: &str) -> String {
    let url = url.trim();
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname='{}'", database.replace('\\', "\\\\").replace('\'', "\\'"));
    };
    let start = scheme_end + 3;
    let authority_end = start + url[start..].find(['/', '?']).unwrap_or(url.len() - start);
    let query = url[authority_end..].find('?').map_or("", |q| &url[authority_end + q..]);
    let encoded: String = database
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("{}/{encoded}{query}", &url[..authority_end])
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

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_demos_database_is_named_in_either_form_of_connection_string() {
        assert_eq!(
            with_database("postgres://u:p@h:5/app?sslmode=disable", "app_demo"),
            "postgres://u:p@h:5/app_demo?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "a b"), "postgres://h/a%20b");
        assert_eq!(with_database("host=h dbname=app", "app_demo"), "host=h dbname=app dbname='app_demo'");
        assert_eq!(with_database("host=h", "it's"), "host=h dbname='it\\'s'");
    }
}
