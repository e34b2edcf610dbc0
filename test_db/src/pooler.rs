//! The test server seen through PgBouncer in transaction pool mode: started on first
//! use, once per test process, in front of the private cluster; stopped when the
//! process exits.

use std::sync::OnceLock;

use pg_cluster::Bouncer;

use crate::{server, temp_dir, with_database, TestDatabase};

fn pooler() -> &'static Result<Bouncer, String> {
    static POOLER: OnceLock<Result<Bouncer, String>> = OnceLock::new();
    POOLER.get_or_init(|| {
        Bouncer::find_program()?;
        let Some(cluster) = &server().cluster else {
            return Err("TEST_DATABASE_URL is set: the tests through PgBouncer run on the private cluster only".into());
        };
        Bouncer::start(&temp_dir(), cluster.port(), cluster.user())
            .map_err(|e| format!("could not start pgbouncer: {e}"))
    })
}

/// Why tests cannot run through PgBouncer here, if they cannot: no `pgbouncer` on this
/// machine (CI always has it: `.ci/run` installs it), or a `TEST_DATABASE_URL`. Such
/// tests say so and pass.
pub fn pooler_unavailable() -> Option<String> {
    pooler().as_ref().err().cloned()
}

impl TestDatabase {
    /// The database's URL through PgBouncer in transaction pool mode (a pool of
    /// [`pg_cluster::POOL_SIZE`] server connections per database): consecutive
    /// transactions of one client may run on different server connections. Panics if
    /// [`pooler_unavailable`] says why not.
    pub fn pooled_url(&self) -> String {
        let pooler = pooler().as_ref().unwrap_or_else(|why| panic!("no pooler: {why}"));
        let direct = &server().base_url;
        let port = server().cluster.as_ref().expect("a private cluster").port();
        let url = direct.replacen(&format!(":{port}/"), &format!(":{}/", pooler.port()), 1);
        assert_ne!(&url, direct, "the test server's URL names its port");
        with_database(&url, self.name())
    }
}
