//! A schedule declared with the code (the `tasks` crate's example, declared when
//! TASKS_EXAMPLE_SCHEDULE is set) under plain `engine run`s of the real binary.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz};
use test_db::TestDatabase;

const EXAMPLE: &str = "tasks-example-every-second";

fn engine(db: &TestDatabase, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env_remove("TASKS_EXAMPLE_SCHEDULE")
        .stdin(Stdio::null())
        .output()
        .expect("engine runs")
}

/// Starts `engine run` as instance `name`, with the example schedule declared.
fn engine_run(db: &TestDatabase, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["run", "--workers", "1", "--instance", name])
        .env("DATABASE_URL", db.url())
        .env("TASKS_EXAMPLE_SCHEDULE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("engine run starts")
}

/// Stops an `engine run` with SIGTERM; returns what it logged.
fn stop(child: Child) -> String {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    stderr
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[derive(QueryableByName, Debug)]
struct Tick {
    #[diesel(sql_type = Timestamptz)]
    run_at: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    tasks: i64,
}

/// The example's ticks enqueued (a task is due at its tick), with how many tasks each got.
fn ticks(conn: &mut PgConnection) -> Vec<Tick> {
    diesel::sql_query(
        "SELECT run_at, count(*) AS tasks FROM tasks WHERE task_class = 'noop' GROUP BY run_at ORDER BY run_at",
    )
    .load(conn)
    .unwrap()
}

#[test]
fn a_declared_schedule_fires_under_two_plain_engine_runs_once_per_tick() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (a, b) = (engine_run(&db, "declared-a"), engine_run(&db, "declared-b"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&mut conn).len() < 4 {
        assert!(Instant::now() < deadline, "four ticks were not enqueued within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }

    // `engine cron list` says where it comes from; a change by hand is refused.
    let listed = text(&engine(&db, &["cron", "list"]).stdout);
    let line = listed.lines().find(|l| l.starts_with(EXAMPLE)).unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("declared in tasks") && line.contains("* * * * * *"), "{line}");
    let out = engine(&db, &["cron", "add", EXAMPLE, "0 * * * *", "noop"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("declared in code (by the crate tasks)"), "{}", text(&out.stderr));

    let logged = [stop(a), stop(b)].join("\n");
    assert!(
        logged.contains("schedules declared in tasks: added [tasks-example-every-second]"),
        "the application is not logged: {logged}"
    );
    // Each tick once, and none lost: the example catches up nothing, but two live
    // instances leave no tick unfired.
    let ticks = ticks(&mut conn);
    assert!(ticks.iter().all(|t| t.tasks == 1), "a tick enqueued twice: {ticks:?}");
    let (first, last) = (ticks[0].run_at, ticks[ticks.len() - 1].run_at);
    assert_eq!((last - first).num_seconds() + 1, ticks.len() as i64, "a tick was lost: {ticks:?}");
}

#[test]
fn without_its_variable_the_example_schedule_is_not_declared() {
    let db = TestDatabase::new();
    let out = engine(&db, &["cron", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let child = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["run", "--workers", "1", "--instance", "plain"])
        .env("DATABASE_URL", db.url())
        .env_remove("TASKS_EXAMPLE_SCHEDULE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut conn = db.connect();
    // The start applies the declarations before its listener listens (and the signals
    // are heard soon after).
    let deadline = Instant::now() + Duration::from_secs(30);
    let listening = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'task_engine session plain'
                     AND state = 'idle' AND query LIKE '%advisory_lock_shared%'";
    while diesel::sql_query(listening).execute(&mut conn).unwrap() == 0 {
        assert!(Instant::now() < deadline, "the instance did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let logged = stop(child);
    assert!(logged.contains("schedules declared in tasks: 0 unchanged"), "{logged}");
    assert!(!text(&engine(&db, &["cron", "list"]).stdout).contains(EXAMPLE));
}
