//! The test server seen through PgBouncer in transaction pool mode: started on first
//! use, once per test process, in front of the private cluster; stopped when the
//! process exits. A test that kills and restarts its pooler takes one of its own
//! ([`TestDatabase::own_pooler`]).

use std::sync::OnceLock;

use pg_cluster::Bouncer;

use crate::{server, temp_dir, with_database, TestDatabase};

fn pooler() -> &'static Result<Bouncer, String> {
    static POOLER: OnceLock<Result<Bouncer, String>> = OnceLock::new();
    POOLER.get_or_init(|| {
        Bouncer::find_program()?;
        let cluster = private_cluster()?;
        Bouncer::start(&temp_dir(), cluster.port(), cluster.user())
            .map_err(|e| format!("could not start pgbouncer: {e}"))
    })
}

fn private_cluster() -> Result<&'static pg_cluster::Cluster, String> {
    server()
        .cluster
        .as_ref()
        .ok_or_else(|| "TEST_DATABASE_URL is set: the tests through PgBouncer run on the private cluster only".into())
}

/// Why tests cannot run through PgBouncer here, if they cannot: no `pgbouncer` on this
/// machine (CI always has it: `.ci/run` installs it), or a `TEST_DATABASE_URL`. Such
/// tests say so and pass.
pub fn pooler_unavailable() -> Option<String> {
    pooler().as_ref().err().cloned()
}

/// `database`'s URL through a pooler listening on `port`.
fn url_through(port: u16, database: &str) -> String {
    let direct = &server().base_url;
    let server_port = server().cluster.as_ref().expect("a private cluster").port();
    let url = direct.replacen(&format!(":{server_port}/"), &format!(":{port}/"), 1);
    assert_ne!(&url, direct, "the test server's URL names its port");
    with_database(&url, database)
}

impl TestDatabase {
    /// The database's URL through PgBouncer in transaction pool mode (a pool of
    /// [`pg_cluster::POOL_SIZE`] server connections per database): consecutive
    /// transactions of one client may run on different server connections. Panics if
    /// [`pooler_unavailable`] says why not.
    pub fn pooled_url(&self) -> String {
        let pooler = pooler().as_ref().unwrap_or_else(|why| panic!("no pooler: {why}"));
        url_through(pooler.port(), self.name())
    }

    /// A PgBouncer of this test's own, like the one of [`TestDatabase::pooled_url`]
    /// (transaction pool mode, [`pg_cluster::POOL_SIZE`]), in front of the same server:
    /// one the test may kill and restart without disturbing the others. Stopped when
    /// dropped. Panics if [`pooler_unavailable`] says why not.
    pub fn own_pooler(&self) -> OwnPooler {
        if let Some(why) = pooler_unavailable() {
            panic!("no pooler: {why}");
        }
        let cluster = private_cluster().unwrap_or_else(|why| panic!("no pooler: {why}"));
        let bouncer = Bouncer::start(&temp_dir(), cluster.port(), cluster.user())
            .unwrap_or_else(|e| panic!("could not start pgbouncer: {e}"));
        OwnPooler { url: url_through(bouncer.port(), self.name()), bouncer }
    }
}

/// A test's own PgBouncer in front of its database ([`TestDatabase::own_pooler`]).
pub struct OwnPooler {
    bouncer: Bouncer,
    url: String,
}

impl OwnPooler {
    /// The database's URL through it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills it with SIGKILL: every connection through it is cut at once.
    pub fn kill(&mut self) {
        self.bouncer.kill().expect("kill the test's pgbouncer");
    }

    /// Starts it again, on the same port; returns once it accepts connections.
    pub fn restart(&mut self) {
        self.bouncer.restart().unwrap_or_else(|e| panic!("restart the test's pgbouncer: {e}"));
    }

    /// Its directory: configuration and log (`pgbouncer.log`).
    pub fn dir(&self) -> &std::path::Path {
        self.bouncer.dir()
    }
}
