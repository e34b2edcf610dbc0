//! The builder's settings: refused when out of range, before anything is touched,
//! with the setting named; never adjusted silently.

use std::time::Duration;

use task_engine::{Error, Registry, Runner};

/// A runner on a database that does not exist: a setting refused before connecting
/// says so, not that the database cannot be reached.
fn runner() -> Runner {
    Runner::new("postgres://nobody@127.0.0.1:1/none", Registry::default())
}

#[test]
fn settings_out_of_range_are_refused_by_name_before_connecting() {
    let cases: Vec<(&str, Runner)> = vec![
        ("workers", runner().workers(0)),
        ("workers", runner().workers(Runner::MAX_WORKERS + 1)),
        ("poll_interval", runner().poll_interval(Duration::ZERO)),
        ("max_queue_wait", runner().max_queue_wait(Duration::from_millis(1))),
        ("lease", runner().lease(Duration::from_millis(100))),
        ("lease", runner().lease(Duration::from_secs(2 * 86_400))),
        ("max_claim", runner().max_claim(0)),
        ("max_completion_batch", runner().max_completion_batch(0)),
        ("timeout_grace", runner().timeout_grace(Duration::from_secs(2 * 86_400))),
        ("instance", runner().instance("")),
        ("instance", runner().instance("tab\there")),
    ];
    for (expected, runner) in cases {
        match runner.start() {
            Err(Error::InvalidSetting { setting, reason }) => {
                assert_eq!(setting, expected, "{reason}");
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("{expected}: refused for another reason: {other}"),
            Ok(_) => panic!("{expected}: accepted"),
        }
    }
}

#[test]
fn settings_in_range_go_on_to_connect() {
    let started = runner().workers(1).lease(Duration::from_secs(1)).max_queue_wait(Runner::MIN_MAX_QUEUE_WAIT).start();
    assert!(
        !matches!(started, Err(Error::InvalidSetting { .. })),
        "a setting in range was refused: {:?}",
        started.err()
    );
}

#[test]
fn a_database_without_the_engine_schema_is_refused_at_start_with_what_to_run() {
    let db = test_db::TestDatabase::new();
    let mut conn = db.connect();
    diesel::connection::SimpleConnection::batch_execute(&mut conn, "CREATE SCHEMA elsewhere").unwrap();
    // The same database seen through a schema that was never migrated.
    let url = format!("{}?options=-csearch_path%3Delsewhere", db.url());
    let refused = Runner::new(url, Registry::default()).workers(1).start().err().expect("refused");
    let message = refused.to_string();
    assert!(matches!(refused, Error::Config(_)), "{message}");
    assert!(message.contains("run task_engine::run_migrations"), "{message}");
    assert!(message.contains("tasks, task_executions, task_engine_instances, task_engine_queues"), "{message}");

    // Migrated before this version: the last migration's index is missing.
    diesel::connection::SimpleConnection::batch_execute(&mut conn, "DROP TABLE task_engine_queues").unwrap();
    let refused = Runner::new(db.url(), Registry::default()).workers(1).start().err().expect("refused");
    assert!(refused.to_string().contains("(task_engine_queues missing)"), "{refused}");
}
