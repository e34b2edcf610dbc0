//! The connections an instance holds, as the server counts them (`pg_stat_activity`):
//! few, whatever its workers and queues (docs/operations.md, "Connections"); and an
//! instance without a listener, which holds no session at all.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::models::status;
use task_engine::{Cancelled, RunningEngine};
use test_db::TestDatabase;

use crate::support::*;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Seen {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    names: String,
}

/// The server connections to the test's database, but the one asking (client backends:
/// autovacuum's workers show under the database too).
fn server_connections(conn: &mut PgConnection) -> i64 {
    connections_seen(conn).n
}

/// The same, with their names, for a failure to show.
fn connections_seen(conn: &mut PgConnection) -> Seen {
    diesel::sql_query(
        "SELECT count(*) AS n, coalesce(string_agg(application_name, ', '), '') AS names FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .get_result::<Seen>(conn)
    .unwrap()
}

/// Inserts `per_queue` no-op tasks (which use no connection) into each of `queues`,
/// and returns the most server connections seen while they drain, sampled every few
/// milliseconds.
fn most_connections_while_draining(conn: &mut PgConnection, queues: &[&str], per_queue: usize) -> Seen {
    for queue in queues {
        conn.batch_execute(&format!(
            "INSERT INTO tasks (task_class, queue) SELECT 'noop', '{queue}' FROM generate_series(1, {per_queue})"
        ))
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most = Seen { n: 0, names: String::new() };
    loop {
        let seen = connections_seen(conn);
        if seen.n > most.n {
            most = seen;
        }
        let left = diesel::sql_query("SELECT count(*) AS n FROM tasks WHERE status IN ('waiting', 'running')")
            .get_result::<Count>(conn)
            .unwrap()
            .n;
        if left == 0 {
            return most;
        }
        assert!(Instant::now() < deadline, "{left} tasks still to run after two minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `engine`'s `workers` are all idle and its session holds the stripes,
/// then returns the server connections.
fn idle_connections(conn: &mut PgConnection, engine: &RunningEngine, workers: usize) -> i64 {
    wait_until_idle(engine, workers);
    server_connections(conn)
}

#[test]
fn an_instance_of_8_workers_holds_3_connections_while_idle_and_at_most_5_while_it_drains() {
    let db = TestDatabase::new();
    let engine = runner(&db, "budget-8", 8).lease(Duration::from_secs(3)).start().unwrap();
    let mut conn = db.connect();
    let idle = idle_connections(&mut conn, &engine, 8);
    let draining = most_connections_while_draining(&mut conn, &["default"], 20_000);
    eprintln!("8 workers, 1 queue: {idle} connections idle, at most {} while draining 20,000 tasks", draining.n);
    assert!(idle <= 3, "{idle} connections while idle");
    assert!(draining.n <= 5, "{} connections while draining: {}", draining.n, draining.names);

    // Its row says what it holds (the completer's, at least, since the drain).
    let beats = engine.stats().heartbeats;
    wait_until("a heartbeat after the drain", || engine.stats().heartbeats > beats);
    let status = task_engine::report::instances(&mut conn).unwrap();
    let recorded = status[0].connections.clone().expect("connections recorded");
    assert!(recorded.contains("session 1, heartbeat 1, claims 1, completer 1"), "{recorded}");
    assert!(recorded.ends_with("+ tasks 0/8"), "{recorded}");
    engine.shutdown();
}

#[test]
fn an_instance_of_16_workers_in_4_queues_holds_as_few() {
    let db = TestDatabase::new();
    let queues = ["a", "b", "c", "d"];
    let engine = queues.iter().fold(runner(&db, "budget-16", 1), |r, q| r.queue(*q, 4)).start().unwrap();
    let mut conn = db.connect();
    let idle = idle_connections(&mut conn, &engine, 16);
    let draining = most_connections_while_draining(&mut conn, &queues, 5_000);
    eprintln!("16 workers, 4 queues: {idle} connections idle, at most {} while draining 20,000 tasks", draining.n);
    assert!(idle <= 3, "{idle} connections while idle");
    assert!(draining.n <= 5, "{} connections while draining: {}", draining.n, draining.names);
    engine.shutdown();
}

#[test]
fn without_a_listener_an_instance_holds_no_session_polls_for_work_and_hears_a_cancel_at_a_heartbeat() {
    let db = TestDatabase::new();
    // A lease of 3 s: a heartbeat every half second; a poll every 100 ms.
    let engine = runner(&db, "no-listener", 2)
        .without_listener()
        .lease(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(100))
        .start()
        .unwrap();
    let mut conn = db.connect();
    wait_until("the workers sleep", || engine.stats().sleeping_workers == 2);
    let idle = server_connections(&mut conn);
    assert!(idle <= 2, "{idle} connections without a session");
    assert!(!engine.stats().listening);

    // An insert notifies nobody: the poll finds it.
    let gate_name = format!("{}-no-listener", db.name());
    let gate = Gate::named(&gate_name);
    let id = task_engine::enqueue(&mut conn, &UntilCancelled { gate: gate_name }).unwrap();
    gate.wait_for_started(1);
    // A cancel's notification is heard by nobody: a heartbeat finds it.
    assert_eq!(task_engine::cancel(&mut conn, id).unwrap(), Cancelled::Running);
    let beats = engine.stats().heartbeats;
    wait_for_status(&mut conn, id, status::CANCELLED);
    let took = engine.stats().heartbeats - beats;
    assert!(took <= 3, "the cancel took {took} heartbeats to arrive");
    let stats = engine.stats();
    assert_eq!((stats.cancels_found, stats.cancels_heard, stats.notifications), (1, 0, 0));
    engine.shutdown();
}

#[test]
fn without_a_listener_a_second_instance_of_a_live_ones_name_is_refused() {
    let db = TestDatabase::new();
    let lease = Duration::from_secs(2);
    let first = runner(&db, "twin", 1).without_listener().lease(lease).start().unwrap();
    let started = Instant::now();
    let second = runner(&db, "twin", 1).without_listener().lease(lease).start();
    let error = second.err().expect("a second instance of a live one's name started").to_string();
    assert!(error.contains("in use"), "{error}");
    // It waited for the row to go silent, a lease, before it gave up.
    assert!(started.elapsed() >= lease, "refused after {:?}", started.elapsed());
    // Stopped, the first lets the name go: a third starts at once.
    first.shutdown();
    let third = runner(&db, "twin", 1).without_listener().lease(lease).start().unwrap();
    third.shutdown();
}
