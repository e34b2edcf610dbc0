//! The load scenario of the fault issue, ignored by default (about a minute on two
//! cores): 100,000 tasks across 4 `engine run` processes of 8 workers, one killed with
//! SIGKILL a fifth of the way and restarted under its name. Among them, 8 tasks that
//! sleep for 30 s become due after 1 s, ahead of the rest: the instance killed is one
//! that runs one of them, so that the kill surely takes attempts with it (30 s: a
//! fifth of the way comes after about 20 s on two cores, and 10 s tasks had all ended
//! by then in some runs). The tasks are
//! `journal` tasks: each writes its own start and end into `task_journal`, and overlaps
//! are judged by that record (a run of the killed instance ended, at the latest, when
//! it was killed).
//!
//! cargo test --release -p engine --test load -- --ignored --nocapture

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use test_db::TestDatabase;

const TASKS: u32 = 100_000;
/// Of which, tasks that sleep.
const SLEEPS: u32 = 8;

fn spawn(db: &TestDatabase, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["run", "--workers", "8", "--instance", name, "--lease", "5s", "--poll-interval", "1h"])
        .env("DATABASE_URL", db.url())
        .env("TASK_ENGINE_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("engine run starts")
}

/// The `engine run` processes, killed if the test ends early.
struct Instances(Vec<Child>);

impl Drop for Instances {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

#[test]
#[ignore = "load scenario, about a minute: run with --ignored"]
fn a_hundred_thousand_tasks_four_instances_one_killed_and_restarted() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "CREATE TABLE task_journal (task_id bigint NOT NULL, attempt int NOT NULL, instance text NOT NULL,
                                    started_at timestamptz NOT NULL, ended_at timestamptz,
                                    PRIMARY KEY (task_id, attempt))",
    )
    .unwrap();
    let enqueue = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_engine")).args(args).env("DATABASE_URL", db.url()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    enqueue(&["enqueue", "journal", "--count", &(TASKS - SLEEPS).to_string()]);
    let sleeps = SLEEPS.to_string();
    enqueue(&[
        "enqueue",
        "journal",
        "--params",
        r#"{"ms": 30000}"#,
        "--count",
        &sleeps,
        "--in",
        "1s",
        "--priority",
        "1",
    ]);

    let started = Instant::now();
    let mut children = Instances((0..4).map(|i| spawn(&db, &format!("load-{i}"))).collect());
    let stopped = |conn: &mut PgConnection| count(conn, "SELECT count(*) AS n FROM tasks WHERE status = 'stopped'");
    while stopped(&mut conn) < i64::from(TASKS / 5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The instance to kill: one that claimed a sleeping task at least 100 ms ago. The
    // task is still running when the kill comes, so the kill surely loses its attempt
    // (no-op tasks alone may all be recorded by a statement still in flight).
    eprintln!("load: a fifth stopped at {:.1?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        assert!(Instant::now() < deadline, "no instance ran a 30 s task a fifth of the way: nothing to kill");
        let holder: Vec<String> = diesel::sql_query(
            "SELECT instance AS name FROM tasks WHERE priority = 1 AND status = 'running'
               AND updated_at < now() - interval '100 ms' LIMIT 1",
        )
        .load::<Name>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
        match holder.first() {
            Some(name) => break name.clone(),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let index: usize = victim.strip_prefix("load-").and_then(|i| i.parse().ok()).expect("one of ours");
    children.0[index].kill().unwrap();
    children.0[index].wait().unwrap();
    let killed_at = started.elapsed();
    // On the database's clock: the victim's runs ended by then.
    diesel::sql_query("CREATE TABLE killed AS SELECT clock_timestamp() AS at").execute(&mut conn).unwrap();
    // The server notices the dead session (and frees its name) a moment later: start
    // again until the name is free.
    children.0[index] = loop {
        let mut child = spawn(&db, &victim);
        std::thread::sleep(Duration::from_millis(300));
        match child.try_wait().unwrap() {
            None => break child,
            Some(_) => continue,
        }
    };

    let deadline = Instant::now() + Duration::from_secs(600);
    while count(&mut conn, "SELECT count(*) AS n FROM tasks WHERE status <> 'stopped'") > 0 {
        assert!(Instant::now() < deadline, "the tasks did not all end in 10 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed();
    for child in &mut children.0 {
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    }
    for child in &mut children.0 {
        assert!(child.wait().unwrap().success());
    }

    // By the tasks' own record; a run without an end was the victim's, ended by its kill.
    let overlapping = count(
        &mut conn,
        &format!(
            "WITH runs AS (
                 SELECT j.task_id, j.attempt,
                        tstzrange(j.started_at, coalesce(j.ended_at,
                            CASE WHEN j.instance = '{victim}' THEN (SELECT at FROM killed) END, 'infinity')) AS span
                 FROM task_journal j)
             SELECT count(*) AS n FROM runs a JOIN runs b ON a.task_id = b.task_id AND a.attempt < b.attempt
             WHERE a.span && b.span"
        ),
    );
    let unended = count(
        &mut conn,
        &format!("SELECT count(*) AS n FROM task_journal WHERE ended_at IS NULL AND instance <> '{victim}'"),
    );
    let journaled = count(&mut conn, "SELECT count(DISTINCT task_id) AS n FROM task_journal");
    let lost = count(&mut conn, "SELECT count(*) AS n FROM task_executions WHERE error LIKE 'lost: %'");
    let other_errors = count(
        &mut conn,
        "SELECT count(*) AS n FROM task_executions WHERE error IS NOT NULL AND error NOT LIKE 'lost: %'",
    );
    let executions = count(&mut conn, "SELECT count(*) AS n FROM task_executions");
    let open = count(&mut conn, "SELECT count(*) AS n FROM task_executions WHERE stopped_at IS NULL");
    let rerun = count(
        &mut conn,
        "SELECT count(*) AS n FROM (SELECT task_id FROM task_executions GROUP BY task_id HAVING count(*) > 1) r",
    );
    let attempts_match = count(
        &mut conn,
        "SELECT count(*) AS n FROM tasks t
         WHERE t.attempts <> (SELECT count(*) FROM task_executions e WHERE e.task_id = t.id)",
    );
    println!(
        "load: {TASKS} tasks ({SLEEPS} of 30 s), 4 instances x 8 workers, {victim} killed at {killed_at:.1?} and restarted; all stopped in \
         {elapsed:.1?} ({:.0} tasks/s); executions {executions}, lost attempts recorded {lost}, tasks run twice \
         {rerun}, overlapping runs by the tasks' own record {overlapping}, open executions {open}, other errors \
         {other_errors}",
        f64::from(TASKS) / elapsed.as_secs_f64()
    );
    assert_eq!(overlapping, 0, "runs of one task overlapped, by the tasks' own record");
    assert_eq!(unended, 0, "a run of a live instance never ended");
    assert_eq!(journaled, i64::from(TASKS), "tasks never ran");
    assert_eq!(open, 0);
    assert_eq!(other_errors, 0);
    assert_eq!(executions, i64::from(TASKS) + lost, "an attempt is missing from the history");
    assert_eq!(rerun, lost, "every rerun follows a recorded lost attempt");
    assert_eq!(attempts_match, 0, "attempts and executions disagree");
    assert!(lost > 0, "the kill lost no attempt: the scenario did not test anything");
}
