//! The `engine` command as a user runs it: the real binary, against a test database.

use std::io::Read as _;
use std::process::{Child, Command, Output, Stdio};

use diesel::prelude::*;
use task_engine::schema::{task_executions, tasks};
use test_db::TestDatabase;

mod fleet;

fn engine(db: &TestDatabase, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env_remove("TASK_ENGINE_INSTANCE")
        .stdin(Stdio::null())
        .output()
        .expect("engine runs")
}

/// Starts `engine` with `args` on `db`, in the background, its output piped.
fn spawn_engine(db: &TestDatabase, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("engine starts")
}

/// Starts `engine run` with `args` on `db`, in the background.
fn spawn_engine_run(db: &TestDatabase, args: &[&str], stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .arg("run")
        .args(args)
        .env("DATABASE_URL", db.url())
        .env_remove("TASK_ENGINE_INSTANCE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("engine run starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `condition` until it holds; fails the test after 30 s.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn count_in_status(conn: &mut PgConnection, status: &str) -> i64 {
    tasks::table.filter(tasks::status.eq(status)).count().get_result(conn).unwrap()
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn task_count(db: &TestDatabase) -> i64 {
    tasks::table.count().get_result(&mut db.connect()).unwrap()
}

#[test]
fn engine_tasks_lists_every_type_of_the_linked_tasks_crate() {
    let out = Command::new(env!("CARGO_BIN_EXE_engine")).arg("tasks").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Vec<String> = text(&out.stdout).lines().map(|l| l.split('\t').next().unwrap().to_owned()).collect();
    // The `tasks` crate's types, in order, among those of any task crate a project
    // adds by the recipe of docs/task-crates.md (so that adding one keeps this test green).
    let ours: Vec<&String> = listed.iter().filter(|t| TASKS_CRATE_TYPES.contains(&t.as_str())).collect();
    assert_eq!(ours, TASKS_CRATE_TYPES, "listed: {listed:?}");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "not sorted: {listed:?}");
    // Each line says the type's queue and time limit too.
    let noop = text(&out.stdout).lines().find(|l| l.starts_with("noop\t")).map(str::to_owned).unwrap();
    assert_eq!(
        noop.split('\t').collect::<Vec<_>>(),
        ["noop", "tasks::Noop", "queue default", "max attempts 25", "no timeout"]
    );
}

/// The task types of the workspace's `tasks` crate.
const TASKS_CRATE_TYPES: [&str; 7] = ["echo", "fail", "journal", "noop", "panic", "sleep", "steps"];

#[test]
fn engine_enqueue_prints_the_new_id_and_a_count_for_a_bulk_insert() {
    let db = TestDatabase::new();
    let out = engine(&db, &["enqueue", "sleep", "--params", r#"{"ms": 3}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id: i64 = text(&out.stdout).trim().parse().expect("one id");
    let row: (String, serde_json::Value) =
        tasks::table.find(id).select((tasks::task_class, tasks::task_parameters)).first(&mut db.connect()).unwrap();
    assert_eq!(row, ("sleep".to_owned(), serde_json::json!({"ms": 3})));

    // In bulk, a count and the ids' range, not 2,500 lines; each id on request.
    let out = engine(&db, &["enqueue", "noop", "--count", "2500"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert_eq!(said.trim(), format!("2500 tasks inserted, ids {} to {} (--ids prints each)", id + 1, id + 2500));
    assert_eq!(task_count(&db), 2501);
    let out = engine(&db, &["enqueue", "noop", "--count", "3", "--ids"]);
    let ids: Vec<i64> = text(&out.stdout).lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids, [id + 2501, id + 2502, id + 2503]);
}

#[test]
fn engine_enqueue_with_a_unique_key_prints_the_holders_id_and_replaces_its_parameters_on_request() {
    let db = TestDatabase::new();
    let enqueue = |params: &str, extra: &[&str]| {
        let mut args = vec!["enqueue", "echo", "--params", params, "--in", "1h", "--unique-key", "nightly"];
        args.extend_from_slice(extra);
        let out = engine(&db, &args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        (text(&out.stdout).trim().parse::<i64>().expect("one id"), text(&out.stderr))
    };
    let (first, said) = enqueue(r#"{"v": 1}"#, &[]);
    assert_eq!(said, "");
    let (kept, said) = enqueue(r#"{"v": 2}"#, &[]);
    assert_eq!(kept, first);
    assert!(said.contains(&format!("task {first} holds the unique key: kept")), "{said}");
    let (replaced, said) = enqueue(r#"{"v": 3}"#, &["--on-conflict", "replace-params"]);
    assert_eq!(replaced, first);
    assert!(said.contains("replaced by this task, its due time kept"), "{said}");
    let params: serde_json::Value =
        tasks::table.find(first).select(tasks::task_parameters).first(&mut db.connect()).unwrap();
    assert_eq!(params, serde_json::json!({"v": 3}));
    // A replace says that the due time (`--in 1h` from now) changed too.
    let (replaced, said) = enqueue(r#"{"v": 3}"#, &["--on-conflict", "replace"]);
    assert_eq!(replaced, first);
    assert!(said.contains("replaced by this task, its due time too"), "{said}");
    assert_eq!(task_count(&db), 1);
    let shown = text(&engine(&db, &["status", "--task", &first.to_string()]).stdout);
    assert!(shown.contains("unique key   nightly (held while waiting)"), "{shown}");
}

#[test]
fn engine_enqueue_refuses_bad_input_with_exit_code_2_and_inserts_nothing() {
    let db = TestDatabase::new();
    for (args, says) in [
        (vec!["enqueue", "no_such_type"], "unknown task type `no_such_type`"),
        (vec!["enqueue", "sleep", "--params", "{ms: 3"], "--params is not valid JSON"),
        (vec!["enqueue", "sleep", "--params", r#"{"ms": "later"}"#], "parameters do not fit task type `sleep`"),
        (vec!["enqueue", "noop", "--count", "0"], "--count"),
        // Values PostgreSQL would refuse: refused here, with exit 2, not sent to fail there.
        (vec!["enqueue", "echo", "--params", r#"{"to": "a\u0000b"}"#], "NUL character (at $.to)"),
        (vec!["enqueue", "noop", "--in", "200000000d"], "outside PostgreSQL's range"),
        (vec!["enqueue", "noop", "--unique-key", ""], "unique key"),
        (vec!["enqueue", "noop", "--timeout", "0s"], "1 ms to 24 days"),
        (vec!["enqueue", "noop", "--unique-key", "k", "--count", "2"], "--count"),
        (vec!["enqueue", "noop", "--on-conflict", "replace"], "--unique-key"),
        (vec!["enqueue", "noop", "--unique-key", "k", "--on-conflict", "merge"], "--on-conflict"),
    ] {
        let out = engine(&db, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: stderr lacks `{says}`: {}", text(&out.stderr));
    }
    assert_eq!(task_count(&db), 0);
    // The cause is said once, not once by the message and again by the error's chain.
    let out = engine(&db, &["enqueue", "fail", "--params", "{}"]);
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("missing field").count(), 1, "{stderr}");
}

#[test]
fn engine_migrate_on_a_migrated_database_says_it_is_up_to_date() {
    let db = TestDatabase::new();
    let out = engine(&db, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "the schema is up to date");
}

/// A fleet whose pods each run `engine migrate` at start, on a fresh database: 10
/// processes released together (each waits on its stdin, closed for all at once), three
/// times, each time on a new empty database of the test server.
#[test]
fn ten_engine_migrates_at_once_on_a_fresh_database_all_exit_0_and_apply_each_migration_once() {
    #[derive(QueryableByName, PartialEq, Debug)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    // The public schema's objects by name, to compare a fleet's database with the test's own.
    let objects = |conn: &mut PgConnection| -> Vec<Name> {
        diesel::sql_query(
            "SELECT relname::text AS name FROM pg_class WHERE relnamespace = 'public'::regnamespace
             UNION ALL SELECT proname::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace
             UNION ALL SELECT tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                       WHERE c.relnamespace = 'public'::regnamespace
             ORDER BY 1",
        )
        .load(conn)
        .unwrap()
    };
    let versions = |conn: &mut PgConnection| -> Vec<Name> {
        diesel::sql_query("SELECT version::text AS name FROM __diesel_schema_migrations ORDER BY 1").load(conn).unwrap()
    };
    /// A database made for one round, dropped at the end of it, or when the test fails.
    struct Fresh<'a>(&'a mut PgConnection, String);
    impl Drop for Fresh<'_> {
        fn drop(&mut self) {
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.1);
            diesel::connection::SimpleConnection::batch_execute(self.0, &drop).unwrap();
        }
    }
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let every_version = versions(&mut conn);
    assert!(every_version.len() > 20);
    let expected: Vec<String> = every_version.iter().map(|v| v.name.clone()).collect();
    let migrated_objects = objects(&mut conn);

    for round in 0..3 {
        let name = format!("task_engine_fleet_{}_{round}", std::process::id());
        diesel::connection::SimpleConnection::batch_execute(&mut conn, &format!("CREATE DATABASE \"{name}\"")).unwrap();
        let _fresh = Fresh(&mut conn, name.clone());
        let url = test_db::with_database(db.url(), &name);
        let applied = fleet::migrate_at_once(&url, 10);
        assert_eq!(applied, expected, "round {round}: each migration applied once, by one of the fleet");
        let mut migrated = PgConnection::establish(&url).unwrap();
        assert_eq!(versions(&mut migrated), every_version, "round {round}");
        assert_eq!(objects(&mut migrated), migrated_objects, "round {round}: the schema is complete");
    }
}

#[test]
fn a_connection_failure_exits_1_without_printing_the_password() {
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["status"])
        .env("DATABASE_URL", "postgres://app:s3cr3t-pw@127.0.0.1:1/app")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("could not connect"), "{all}");
    assert!(!all.contains("s3cr3t-pw"), "the password was printed: {all}");
}

#[test]
fn a_malformed_database_url_is_named_with_its_password_hidden() {
    for (url, code, shown) in [
        // Neither form libpq reads: bad input.
        ("postgres//app:s3cr3t-pw@127.0.0.1:1/app", 2, "postgres//app:***@127.0.0.1:1/app"),
        ("notaurl", 2, ": notaurl"),
        // A URL libpq refuses: a failure to connect, its message without the password.
        ("postgres://app:s3cr3t-pw@127.0.0.1:port/app", 1, "postgres://app:***@127.0.0.1:port/app"),
        ("host=127.0.0.1 password=s3cr3t-pw port=abc", 1, "host=127.0.0.1 password=*** port=abc"),
        // libpq quotes the part it could not read: here, the password.
        ("postgres://app:s3cr3t-pw%ZZ@127.0.0.1:1/app", 1, "invalid percent-encoded token: \"***\""),
    ] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_engine")).args(["status"]).env("DATABASE_URL", url).output().unwrap();
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(code), "{url}: {all}");
        assert!(text(&out.stderr).contains(shown), "{url}: stderr lacks `{shown}`: {all}");
        assert!(!all.contains("s3cr3t-pw"), "the password was printed: {all}");
    }
}

#[test]
fn engine_run_works_through_the_queue_and_exits_0_on_sigterm() {
    let db = TestDatabase::new();
    let out = engine(&db, &["enqueue", "echo", "--params", r#"{"x": 1}"#, "--count", "20"]);
    assert!(out.status.success());
    let child =
        spawn_engine_run(&db, &["--workers", "3", "--instance", "cli-run", "--poll-interval", "1h"], Stdio::piped());
    let mut conn = db.connect();
    wait_until("engine run has finished the 20 tasks", || count_in_status(&mut conn, "stopped") == 20);
    let shown = text(&engine(&db, &["status"]).stdout);
    let line = shown.lines().find(|l| l.starts_with("cli-run")).unwrap_or_else(|| panic!("no instance line: {shown}"));
    assert!(line.contains(&child.id().to_string()) && line.contains("s ago"), "{line}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let types_line = stderr.lines().find(|l| l.contains("task types: ")).unwrap_or_else(|| {
        panic!("no start-up line listing the types: {stderr}");
    });
    let listed: Vec<&str> = types_line.split("task types: ").nth(1).unwrap().split(", ").collect();
    assert!(TASKS_CRATE_TYPES.iter().all(|t| listed.contains(t)), "{types_line}");
    assert!(stderr.contains("instance cli-run stopped"), "{stderr}");
    // Success is not silent: the stop says what the instance did.
    let summary = stderr.lines().find(|l| l.contains("instance cli-run ran")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(summary.contains("20 attempts recorded") && summary.contains("20 succeeded"), "{summary}");
    let instances: Vec<String> = task_executions::table.select(task_executions::instance).load(&mut conn).unwrap();
    assert!(instances.iter().all(|i| i == "cli-run"));
    let registered: i64 =
        diesel::sql_query("SELECT count(*) AS n FROM task_engine_instances").get_result::<N>(&mut conn).unwrap().n;
    assert_eq!(registered, 0, "a cleanly stopped instance left its row");
}

#[test]
fn engine_status_shows_a_task_with_every_attempt() {
    let db = TestDatabase::new();
    let out = engine(
        &db,
        &["enqueue", "fail", "--params", r#"{"message": "quota exceeded"}"#, "--max-attempts", "1", "--priority", "-3"],
    );
    let id = text(&out.stdout).trim().to_owned();
    let mut conn = db.connect();
    let engine_handle = task_engine::Runner::new(db.url(), task_engine::Registry::from_inventory().unwrap())
        .workers(1)
        .start()
        .unwrap();
    wait_until("the task has failed", || count_in_status(&mut conn, "failed") == 1);
    engine_handle.shutdown();

    let out = engine(&db, &["status", "--task", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains(&format!("task {id}: fail")), "{shown}");
    assert!(shown.contains("status       failed"), "{shown}");
    assert!(shown.contains("executions: 1"), "{shown}");
    assert!(shown.contains("attempts     1 of 1"), "{shown}");
    assert!(shown.contains("priority     -3"), "{shown}");
    assert!(shown.contains("error: quota exceeded"), "{shown}");

    let overview = text(&engine(&db, &["status"]).stdout);
    assert_eq!(state_counts(&overview, "fail").get("failed"), Some(&1), "{overview}");

    let missing = engine(&db, &["status", "--task", "999999"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn engine_run_idle_exits_0_within_a_second_or_two_of_sigterm() {
    let db = TestDatabase::new();
    let mut child =
        spawn_engine_run(&db, &["--workers", "4", "--instance", "cli-idle", "--poll-interval", "1h"], Stdio::null());
    let mut conn = db.connect();
    wait_until("the listener waits", || {
        diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity
             WHERE application_name = 'task_engine session cli-idle' AND state = 'idle' AND query LIKE '%advisory_lock_shared%'",
        )
        .get_result::<N>(&mut conn)
        .unwrap()
        .n == 1
    });

    let signalled = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    // Its workers sleep for an hour and its listener blocks on the socket: only a
    // prompt stop can end it before this deadline.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > std::time::Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("engine run still running 10 s after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let took = signalled.elapsed();
    eprintln!("idle engine exited {took:?} after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(took < std::time::Duration::from_secs(2), "took {took:?} to stop");
}

#[test]
fn engine_enqueue_schedules_with_in_or_at_and_refuses_a_bad_time() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let later = text(&engine(&db, &["enqueue", "noop", "--in", "2h"]).stdout).trim().parse::<i64>().unwrap();
    let at =
        text(&engine(&db, &["enqueue", "noop", "--at", "2031-05-06T07:08:09Z"]).stdout).trim().parse::<i64>().unwrap();
    let (run_at, created_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        tasks::table.find(later).select((tasks::run_at, tasks::created_at)).first(&mut conn).unwrap();
    assert_eq!((run_at - created_at).num_seconds(), 7200);
    let run_at: chrono::DateTime<chrono::Utc> = tasks::table.find(at).select(tasks::run_at).first(&mut conn).unwrap();
    assert_eq!(run_at.to_rfc3339(), "2031-05-06T07:08:09+00:00");

    for bad in [
        &["enqueue", "noop", "--at", "tomorrow"][..],
        &["enqueue", "noop", "--in", "soon"],
        &["enqueue", "noop", "--max-attempts", "0"],
    ] {
        let out = engine(&db, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
    }
    assert_eq!(task_count(&db), 2);
}

#[test]
fn engine_cancel_and_retry_do_what_they_say_and_refuse_what_they_cannot() {
    let db = TestDatabase::new();
    let waiting = text(&engine(&db, &["enqueue", "noop", "--in", "1h"]).stdout).trim().to_owned();
    let out = engine(&db, &["cancel", &waiting]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("task {waiting} cancelled")));
    let mut conn = db.connect();
    assert_eq!(count_in_status(&mut conn, "cancelled"), 1);

    // Cancelled already: a clear refusal, exit 2; the state is unchanged.
    let out = engine(&db, &["cancel", &waiting]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("cannot cancel task {waiting}: it is cancelled already")),
        "{}",
        text(&out.stderr)
    );

    // A cancelled task can be retried: it waits again, due now.
    let out = engine(&db, &["retry", &waiting]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count_in_status(&mut conn, "waiting"), 1);
    let out = engine(&db, &["retry", &waiting]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("it is waiting (it will run anyway)"), "{}", text(&out.stderr));

    let stopped: i64 = diesel::insert_into(tasks::table)
        .values((tasks::task_class.eq("noop"), tasks::status.eq("stopped")))
        .returning(tasks::id)
        .get_result(&mut conn)
        .unwrap();
    let out = engine(&db, &["cancel", &stopped.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(&format!("cannot cancel task {stopped}: it is stopped")),
        "{}",
        text(&out.stderr)
    );

    let out = engine(&db, &["cancel", "424242"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("there is no task 424242"));
}

#[test]
fn engine_status_lists_waiting_types_this_engine_does_not_know() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    diesel::insert_into(tasks::table)
        .values(&vec![tasks::task_class.eq("resize_image"), tasks::task_class.eq("resize_image")])
        .execute(&mut conn)
        .unwrap();
    let out = engine(&db, &["status"]);
    assert!(out.status.success());
    let shown = text(&out.stdout);
    assert!(shown.contains("types this engine does not know"), "{shown}");
    assert!(shown.contains("resize_image (2 waiting)"), "{shown}");
}

#[test]
fn the_tasks_of_a_killed_engine_run_come_back_and_complete_elsewhere() {
    let db = TestDatabase::new();
    let ids: Vec<i64> =
        text(&engine(&db, &["enqueue", "sleep", "--params", r#"{"ms": 1500}"#, "--count", "3", "--ids"]).stdout)
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
    let mut victim = spawn_engine_run(
        &db,
        &["--workers", "3", "--instance", "victim", "--lease", "1s", "--poll-interval", "1h"],
        Stdio::null(),
    );
    let mut conn = db.connect();
    wait_until("the victim runs the three tasks", || count_in_status(&mut conn, "running") == 3);
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();

    let rescuer = task_engine::Runner::new(db.url(), task_engine::Registry::from_inventory().unwrap())
        .instance("rescuer")
        .workers(3)
        .lease(std::time::Duration::from_secs(1))
        .poll_interval(std::time::Duration::from_secs(3600))
        .start()
        .unwrap();
    wait_until("the three tasks have run elsewhere", || count_in_status(&mut conn, "stopped") == 3);
    rescuer.shutdown();

    for id in ids {
        type Run = (String, Option<String>, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>);
        let runs: Vec<Run> = task_executions::table
            .filter(task_executions::task_id.eq(id))
            .order(task_executions::id)
            .select((
                task_executions::instance,
                task_executions::error,
                task_executions::started_at,
                task_executions::stopped_at,
            ))
            .load(&mut conn)
            .unwrap();
        assert_eq!(runs.len(), 2, "task {id}: {runs:?}");
        assert_eq!(runs[0].0, "victim");
        assert_eq!(
            runs[0].1.as_deref(),
            Some("lost: its instance stopped sending heartbeats (instance victim, attempt 1)")
        );
        let lost_at = runs[0].3.expect("the lost attempt is closed");
        assert_eq!((runs[1].0.as_str(), runs[1].1.as_deref()), ("rescuer", None));
        assert!(runs[1].2 >= lost_at, "task {id}: the second attempt overlaps the lost one");
        let attempts: i32 = tasks::table.find(id).select(tasks::attempts).first(&mut conn).unwrap();
        assert_eq!(attempts, 2);
    }
}

#[test]
fn engine_prune_deletes_only_old_finished_tasks_with_their_executions_in_batches() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "INSERT INTO tasks (id, task_class, status, updated_at) VALUES
             (1, 'noop', 'stopped',   now() - interval '8 days'),
             (2, 'noop', 'failed',    now() - interval '8 days'),
             (3, 'noop', 'cancelled', now() - interval '9 days'),
             (4, 'noop', 'stopped',   now() - interval '6 days'),
             (5, 'noop', 'waiting',   now() - interval '30 days'),
             (6, 'noop', 'running',   now() - interval '30 days'),
             (7, 'noop', 'stopped',   now() - interval '10 days');
         INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, instance, worker)
             SELECT id, 1, now() - interval '10 days', now() - interval '10 days', 'i', 0 FROM tasks;",
    )
    .unwrap();
    let out = engine(&db, &["prune", "--older-than", "7d", "--batch", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "4 finished task(s) deleted, with their executions");
    let left: Vec<i64> = tasks::table.order(tasks::id).select(tasks::id).load(&mut conn).unwrap();
    assert_eq!(left, [4, 5, 6]);
    let executions: Vec<i64> = task_executions::table
        .order(task_executions::task_id)
        .select(task_executions::task_id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(executions, [4, 5, 6]);
    let out = engine(&db, &["prune", "--older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn engine_run_refuses_settings_it_cannot_work_with_with_exit_code_2() {
    let db = TestDatabase::new();
    for (args, says) in [
        (vec!["--poll-interval", "0s"], "at least 1ms"),
        (vec!["--lease", "0s"], "from 1s to 1d"),
        (vec!["--lease", "100000d"], "from 1s to 1d"),
        (vec!["--workers", "0"], "--workers"),
        (vec!["--workers", "100000"], "--workers"),
        (vec!["--max-queue-wait", "1ms"], "at least 10ms"),
        (vec!["--instance", ""], "instance"),
        (vec!["--queue", "emails=0"], "1 to 10000 workers"),
        (vec!["--queue", "emails"], "NAME=WORKERS"),
        (vec!["--queue", "emails=1", "--queue", "emails=2"], "named twice"),
        (vec!["--timeout-grace", "2d"], "at most 1d"),
    ] {
        // Accepted, `engine run` would run until stopped: give it 20 s to refuse.
        let mut child = spawn_engine_run(&db, &args, Stdio::piped());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("{args:?} was accepted");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: stderr lacks `{says}`: {}", text(&out.stderr));
    }
}

#[test]
fn engine_status_shows_a_task_the_models_cannot_read() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Inserted by another program: JSON serde_json refuses, due at 'infinity'.
    diesel::sql_query(
        "INSERT INTO tasks (id, task_class, task_parameters, run_at) VALUES (9, 'echo', '{\"n\": 1e400}', 'infinity')",
    )
    .execute(&mut conn)
    .unwrap();
    let out = engine(&db, &["status", "--task", "9"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("run at       infinity") && shown.contains("{\"n\": 1000"), "{shown}");
}

#[test]
fn engine_status_prints_control_characters_from_the_database_escaped() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // A type name inserted by SQL that would clear the screen and turn it red.
    diesel::sql_query("INSERT INTO tasks (task_class) VALUES (E'evil\\x1b[2J\\x1b[31m')").execute(&mut conn).unwrap();
    let out = engine(&db, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!out.stdout.contains(&0x1b), "an escape sequence reached the terminal: {:?}", text(&out.stdout));
    assert!(text(&out.stdout).contains("evil\\u{1b}[2J"), "{}", text(&out.stdout));
}

#[test]
fn engine_status_into_a_closed_pipe_exits_0_without_a_panic() {
    let db = TestDatabase::new();
    engine(&db, &["enqueue", "noop", "--count", "3"]);
    for args in [&["status"][..], &["status", "--task", "1"], &["tasks"]] {
        let mut child = spawn_engine(&db, args);
        // The reader is gone before the first line, as with `| head -0`.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// The counts `engine status` shows for one type, by the column headers.
fn state_counts(overview: &str, task_type: &str) -> std::collections::HashMap<String, i64> {
    let mut lines = overview.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().skip(1).collect();
    let row = lines.find(|l| l.split_whitespace().next() == Some(task_type)).unwrap_or_else(|| panic!("{overview}"));
    header.iter().map(|h| h.to_string()).zip(row.split_whitespace().skip(1).map(|n| n.parse().unwrap())).collect()
}

#[test]
fn engine_status_tells_every_state_apart_lists_failed_tasks_and_marks_dead_instances() {
    let db = TestDatabase::new();
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.connect(),
        "INSERT INTO tasks (id, task_class, status, run_at, attempts) VALUES
                 (1, 'echo', 'waiting',   now(),                    0),
                 (2, 'echo', 'waiting',   now() + interval '1 hour', 0),
                 (3, 'echo', 'waiting',   now() + interval '1 hour', 2),
                 (4, 'echo', 'running',   now(),                    1),
                 (5, 'echo', 'stopped',   now(),                    1),
                 (6, 'echo', 'failed',    now(),                    2),
                 (7, 'echo', 'cancelled', now(),                    0);
             INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, error, instance, worker) VALUES
                 (6, 1, now(), now(), 'first: timeout', 'i', 0),
                 (6, 2, now(), now(), 'second: quota exceeded', 'i', 0);
             INSERT INTO task_engine_instances (name, host, pid, lease, last_seen_at) VALUES
                 ('ghost', 'h', 1, interval '1 second', now() - interval '1 minute'),
                 ('alive', 'h', 2, interval '30 seconds', now())",
    )
    .unwrap();
    let out = engine(&db, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let counts = state_counts(&shown, "echo");
    for state in ["scheduled", "retrying", "waiting", "running", "succeeded", "failed", "cancelled"] {
        assert_eq!(counts.get(state), Some(&1), "{state}: {shown}");
    }
    let failed = shown.lines().find(|l| l.trim_start().starts_with("6 ")).unwrap_or_else(|| panic!("{shown}"));
    assert!(failed.contains("second: quota exceeded") && !failed.contains("first"), "{failed}");
    let instance = |name: &str| shown.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{shown}"));
    assert!(instance("ghost").contains("dead"), "{shown}");
    assert!(instance("alive").contains("live"), "{shown}");
}

#[test]
fn a_graceful_stop_says_which_tasks_it_waits_for() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let id = text(&engine(&db, &["enqueue", "sleep", "--params", r#"{"ms": 1500}"#]).stdout).trim().to_owned();
    let child = spawn_engine_run(&db, &["--workers", "1", "--instance", "graceful"], Stdio::piped());
    wait_until("the task runs", || count_in_status(&mut conn, "running") == 1);
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stopping =
        stderr.lines().find(|l| l.contains("instance graceful stopping")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        stopping.contains("waiting for the 1 task(s) in flight") && stopping.contains(&format!("(ids {id};")),
        "{stopping}"
    );
    // Finished, or given back if the stop came before its worker took it: not left running.
    assert_eq!(count_in_status(&mut conn, "running"), 0, "{stderr}");
}

/// The demo's own database, beside `db` on its server: its URL; dropped when dropped.
struct DemoDatabase<'a> {
    main: &'a TestDatabase,
    name: String,
    url: String,
}

impl<'a> DemoDatabase<'a> {
    fn of(main: &'a TestDatabase) -> Self {
        let name = format!("{}_demo", main.name());
        Self { main, url: test_db::with_database(main.url(), &name), name }
    }

    fn count(&self, query: &str) -> i64 {
        diesel::sql_query(query).get_result::<N>(&mut PgConnection::establish(&self.url).unwrap()).unwrap().n
    }
}

impl Drop for DemoDatabase<'_> {
    fn drop(&mut self) {
        let _ =
            diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{}\"", self.name)).execute(&mut self.main.connect());
    }
}

#[test]
fn the_demo_runs_in_a_database_of_its_own_and_leaves_the_main_one_untouched() {
    let db = TestDatabase::new();
    let demo = DemoDatabase::of(&db);
    let out = engine(&db, &["demo"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("enqueued 190 tasks"), "{stdout}");
    assert!(stdout.contains(&format!("`engine --database-url {} status`", demo.url)), "{stdout}");
    assert_eq!(task_count(&db), 0, "the demo's tasks went to the main database");
    assert_eq!(demo.count("SELECT count(*) AS n FROM tasks"), 190);
    assert_eq!(demo.count("SELECT count(*) AS n FROM tasks WHERE status IN ('waiting', 'running')"), 0);
}

#[test]
fn the_demo_stops_its_instance_on_sigint_and_the_next_demo_starts_afresh() {
    use std::io::BufRead as _;
    let db = TestDatabase::new();
    let demo = DemoDatabase::of(&db);
    for _ in 0..2 {
        let mut child = spawn_engine(&db, &["demo"]);
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(first.starts_with("enqueued 190 tasks"), "{first}");
        let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert_eq!(
            demo.count("SELECT count(*) AS n FROM task_engine_instances"),
            0,
            "the demo's instance left its row"
        );
    }
    // The second demo dropped what the first left: one mix of tasks, not two.
    assert_eq!(demo.count("SELECT count(*) AS n FROM tasks"), 190);
    assert_eq!(task_count(&db), 0);
}

#[test]
fn a_sigint_while_the_demo_starts_exits_1() {
    use std::io::BufRead as _;
    let db = TestDatabase::new();
    let _demo = DemoDatabase::of(&db);
    let mut child = spawn_engine(&db, &["demo"]);
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    // Its own database is made first, before it enqueues anything.
    while !said.contains("the demo's own database") {
        assert_ne!(stderr.read_line(&mut said).unwrap(), 0, "no word of its database: {said}");
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    stderr.read_to_string(&mut said).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}: {said}");
    assert!(said.contains("error: interrupted"), "{said}");
}

#[test]
fn the_embedded_default_says_its_url_and_keeps_its_port_from_one_start_to_the_next() {
    let dir = std::env::temp_dir().join(format!("task-engine-db-url-{}", std::process::id()));
    let db_url = || {
        let out = Command::new(env!("CARGO_BIN_EXE_engine"))
            .args(["--data-dir", dir.to_str().unwrap(), "db-url"])
            .env_remove("DATABASE_URL")
            .env_remove("TASK_ENGINE_DATA_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        (text(&out.stdout).trim().to_owned(), text(&out.stderr))
    };
    let stop = || {
        let cluster =
            pg_cluster::Cluster::init_or_open(&dir.join("pg"), pg_cluster::ClusterOptions::default()).unwrap();
        cluster.stop().unwrap();
    };
    let (url, said) = db_url();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:") && url.ends_with("/task_engine"), "{url}");
    assert!(said.contains(&format!("its URL: {url}")) && said.contains(&format!("psql {url}`")), "{said}");
    // A new cluster is said, with where it is and how to stop it.
    let pg = dir.join("pg");
    assert!(said.contains(&format!("note: created a new embedded PostgreSQL cluster in {}", pg.display())), "{said}");
    assert!(said.contains(&format!("pg_ctl -D {} stop`", pg.display())), "{said}");
    PgConnection::establish(&url).expect("the printed URL connects");
    stop();
    let (again, said) = db_url();
    assert!(!said.contains("created"), "{said}");
    stop();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(again, url, "the port changed from one start to the next");
}

#[test]
fn the_embedded_default_is_the_workspaces_from_any_of_its_directories() {
    let root = std::env::temp_dir().join(format!("task-engine-workspace-{}", std::process::id()));
    let sub = root.join("tasks").join("src");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(root.join("Cargo.lock"), "").unwrap();
    let db_url = |dir: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_engine"))
            .arg("db-url")
            .current_dir(dir)
            .env_remove("DATABASE_URL")
            .env_remove("TASK_ENGINE_DATA_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    let from_below = db_url(&sub);
    let from_root = db_url(&root);
    let cluster =
        pg_cluster::Cluster::init_or_open(&root.join(".task_engine/pg"), pg_cluster::ClusterOptions::default());
    let made_below = sub.join(".task_engine").exists();
    cluster.unwrap().stop().unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    assert!(!made_below, "a second cluster was made in a subdirectory");
    assert_eq!(from_below, from_root, "the root and a subdirectory saw different clusters");
}

#[test]
fn engine_queue_pauses_limits_and_lists_and_engine_run_runs_the_queues_it_is_given() {
    let db = TestDatabase::new();
    let ok = |args: &[&str]| {
        let out = engine(&db, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    ok(&["queue", "pause", "emails"]);
    ok(&["queue", "limit", "emails", "5"]);
    ok(&["queue", "key-limit", "emails", "2"]);
    ok(&["queue", "rate", "emails", "100/1m"]);
    ok(&["enqueue", "noop", "--queue", "emails", "--key", "acme", "--count", "3"]);
    let listed = ok(&["queue", "list"]);
    let line = listed.lines().find(|l| l.starts_with("emails")).unwrap_or_else(|| panic!("{listed}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    // Name, waiting, later, running, state, limit, per key, rate (then the oldest's age).
    assert_eq!(fields[..8], ["emails", "3", "0", "0", "paused", "5", "2", "100/60s"], "{line}");
    let status = ok(&["status"]);
    let shown = status.lines().find(|l| l.starts_with("emails")).unwrap_or_else(|| panic!("not in status: {status}"));
    assert_eq!(shown.split_whitespace().take(8).collect::<Vec<_>>(), fields[..8], "engine status shows the queues too");

    // Bad input: exit 2, nothing changed.
    for args in
        [&["queue", "limit", "emails", "many"][..], &["queue", "rate", "emails", "0/1s"], &["queue", "pause", ""]]
    {
        let out = engine(&db, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
    }

    // Resumed, and run by an instance given that queue (and only it).
    ok(&["queue", "resume", "emails"]);
    ok(&["enqueue", "noop", "--count", "2"]);
    let mut conn = db.connect();
    let mut child = spawn_engine_run(&db, &["--queue", "emails=2", "--poll-interval", "1h"], Stdio::null());
    wait_until("the emails queue's tasks ran", || count_in_status(&mut conn, "stopped") == 3);
    let queues: Vec<(String, String)> =
        tasks::table.select((tasks::queue, tasks::status)).order(tasks::id).load(&mut conn).unwrap();
    let emails = ("emails".to_owned(), "stopped".to_owned());
    let default = ("default".to_owned(), "waiting".to_owned());
    assert_eq!(queues, [emails.clone(), emails.clone(), emails, default.clone(), default]);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn engine_retry_and_cancel_by_filter_act_on_what_matches_and_refuse_what_they_cannot() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts, run_at)
         SELECT 'fail', '{\"message\": \"x\"}', 'failed', 1, 1, now() + interval '1 day' FROM generate_series(1, 4);
         INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts)
         VALUES ('echo', '1', 'failed', 1, 1)",
    )
    .unwrap();
    let out = engine(&db, &["retry", "--status", "failed", "--type", "fail", "--batch", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "4 task(s) waiting again");
    assert_eq!(count_in_status(&mut conn, "waiting"), 4);
    let out = engine(&db, &["cancel", "--status", "waiting", "--type", "fail"]);
    assert_eq!(text(&out.stdout).trim(), "4 waiting task(s) cancelled", "{}", text(&out.stderr));
    assert_eq!(count_in_status(&mut conn, "cancelled"), 4);

    // Neither an id nor a filter, both, a state the action cannot take: exit 2, nothing changed.
    for args in [
        &["retry"][..],
        &["retry", "5", "--status", "failed"],
        &["retry", "--type", "fail"],
        &["retry", "--status", "waiting"],
        &["cancel", "--status", "failed"],
    ] {
        let out = engine(&db, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
    }
    assert_eq!((count_in_status(&mut conn, "cancelled"), count_in_status(&mut conn, "failed")), (4, 1));
}

#[test]
fn engine_cron_adds_lists_and_removes_schedules_and_refuses_bad_ones_with_exit_code_2() {
    let db = TestDatabase::new();
    let out = engine(
        &db,
        &[
            "cron",
            "add",
            "nightly",
            "0 2 * * *",
            "echo",
            "--params",
            r#"{"v": 1}"#,
            "--tz",
            "Europe/Paris",
            "--catch-up",
            "3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "schedule nightly added");
    let out = engine(&db, &["cron", "add", "nightly", "30 2 * * *", "echo", "--tz", "Europe/Paris"]);
    assert_eq!(text(&out.stdout).trim(), "schedule nightly changed");

    let listed = text(&engine(&db, &["cron", "list"]).stdout);
    let line = listed.lines().find(|l| l.starts_with("nightly")).unwrap_or_else(|| panic!("{listed}"));
    for shown in ["30 2 * * *", "Europe/Paris", "echo", " 0 ", " -  ", " UTC"] {
        assert!(line.contains(shown), "the line lacks `{shown}`: {line}");
    }
    assert!(text(&engine(&db, &["status"]).stdout).contains("nightly"), "engine status does not show the schedule");

    for (args, says) in [
        (vec!["cron", "add", "bad", "every day", "echo"], "is not valid"),
        (vec!["cron", "add", "bad", "* * * * *", "echo", "--tz", "Mars/Olympus"], "unknown time zone"),
        (vec!["cron", "add", "bad", "* * * * *", "no_such_type"], "unknown task type"),
        (vec!["cron", "add", "", "* * * * *", "echo"], "name"),
        (vec!["cron", "remove", "bad"], "there is no schedule"),
    ] {
        let out = engine(&db, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: stderr lacks `{says}`: {}", text(&out.stderr));
    }
    let out = engine(&db, &["cron", "remove", "nightly"]);
    assert_eq!(text(&out.stdout).trim(), "schedule nightly removed");
    assert!(!text(&engine(&db, &["cron", "list"]).stdout).contains("nightly"));
}

#[test]
fn engine_status_keeps_its_columns_aligned_past_long_names_and_shows_a_lost_attempts_worker_as_a_dash() {
    let db = TestDatabase::new();
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.connect(),
        "INSERT INTO tasks (id, task_class, status, attempts) VALUES
             (1, 'a_task_type_with_a_rather_long_name', 'failed', 1),
             (2, 'echo', 'stopped', 1);
         INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, error, instance, worker) VALUES
             (1, 1, now(), now(), 'lost: its instance stopped sending heartbeats',
              'an-instance-with-a-long-host-name-12345', -1),
             (2, 1, now(), now(), NULL, 'short', 3)",
    )
    .unwrap();
    let out = engine(&db, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    // The counts: every line ends where the header's last column does.
    let counts: Vec<&str> = shown.lines().take_while(|l| !l.is_empty()).collect();
    assert!(counts.len() == 4 && counts.iter().all(|l| l.len() == counts[0].len()), "{shown}");
    // The executions: each outcome starts under its header.
    let header = shown.lines().find(|l| l.trim_start().starts_with("EXEC")).unwrap_or_else(|| panic!("{shown}"));
    let at = header.find("OUTCOME").unwrap();
    let lost = shown.lines().find(|l| l.contains("an-instance-with-a-long")).unwrap_or_else(|| panic!("{shown}"));
    let ok = shown.lines().find(|l| l.contains("short/3")).unwrap_or_else(|| panic!("{shown}"));
    assert!(lost[at..].starts_with("error: lost") && ok[at..].starts_with("ok"), "{shown}");
    // Which worker ran a lost attempt died with its instance: shown as `-`, not -1.
    assert!(lost.contains("an-instance-with-a-long-host-name-12345/- "), "{lost}");
}

#[test]
fn a_queue_setting_for_a_queue_nothing_names_is_stored_with_a_warning_and_exit_0() {
    let db = TestDatabase::new();
    let run = |args: &[&str]| {
        let out = engine(&db, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        text(&out.stderr)
    };
    run(&["enqueue", "noop", "--queue", "emails"]);
    run(&["cron", "add", "nightly", "0 2 * * *", "noop", "--queue", "reports"]);
    for (args, queue) in [
        (&["queue", "pause", "invocies"][..], "invocies"),
        (&["queue", "resume", "nosuch"], "nosuch"),
        (&["queue", "limit", "nosuchqueue", "3"], "nosuchqueue"),
        (&["queue", "key-limit", "nosuchqueue", "2"], "nosuchqueue"),
        (&["queue", "rate", "nosuchqueue", "5/1s"], "nosuchqueue"),
    ] {
        let said = run(args);
        assert!(
            said.contains(&format!("warning: queue {queue}: no task type this engine knows declares it"))
                && said.contains(&format!("`engine queue remove {queue}` removes it")),
            "{args:?}: {said}"
        );
    }
    // Stored all the same: a queue may be set up before its first task.
    let listed = text(&engine(&db, &["queue", "list"]).stdout);
    let fields = |queue: &str| -> Vec<String> {
        let line = listed.lines().find(|l| l.starts_with(&format!("{queue} "))).unwrap_or_else(|| panic!("{listed}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    assert_eq!(fields("invocies")[4], "paused", "{listed}");
    assert_eq!(fields("nosuchqueue")[5..8], ["3", "2", "5/1s"], "{listed}");
    // A queue the engine's types declare, or a task or a schedule names: no warning.
    for args in [&["queue", "pause", "default"][..], &["queue", "pause", "emails"], &["queue", "limit", "reports", "1"]]
    {
        assert_eq!(run(args), "", "{args:?}");
    }
}

#[test]
fn engine_queue_remove_deletes_a_queues_settings_and_leaves_its_tasks_to_run_without_them() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    for args in [
        &["queue", "pause", "emails"][..],
        &["queue", "limit", "emails", "1"],
        &["enqueue", "noop", "--queue", "emails", "--count", "2"],
    ] {
        let out = engine(&db, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let out = engine(&db, &["queue", "remove", "emails"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "queue emails: settings removed; its tasks, if any, run as those of a queue without settings"
    );
    let rows: i64 =
        diesel::sql_query("SELECT count(*) AS n FROM task_engine_queues").get_result::<N>(&mut conn).unwrap().n;
    assert_eq!(rows, 0);
    let listed = text(&engine(&db, &["queue", "list"]).stdout);
    let line = listed.lines().find(|l| l.starts_with("emails ")).unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(line.split_whitespace().take(8).collect::<Vec<_>>(), ["emails", "2", "0", "0", "active", "-", "-", "-"]);
    assert_eq!(count_in_status(&mut conn, "waiting"), 2, "its tasks were touched");

    // Nothing to remove, or no name: exit 2.
    for (args, says) in [
        (&["queue", "remove", "emails"][..], "queue emails has no settings to remove"),
        (&["queue", "remove", ""], "queue name"),
    ] {
        let out = engine(&db, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{args:?}: {}", text(&out.stderr));
    }

    // No longer paused: an instance of the queue runs its tasks.
    let instance = task_engine::Runner::new(db.url(), task_engine::Registry::from_inventory().unwrap())
        .queue("emails", 2)
        .start()
        .unwrap();
    wait_until("the queue's tasks ran", || count_in_status(&mut conn, "stopped") == 2);
    instance.shutdown();
}

#[test]
fn a_bulk_retry_or_cancel_that_matches_nothing_warns_about_a_type_or_queue_nothing_has() {
    let db = TestDatabase::new();
    diesel::sql_query("INSERT INTO tasks (task_class, status) VALUES ('resize_image', 'failed')")
        .execute(&mut db.connect())
        .unwrap();
    for (args, stdout, warning) in [
        (
            &["retry", "--status", "failed", "--type", "nosuchtype"][..],
            "0 task(s) waiting again",
            Some("type nosuchtype"),
        ),
        (
            &["cancel", "--status", "waiting", "--type", "nosuchtype"],
            "0 waiting task(s) cancelled",
            Some("type nosuchtype"),
        ),
        (
            &["retry", "--status", "failed", "--queue", "nosuchqueue"],
            "0 task(s) waiting again",
            Some("queue nosuchqueue"),
        ),
        // Known here, or had by a task: no warning.
        (&["retry", "--status", "failed", "--type", "echo"], "0 task(s) waiting again", None),
        (&["cancel", "--status", "waiting", "--type", "resize_image"], "0 waiting task(s) cancelled", None),
        (&["retry", "--status", "cancelled", "--queue", "default"], "0 task(s) waiting again", None),
    ] {
        let out = engine(&db, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), stdout, "{args:?}");
        let stderr = text(&out.stderr);
        match warning {
            Some(what) => assert!(stderr.contains("warning: ") && stderr.contains(what), "{args:?}: {stderr}"),
            None => assert_eq!(stderr, "", "{args:?}"),
        }
    }
}

#[test]
fn queue_list_and_status_flag_a_queue_no_live_instance_runs_and_a_limit_of_0() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    for args in [
        &["enqueue", "noop"][..],
        &["enqueue", "noop", "--queue", "emails", "--count", "2"],
        &["enqueue", "noop", "--queue", "held"],
    ] {
        assert!(engine(&db, args).status.success(), "{args:?}");
    }
    let out = engine(&db, &["queue", "limit", "held", "0"]);
    assert!(text(&out.stdout).contains("held, none of its tasks starts"), "{}", text(&out.stdout));
    // A live instance runs `default` and `held`; the one that ran `emails` is dead.
    diesel::sql_query(
        "INSERT INTO task_engine_instances (name, host, pid, lease, last_seen_at, queues) VALUES
             ('live', 'h', 1, interval '30 seconds', now(), '{default,held}'),
             ('gone', 'h', 2, interval '1 second', now() - interval '1 minute', '{emails}')",
    )
    .execute(&mut conn)
    .unwrap();
    let note = "no live instance runs this queue";
    let lines = |args: &[&str]| {
        let shown = text(&engine(&db, args).stdout);
        let line = |queue: &str| {
            shown.lines().find(|l| l.starts_with(&format!("{queue} "))).unwrap_or_else(|| panic!("{shown}")).to_owned()
        };
        (line("default"), line("emails"), line("held"))
    };
    for args in [&["queue", "list"][..], &["status"]] {
        let (default, emails, held) = lines(args);
        assert!(!default.contains(note) && default.contains(" active "), "{args:?}: {default}");
        assert!(emails.contains(note), "{args:?}: {emails}");
        assert!(held.contains(" held (limit 0) ") && !held.contains(note), "{args:?}: {held}");
    }
    // An instance of a version that does not record its queues may run any: no flag.
    diesel::sql_query(
        "INSERT INTO task_engine_instances (name, host, pid, lease, last_seen_at) VALUES
             ('older', 'h', 3, interval '30 seconds', now())",
    )
    .execute(&mut conn)
    .unwrap();
    assert!(!lines(&["queue", "list"]).1.contains(note));
    let status = text(&engine(&db, &["status"]).stdout);
    let older = status.lines().find(|l| l.starts_with("older ")).unwrap_or_else(|| panic!("{status}"));
    assert!(older.contains(" ? "), "{older}");
}

#[test]
fn an_instance_records_the_queues_it_runs_in_its_row() {
    let db = TestDatabase::new();
    let instance = task_engine::Runner::new(db.url(), task_engine::Registry::from_inventory().unwrap())
        .instance("recorder")
        .queue("emails", 1)
        .queue("reports", 2)
        .start()
        .unwrap();
    #[derive(QueryableByName)]
    struct Queues {
        #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Text>)]
        queues: Vec<String>,
    }
    let row: Queues = diesel::sql_query("SELECT queues FROM task_engine_instances WHERE name = 'recorder'")
        .get_result(&mut db.connect())
        .unwrap();
    instance.shutdown();
    assert_eq!(row.queues, ["emails", "reports"]);
}

#[test]
fn a_sleep_interrupted_by_sigterm_waits_again_with_its_attempt_unused() {
    let db = TestDatabase::new();
    let out = engine(&db, &["enqueue", "sleep", "--params", r#"{"ms": 600000}"#, "--max-attempts", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let child = spawn_engine_run(&db, &["--workers", "1", "--instance", "deployed"], Stdio::piped());
    let mut conn = db.connect();
    wait_until("the sleep has started", || count_in_status(&mut conn, "running") == 1);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let (status, attempts, max_attempts): (String, i32, i32) =
        tasks::table.select((tasks::status, tasks::attempts, tasks::max_attempts)).first(&mut conn).unwrap();
    assert_eq!((status.as_str(), attempts, max_attempts), ("waiting", 1, 2));
    let shown = text(&engine(&db, &["status", "--task", &id]).stdout);
    assert!(shown.contains("interrupted by its instance's stop: asked to stop while sleeping"), "{shown}");
}

/// `--listen-url none`: no session at all. The instance says it polls, finds a task
/// inserted with no one listening, and a cancel whose notification nobody hears
/// reaches the running task within a heartbeat or so; `engine status` shows the
/// connections it holds (no session).
#[test]
fn engine_run_without_a_listener_polls_and_hears_a_cancel_at_its_heartbeat() {
    let db = TestDatabase::new();
    let mut child = spawn_engine_run(
        &db,
        &["--workers", "1", "--instance", "deaf", "--listen-url", "none", "--lease", "3s", "--poll-interval", "200ms"],
        Stdio::piped(),
    );
    let out = engine(&db, &["enqueue", "sleep", "--params", r#"{"ms": 600000}"#]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id: i64 = text(&out.stdout).trim().parse().unwrap();
    let status =
        |db: &TestDatabase| -> String { tasks::table.find(id).select(tasks::status).first(&mut db.connect()).unwrap() };
    wait_until("the polling instance runs the task", || status(&db) == "running");
    let cancelled = engine(&db, &["cancel", &id.to_string()]);
    assert_eq!(cancelled.status.code(), Some(0), "{}", text(&cancelled.stderr));
    let asked = std::time::Instant::now();
    wait_until("the cancel reaches the task", || status(&db) == "cancelled");
    // A heartbeat every half second: one on its way, the next finds it.
    assert!(asked.elapsed() < std::time::Duration::from_secs(3), "the cancel took {:?}", asked.elapsed());

    wait_until("a heartbeat records the connections", || {
        text(&engine(&db, &["status"]).stdout).contains("(session 0, heartbeat 1, claims 1")
    });
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{log}");
    assert!(log.contains("no listener: it polls every 200ms"), "{log}");
    assert!(log.contains("connections: no session (no listener: the instance polls)"), "{log}");
}
