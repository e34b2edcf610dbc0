//! The load scenario of the fault issue, ignored by default (about a minute on two
//! cores): 100,000 tasks across 4 `engine run` processes of 8 workers, one killed with
//! SIGKILL half-way and restarted under its name.
//!
//! cargo test --release -p engine --test load -- --ignored --nocapture

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use test_db::TestDatabase;

const TASKS: u32 = 100_000;

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
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["enqueue", "noop", "--count", &TASKS.to_string()])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(out.status.success());

    let started = Instant::now();
    let mut children: Vec<Child> = (0..4).map(|i| spawn(&db, &format!("load-{i}"))).collect();
    let stopped = |conn: &mut PgConnection| count(conn, "SELECT count(*) AS n FROM tasks WHERE status = 'stopped'");
    while stopped(&mut conn) < i64::from(TASKS / 2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    children[0].kill().unwrap();
    children[0].wait().unwrap();
    let killed_at = started.elapsed();
    // The server notices the dead session (and frees its name) a moment later: start
    // again until the name is free.
    children[0] = loop {
        let mut child = spawn(&db, "load-0");
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
    for child in &mut children {
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    }
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }

    let overlapping = count(
        &mut conn,
        "SELECT count(*) AS n FROM task_executions a JOIN task_executions b
           ON a.task_id = b.task_id AND a.id < b.id
         WHERE tstzrange(a.started_at, coalesce(a.stopped_at, 'infinity'))
            && tstzrange(b.started_at, coalesce(b.stopped_at, 'infinity'))",
    );
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
        "load: {TASKS} tasks, 4 instances x 8 workers, load-0 killed at {killed_at:.1?} and restarted; all stopped in \
         {elapsed:.1?} ({:.0} tasks/s); executions {executions}, lost attempts recorded {lost}, tasks run twice \
         {rerun}, overlapping executions {overlapping}, open executions {open}, other errors {other_errors}",
        f64::from(TASKS) / elapsed.as_secs_f64()
    );
    assert_eq!(overlapping, 0);
    assert_eq!(open, 0);
    assert_eq!(other_errors, 0);
    assert_eq!(executions, i64::from(TASKS) + lost, "an attempt is missing from the history");
    assert_eq!(rerun, lost, "every rerun follows a recorded lost attempt");
    assert_eq!(attempts_match, 0, "attempts and executions disagree");
    assert!(lost > 0, "the kill lost no attempt: the scenario did not test anything");
}
