//! A fleet of `engine run` processes draining `journal` tasks through a transaction
//! pooler, for the fleet tests of `pooler.rs`: the processes (their logs in files), the
//! wait until each is idle, the drain watched from one connection of the test that
//! also samples the server's connections, and the judgment by the history and by the
//! tasks' own record (`task_journal`, as in `load.rs`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::BigInt;

/// How many `engine run` processes, and the workers of each.
pub const INSTANCES: usize = 20;
pub const WORKERS: usize = 4;

/// How often the server's connections are counted during the drain.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// How often the tasks left are counted (a scan of the table: not at every sample).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// A drain in which no task stops for this long has stalled: longer than a lease (30 s,
/// after which the attempts of a claim whose answer was lost are rescued) and a retry's
/// first wait (about 4 s), with room for a loaded machine.
const STALLED_AFTER: Duration = Duration::from_secs(90);

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap_or_else(|e| panic!("{sql}: {e}")).n
}

/// The `engine run` processes, killed if the test ends early.
pub struct Fleet {
    children: Vec<Child>,
    names: Vec<String>,
    /// Where each writes its log (`<name>.log`), kept after the test for a look.
    logs: PathBuf,
}

impl Fleet {
    /// Starts [`INSTANCES`] instances of [`WORKERS`] workers, named `<label>-<i>`, on
    /// `database_url`, their sessions on `listen_url` (none given: on `database_url`),
    /// polling only every hour, so that their wake-ups come from notifications. Their
    /// logs go to files under the target's temporary directory (`TASK_ENGINE_LOG` sets
    /// the level, as for any `engine`).
    pub fn start(label: &str, database_url: &str, listen_url: Option<&str>) -> Self {
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(label);
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).unwrap();
        let names: Vec<String> = (0..INSTANCES).map(|i| format!("{label}-{i}")).collect();
        let workers = WORKERS.to_string();
        let children = names
            .iter()
            .map(|name| {
                let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
                cmd.args(["run", "--workers", &workers, "--instance", name, "--poll-interval", "1h"])
                    .env("DATABASE_URL", database_url)
                    .env_remove("TASK_ENGINE_INSTANCE")
                    .env_remove("TASK_ENGINE_LISTEN_URL")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                if let Some(url) = listen_url {
                    cmd.args(["--listen-url", url]);
                }
                cmd.spawn().expect("engine run starts")
            })
            .collect();
        Self { children, names, logs }
    }

    /// Waits until every instance is registered and idle: its session holds the wake-up
    /// stripes, so that an insert notifies it.
    pub fn wait_until_idle(&mut self, conn: &mut PgConnection, within: Duration) {
        let deadline = Instant::now() + within;
        let names = self.names_sql();
        loop {
            self.assert_all_running();
            let registered =
                count(conn, &format!("SELECT count(*) AS n FROM task_engine_instances WHERE name IN ({names})"));
            let holding = count(
                conn,
                "SELECT count(DISTINCT a.application_name) AS n
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.mode = 'ShareLock' AND l.granted
                    AND a.datname = current_database() AND a.application_name LIKE 'task_engine session %'",
            );
            if registered == INSTANCES as i64 && holding == INSTANCES as i64 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {within:?}, {registered} of {INSTANCES} instances registered, {holding} idle (logs in {})",
                self.logs.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails unless every instance still runs.
    pub fn assert_all_running(&mut self) {
        for (child, name) in self.children.iter_mut().zip(&self.names) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{name} exited ({status}); its log: {}", self.logs.join(format!("{name}.log")).display());
            }
        }
    }

    /// Stops every instance with SIGTERM; each must exit 0.
    pub fn stop(mut self) {
        self.assert_all_running();
        for child in &self.children {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        }
        for (child, name) in self.children.iter_mut().zip(&self.names) {
            let status = child.wait().unwrap();
            assert_eq!(status.code(), Some(0), "{name} on SIGTERM; its log in {}", self.logs.display());
        }
    }

    /// Where the logs are.
    pub fn logs(&self) -> &std::path::Path {
        &self.logs
    }

    fn names_sql(&self) -> String {
        self.names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Creates the table the `journal` tasks write their runs into.
pub fn create_journal(conn: &mut PgConnection) {
    conn.batch_execute(
        "CREATE TABLE task_journal (task_id bigint NOT NULL, attempt int NOT NULL, instance text NOT NULL,
                                    started_at timestamptz NOT NULL, ended_at timestamptz,
                                    PRIMARY KEY (task_id, attempt))",
    )
    .unwrap();
}

/// What the drain showed.
pub struct Drained {
    /// From the insert's commit until the last task stopped.
    pub elapsed: Duration,
    /// How long the insert took.
    pub insert: Duration,
    /// The most client connections the server had on the database at once, the
    /// sampler's own left out.
    pub max_connections: i64,
}

/// Inserts `tasks` `journal` tasks in one SQL statement (no `engine enqueue`: the
/// trigger's notification alone wakes the instances), then, on the same connection,
/// counts the database's client connections every [`SAMPLE_EVERY`] and the tasks
/// stopped every [`PROGRESS_EVERY`], calling `during` with that count, until all have
/// stopped; fails after `within`, or once no task has stopped for [`STALLED_AFTER`].
pub fn insert_and_drain(
    conn: &mut PgConnection,
    fleet: &Fleet,
    tasks: i64,
    within: Duration,
    mut during: impl FnMut(i64),
) -> Drained {
    let started = Instant::now();
    diesel::sql_query(
        "INSERT INTO tasks (task_class, task_parameters) SELECT 'journal', '{\"ms\": 0}' FROM generate_series(1, $1)",
    )
    .bind::<BigInt, _>(tasks)
    .execute(conn)
    .unwrap();
    let insert = started.elapsed();
    let started = Instant::now();
    let deadline = started + within;
    let mut max_connections = 0;
    let mut progress_due = started;
    let mut last_progress = (0, started);
    loop {
        // Client backends only: autovacuum's workers are the server's own.
        let now = count(
            conn,
            "SELECT count(*) AS n FROM pg_stat_activity
              WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        );
        max_connections = max_connections.max(now);
        if Instant::now() >= progress_due {
            let stopped = count(conn, "SELECT count(*) AS n FROM tasks WHERE status = 'stopped'");
            if stopped == tasks {
                return Drained { elapsed: started.elapsed(), insert, max_connections };
            }
            if stopped != last_progress.0 {
                last_progress = (stopped, Instant::now());
            }
            let stalled = last_progress.1.elapsed() > STALLED_AFTER;
            if stalled || Instant::now() > deadline {
                let by_status = diesel::sql_query(
                    "SELECT coalesce(string_agg(status || ' ' || n, ', '), 'none') AS name
                       FROM (SELECT status, count(*) AS n FROM tasks GROUP BY status) s",
                )
                .get_result::<Name>(conn)
                .unwrap()
                .name;
                let why = if stalled { format!("none for {STALLED_AFTER:?}") } else { format!("after {within:?}") };
                panic!("{why}, {stopped} of {tasks} tasks stopped ({by_status}); logs in {}", fleet.logs().display());
            }
            during(stopped);
            progress_due = Instant::now() + PROGRESS_EVERY;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// The history and the tasks' own record, once the drain is over.
#[derive(Debug)]
pub struct Record {
    /// Attempts recorded (`task_executions`).
    pub executions: i64,
    /// Of which, failed: by the task (its database unreachable) or lost (rescued).
    pub failed: i64,
    /// Of which, lost (claimed, never run or never recorded by their instance).
    pub lost: i64,
}

/// Judges the drain of `tasks` tasks by `fleet`: every task stopped after running (by
/// its own record), every attempt recorded and closed by one of the fleet, and no two
/// runs of one task overlapping by the tasks' own record (every run of it ended).
pub fn judge(conn: &mut PgConnection, fleet: &Fleet, tasks: i64) -> Record {
    let names = fleet.names_sql();
    let stopped = count(conn, "SELECT count(*) AS n FROM tasks WHERE status = 'stopped'");
    assert_eq!(stopped, tasks, "tasks lost");
    let attempts = count(conn, "SELECT coalesce(sum(attempts), 0) AS n FROM tasks");
    let executions = count(conn, "SELECT count(*) AS n FROM task_executions");
    assert_eq!(executions, attempts, "an attempt is missing from the history (or one too many)");
    let mismatched = count(
        conn,
        "SELECT count(*) AS n FROM tasks t
          WHERE t.attempts <> (SELECT count(*) FROM task_executions e WHERE e.task_id = t.id)",
    );
    assert_eq!(mismatched, 0, "tasks whose attempts and executions disagree");
    let open = count(conn, "SELECT count(*) AS n FROM task_executions WHERE stopped_at IS NULL");
    assert_eq!(open, 0, "attempts never closed");
    let strangers = count(conn, &format!("SELECT count(*) AS n FROM task_executions WHERE instance NOT IN ({names})"));
    assert_eq!(strangers, 0, "attempts recorded without one of the fleet's names");
    let journaled = count(conn, "SELECT count(DISTINCT task_id) AS n FROM task_journal");
    assert_eq!(journaled, tasks, "tasks that never ran by their own record");
    let unended = count(conn, "SELECT count(*) AS n FROM task_journal WHERE ended_at IS NULL");
    assert_eq!(unended, 0, "runs that never ended by the tasks' own record (no instance was killed)");
    let overlapping = count(
        conn,
        "WITH runs AS (SELECT task_id, attempt, tstzrange(started_at, coalesce(ended_at, 'infinity')) AS span
                         FROM task_journal)
         SELECT count(*) AS n FROM runs a JOIN runs b ON a.task_id = b.task_id AND a.attempt < b.attempt
          WHERE a.span && b.span",
    );
    assert_eq!(overlapping, 0, "runs of one task overlapped, by the tasks' own record");
    let failed = count(conn, "SELECT count(*) AS n FROM task_executions WHERE error IS NOT NULL");
    let lost = count(conn, "SELECT count(*) AS n FROM task_executions WHERE error LIKE 'lost: %'");
    Record { executions, failed, lost }
}
