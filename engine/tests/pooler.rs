//! The `engine` command through a transaction pooler: PgBouncer in transaction pool
//! mode, started by the test harness in front of its private cluster, where each
//! transaction of a client may run on another server connection, and a server
//! connection passes from one client to the next with what they left on it. Skipped,
//! saying why, where the harness cannot start one (no `pgbouncer` installed).

use std::process::{Command, Output, Stdio};

use diesel::prelude::*;
use task_engine::schema::tasks;
use test_db::TestDatabase;

mod fleet;

/// Whether PgBouncer can run here; if not, says why (past the test capture, so that a
/// run's log shows it) and the test passes.
fn pooler_available() -> bool {
    match test_db::pooler_unavailable() {
        None => true,
        Some(why) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "skipped: no transaction pooler: {why}");
            false
        }
    }
}

/// Runs `engine` with `args`, its `DATABASE_URL` `url`.
fn engine(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("TASK_ENGINE_INSTANCE")
        .stdin(Stdio::null())
        .output()
        .expect("engine runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `engine` with `args` through the pooler, expects exit 0, and returns what it
/// printed.
fn ok(url: &str, args: &[&str]) -> String {
    let out = engine(url, args);
    assert_eq!(out.status.code(), Some(0), "engine {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn status_of(db: &TestDatabase, id: i64) -> String {
    tasks::table.find(id).select(tasks::status).first(&mut db.connect()).unwrap()
}

#[test]
fn every_one_shot_command_works_through_a_transaction_pooler() {
    if !pooler_available() {
        return;
    }
    let db = TestDatabase::new();
    let url = db.pooled_url();

    assert_eq!(ok(&url, &["migrate"]).trim(), "the schema is up to date");
    let id: i64 = ok(&url, &["enqueue", "echo", "--params", r#"{"x": 1}"#]).trim().parse().expect("an id");
    assert_eq!(
        ok(&url, &["enqueue", "noop", "--count", "3", "--queue", "mail"]).trim(),
        format!("3 tasks inserted, ids {} to {} (--ids prints each)", id + 1, id + 3)
    );
    let keyed = |params: &str| ok(&url, &["enqueue", "echo", "--params", params, "--in", "1h", "--unique-key", "k"]);
    let holder = keyed(r#"{"x": 2}"#);
    assert_eq!(keyed(r#"{"x": 3}"#), holder, "the unique key's holder");
    let status = ok(&url, &["status"]);
    assert!(status.contains("waiting"), "{status}");
    let history = ok(&url, &["status", "--task", &id.to_string()]);
    assert!(history.contains("echo"), "{history}");

    assert_eq!(ok(&url, &["cancel", &id.to_string()]).trim(), format!("task {id} cancelled: it will not run"));
    assert_eq!(status_of(&db, id), "cancelled");
    assert_eq!(ok(&url, &["retry", &id.to_string()]).trim(), format!("task {id} is waiting again"));
    assert_eq!(status_of(&db, id), "waiting");
    assert_eq!(ok(&url, &["cancel", "--status", "waiting", "--queue", "mail"]).trim(), "3 waiting task(s) cancelled");
    assert_eq!(ok(&url, &["retry", "--status", "cancelled", "--queue", "mail"]).trim(), "3 task(s) waiting again");

    assert_eq!(
        ok(&url, &["queue", "pause", "mail"]).trim(),
        "queue mail paused: no instance claims from it until `engine queue resume mail`"
    );
    assert_eq!(ok(&url, &["queue", "limit", "mail", "2"]).trim(), "queue mail: at most 2 at once");
    assert_eq!(ok(&url, &["queue", "rate", "mail", "5/1s"]).trim(), "queue mail: at most 5 starts per 1s");
    assert_eq!(ok(&url, &["queue", "resume", "mail"]).trim(), "queue mail resumed");
    let queues = ok(&url, &["queue", "list"]);
    assert!(queues.contains("mail"), "{queues}");
    assert!(ok(&url, &["queue", "remove", "mail"]).starts_with("queue mail: settings removed"));

    assert_eq!(ok(&url, &["cron", "add", "nightly", "0 3 * * *", "noop"]).trim(), "schedule nightly added");
    let schedules = ok(&url, &["cron", "list"]);
    assert!(schedules.contains("nightly"), "{schedules}");
    assert_eq!(ok(&url, &["cron", "remove", "nightly"]).trim(), "schedule nightly removed");

    assert_eq!(ok(&url, &["prune", "--older-than", "7d"]).trim(), "0 finished task(s) deleted, with their executions");
    assert!(ok(&url, &["tasks"]).lines().any(|l| l.starts_with("noop\t")));

    // Bad input through the pooler: exit 2, nothing inserted.
    let before: i64 = tasks::table.count().get_result(&mut db.connect()).unwrap();
    let out = engine(&url, &["enqueue", "no_such_type"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no_such_type"), "{}", text(&out.stderr));
    assert_eq!(tasks::table.count().get_result::<i64>(&mut db.connect()).unwrap(), before);
}

/// A fleet whose pods each run `engine migrate` at start, through the pooler, on a
/// fresh database: released together (each waits on its stdin, closed for all at once),
/// more of them than the pooler has server connections, so that they share them.
#[test]
fn engine_migrates_at_once_through_a_transaction_pooler_all_exit_0_and_apply_each_migration_once() {
    if !pooler_available() {
        return;
    }
    #[derive(QueryableByName, PartialEq, Debug)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let versions = |conn: &mut PgConnection| -> Vec<String> {
        diesel::sql_query("SELECT version::text AS version FROM __diesel_schema_migrations ORDER BY 1")
            .load::<Version>(conn)
            .unwrap()
            .into_iter()
            .map(|v| v.version)
            .collect()
    };
    let db = TestDatabase::new();
    let expected = versions(&mut db.connect());
    assert!(expected.len() > 20);
    // An empty database: the fleet's. Dropped with the test's.
    diesel::connection::SimpleConnection::batch_execute(
        &mut db.connect(),
        "DROP SCHEMA public CASCADE; CREATE SCHEMA public",
    )
    .unwrap();
    let applied = fleet::migrate_at_once(&db.pooled_url(), pg_cluster::POOL_SIZE as usize + 2);
    assert_eq!(applied, expected, "each migration applied once, by one of the fleet");
    assert_eq!(versions(&mut db.connect()), expected);
}
