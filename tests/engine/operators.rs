//! What an operator does to tasks: cancel one (waiting, running, waiting for a worker,
//! while the listener is away), retry one, prune, and retry or cancel many.
//! Engines poll once an hour: a start can only come from a notification, the
//! due-time timer or a worker looking for its next task.

use std::time::Duration;

use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::tasks;
use task_engine::{Cancelled, Error, NewTask};
use test_db::TestDatabase;

use crate::support::{
    echo, executions_of, load_task, runner, start_engine, status_of, wait_for_status, wait_until, wait_until_all_ended,
    wait_until_idle, AlwaysFails, Counted, Gate, Gated, UntilCancelled,
};

#[test]
fn a_cancelled_waiting_task_never_runs_and_an_ended_one_cannot_be_cancelled() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "cancel-waiting", 2);
    wait_until_idle(&engine, 2);
    let mut conn = db.connect();

    let cancelled = echo(serde_json::json!("never")).run_in(Duration::from_secs(2)).insert(&mut conn).unwrap();
    assert_eq!(task_engine::cancel(&mut conn, cancelled).unwrap(), Cancelled::Waiting);
    // Due after the cancelled one: once it has run, the cancelled one had its chance.
    let witness = echo(serde_json::json!("after")).run_in(Duration::from_millis(2300)).insert(&mut conn).unwrap();
    wait_for_status(&mut conn, witness, status::STOPPED);
    assert_eq!(load_task(&mut conn, cancelled).status, status::CANCELLED);
    assert!(executions_of(&mut conn, cancelled).is_empty());

    let refused = task_engine::cancel(&mut conn, witness).unwrap_err();
    assert!(matches!(&refused, Error::InvalidTransition { status, .. } if status == "stopped"), "{refused}");
    assert_eq!(
        refused.to_string(),
        format!("cannot cancel task {witness}: it is stopped (only waiting or running tasks can be cancelled)")
    );
    assert!(matches!(task_engine::cancel(&mut conn, 999_999), Err(Error::TaskNotFound(999_999))));
    engine.shutdown();
}

#[test]
fn a_cancelled_running_task_is_asked_to_stop_and_ends_cancelled() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "cancel-running", 1);
    wait_until_idle(&engine, 1);
    let mut conn = db.connect();
    let gate_name = format!("{}-{}-until-cancelled", db.name(), std::process::id());
    let id = task_engine::enqueue(&mut conn, &UntilCancelled { gate: gate_name.clone() }).unwrap();
    // Started, not only claimed: a cancel heard while the task waits for its worker
    // ends it "cancelled before it started".
    Gate::named(&gate_name).wait_for_started(1);

    assert_eq!(task_engine::cancel(&mut conn, id).unwrap(), Cancelled::Running);
    wait_for_status(&mut conn, id, status::CANCELLED);
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1, "a cancelled task was retried");
    assert_eq!(executions[0].error.as_deref(), Some("cancelled while running"));
    assert!(load_task(&mut conn, id).cancel_requested_at.is_some());
    engine.shutdown();
}

#[test]
fn a_failed_task_retried_by_an_operator_runs_again_and_keeps_its_history() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "operator-retry", 1);
    wait_until_idle(&engine, 1);
    let mut conn = db.connect();
    let id = NewTask::new(&AlwaysFails {}).unwrap().max_attempts(1).insert(&mut conn).unwrap();
    wait_for_status(&mut conn, id, status::FAILED);

    let waiting = echo(serde_json::json!("w")).run_in(Duration::from_secs(3600)).insert(&mut conn).unwrap();
    assert!(matches!(task_engine::retry(&mut conn, waiting), Err(Error::InvalidTransition { .. })));
    assert!(matches!(task_engine::retry(&mut conn, 999_999), Err(Error::TaskNotFound(999_999))));

    let runs_before = engine.stats().claims;
    task_engine::retry(&mut conn, id).unwrap();
    wait_until("the retried task has run again", || executions_of(&mut conn, id).len() == 2);
    wait_for_status(&mut conn, id, status::FAILED);
    assert!(engine.stats().claims > runs_before);
    let task = load_task(&mut conn, id);
    assert_eq!((task.attempts, task.max_attempts), (2, 2));
    let errors: Vec<String> = executions_of(&mut conn, id).into_iter().map(|e| e.error.unwrap()).collect();
    assert_eq!(errors, ["attempt 1 failed", "attempt 2 failed"]);
    engine.shutdown();
}

#[test]
fn a_prune_racing_a_retry_keeps_the_task_it_retried() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(
        "INSERT INTO tasks (id, task_class, status, attempts, updated_at) VALUES (1, 'noop', 'failed', 1, now() - interval '10 days');
         INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, error, instance, worker)
             VALUES (1, 1, now() - interval '10 days', now() - interval '10 days', 'boom', 'i', 0)",
    )
    .unwrap();
    // An operator's retry, between its lock and its commit.
    let mut operator = db.connect();
    operator
        .batch_execute(
            "BEGIN; SELECT status FROM tasks WHERE id = 1 FOR UPDATE;
             UPDATE tasks SET status = 'waiting', run_at = now(), updated_at = now() WHERE id = 1",
        )
        .unwrap();
    // The prune picks the task (the retry is not committed) and waits for its row.
    let url = db.url().to_owned();
    let pruner = std::thread::spawn(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        task_engine::prune(&mut conn, Duration::from_secs(7 * 86_400), 100).unwrap()
    });
    wait_until("the prune waits for the retried row", || {
        diesel::sql_query(
            "SELECT 1 AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM tasks%'",
        )
        .execute(&mut conn)
        .unwrap()
            == 1
    });
    operator.batch_execute("COMMIT").unwrap();
    assert_eq!(pruner.join().unwrap(), 0, "the prune deleted a task an operator had just retried");
    assert_eq!(status_of(&mut conn, 1), status::WAITING);
    assert_eq!(executions_of(&mut conn, 1).len(), 1);
}

#[test]
fn a_task_cancelled_while_it_waits_for_a_worker_never_starts() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let key = format!("{}-early", db.name());
    let gate_name = format!("{}-early", db.name());
    let gate = Gate::named(&gate_name);
    // One worker; claimed tasks wait for it (never given back in this test).
    let engine = runner(&db, "busy", 1).max_queue_wait(Duration::from_secs(3600)).start().unwrap();
    // Short tasks first: the instance learns to claim ahead.
    NewTask::new(&::tasks::Noop {}).unwrap().insert_copies(&mut conn, 20).unwrap();
    wait_until("the first tasks have run", || crate::support::unfinished(&mut conn) == 0);
    let mut batch = vec![NewTask::new(&Gated { gate: gate_name }).unwrap().priority(10)];
    batch.extend((0..5).map(|_| NewTask::new(&Counted { key: key.clone() }).unwrap()));
    let ids = task_engine::enqueue_many(&mut conn, &batch).unwrap();
    gate.wait_for_started(1);
    wait_until("the 5 tasks are claimed behind the gated one", || {
        tasks::table
            .filter(tasks::id.eq_any(&ids[1..]))
            .filter(tasks::status.eq(status::RUNNING))
            .count()
            .get_result::<i64>(&mut conn)
            .unwrap()
            == 5
    });

    assert_eq!(task_engine::cancel(&mut conn, ids[3]).unwrap(), Cancelled::Running);
    wait_until("the instance has heard the cancel", || engine.stats().cancels_heard == 1);
    gate.open();
    wait_until_all_ended(&mut conn);
    assert_eq!(load_task(&mut conn, ids[3]).status, status::CANCELLED);
    let executions = executions_of(&mut conn, ids[3]);
    assert_eq!(executions.len(), 1);
    assert_eq!(executions[0].error.as_deref(), Some("cancelled before it started"));
    assert_eq!(crate::support::counted_runs(&key), 4, "the cancelled task ran");
    engine.shutdown();
}

#[test]
fn a_cancel_sent_while_the_listener_is_away_still_reaches_the_running_task() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::new();
    let engine = start_engine(&db, "reconnecting", 1);
    wait_until_idle(&engine, 1);
    let mut conn = db.connect();
    let id = task_engine::enqueue(&mut conn, &::tasks::Sleep { ms: 600_000 }).unwrap();
    wait_for_status(&mut conn, id, status::RUNNING);

    // The listener is cut off, and kept out while the cancel's notification goes.
    let mut admin = PgConnection::establish(&test_db::with_database(db.url(), "postgres")).unwrap();
    let quoted = format!("\"{}\"", db.name());
    admin.batch_execute(&format!("ALTER DATABASE {quoted} ALLOW_CONNECTIONS false")).unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'task_engine session reconnecting'",
        )
        .unwrap();
    wait_until("the listener has noticed", || !engine.stats().listening);
    assert_eq!(task_engine::cancel(&mut conn, id).unwrap(), Cancelled::Running);
    admin.batch_execute(&format!("ALTER DATABASE {quoted} ALLOW_CONNECTIONS true")).unwrap();

    wait_for_status(&mut conn, id, status::CANCELLED);
    assert_eq!(executions_of(&mut conn, id)[0].error.as_deref(), Some("asked to stop while sleeping"));
    engine.shutdown();
}

#[test]
fn a_cancel_whose_notification_is_lost_reaches_the_running_task_within_a_heartbeat() {
    let db = TestDatabase::new();
    // A lease of 3 s: a heartbeat every half second.
    let engine = runner(&db, "lost-cancel", 1).lease(Duration::from_secs(3)).start().unwrap();
    wait_until_idle(&engine, 1);
    let mut conn = db.connect();
    let gate_name = format!("{}-lost-cancel", db.name());
    let gate = Gate::named(&gate_name);
    let id = task_engine::enqueue(&mut conn, &UntilCancelled { gate: gate_name }).unwrap();
    gate.wait_for_started(1);

    // The listener's backend is terminated; it reconnects, and finds no cancel then.
    #[derive(QueryableByName)]
    struct Terminated {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let terminated = diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity
         WHERE application_name = 'task_engine session lost-cancel'",
    )
    .get_result::<Terminated>(&mut conn)
    .unwrap();
    assert_eq!(terminated.n, 1, "no listener connection to terminate");
    wait_until("the listener is back", || {
        let stats = engine.stats();
        stats.listener_connections == 2 && stats.listening
    });
    // The cancel, by plain SQL: no notification at all.
    diesel::sql_query("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(id)
        .execute(&mut conn)
        .unwrap();
    let beats = engine.stats().heartbeats;
    wait_for_status(&mut conn, id, status::CANCELLED);
    // One heartbeat may have been on its way as the cancel committed, the next finds
    // it, and a third may go by while the attempt is recorded.
    let took = engine.stats().heartbeats - beats;
    assert!(took <= 3, "the cancel took {took} heartbeats to arrive");
    assert_eq!(executions_of(&mut conn, id)[0].error.as_deref(), Some("cancelled while running"));
    let stats = engine.stats();
    assert_eq!((stats.cancels_found, stats.cancels_heard), (1, 0), "not found by a heartbeat");
    engine.shutdown();
}

#[test]
fn a_bulk_retry_puts_back_the_failed_tasks_its_filters_match_in_batches_and_wakes_an_instance() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    use diesel::connection::SimpleConnection;
    // Failed tasks: 5 recent `echo` in `default`, 2 recent `echo` in `other`, 1 old
    // `echo`, 2 recent `noop`; and a cancelled `echo`, which a retry of failed leaves.
    conn.batch_execute(
        "INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts, queue, updated_at)
         SELECT 'echo', '1', 'failed', 3, 3, 'default', now() FROM generate_series(1, 5);
         INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts, queue, updated_at)
         SELECT 'echo', '1', 'failed', 3, 3, 'other', now() FROM generate_series(1, 2);
         INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts, updated_at)
         VALUES ('echo', '1', 'failed', 3, 3, now() - interval '2 hours');
         INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts, updated_at)
         SELECT 'noop', '{}', 'failed', 1, 1, now() FROM generate_series(1, 2);
         INSERT INTO tasks (task_class, task_parameters, status, attempts, max_attempts)
         VALUES ('echo', '1', 'cancelled', 1, 3)",
    )
    .unwrap();
    let engine = start_engine(&db, "a", 2);
    wait_until_idle(&engine, 2);
    let filter = task_engine::TaskFilter {
        task_type: Some("echo".into()),
        queue: Some("default".into()),
        since: Some(Duration::from_secs(3600)),
        ..task_engine::TaskFilter::status(status::FAILED)
    };
    // Batches of 2: three transactions for five tasks.
    assert_eq!(task_engine::retry_many(&mut conn, &filter, 2).unwrap(), 5);
    // Woken, not polled: the five run, each with one more attempt than it had used.
    wait_until("the five ran again", || {
        tasks::table.filter(tasks::status.eq(status::STOPPED)).count().get_result::<i64>(&mut conn).unwrap() == 5
    });
    let left: Vec<(String, String)> = tasks::table
        .filter(tasks::status.ne(status::STOPPED))
        .select((tasks::task_class, tasks::status))
        .order(tasks::id)
        .load(&mut conn)
        .unwrap();
    let failed = |t: &str| (t.to_owned(), status::FAILED.to_owned());
    assert_eq!(
        left,
        [
            failed("echo"),
            failed("echo"),
            failed("echo"),
            failed("noop"),
            failed("noop"),
            ("echo".to_owned(), status::CANCELLED.to_owned())
        ]
    );
    // A retry of waiting tasks is refused.
    let refused = task_engine::retry_many(&mut conn, &task_engine::TaskFilter::status(status::WAITING), 10);
    assert!(matches!(refused, Err(Error::InvalidValue(_))), "{refused:?}");
    engine.shutdown();
}

#[test]
fn a_bulk_cancel_cancels_the_waiting_tasks_of_its_queue_and_no_other() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let in_queue: Vec<NewTask> =
        (0..7).map(|i| echo(serde_json::json!(i)).queue("doomed").run_in(Duration::from_secs(3600))).collect();
    let elsewhere: Vec<NewTask> =
        (0..3).map(|i| echo(serde_json::json!(i)).run_in(Duration::from_secs(3600))).collect();
    task_engine::enqueue_many(&mut conn, &in_queue).unwrap();
    task_engine::enqueue_many(&mut conn, &elsewhere).unwrap();
    let filter =
        task_engine::TaskFilter { queue: Some("doomed".into()), ..task_engine::TaskFilter::status(status::WAITING) };
    assert_eq!(task_engine::cancel_many(&mut conn, &filter, 3).unwrap(), 7);
    let by_queue: Vec<(String, String)> =
        tasks::table.select((tasks::queue, tasks::status)).order(tasks::id).load(&mut conn).unwrap();
    let expected: Vec<(String, String)> = std::iter::repeat(("doomed".to_owned(), status::CANCELLED.to_owned()))
        .take(7)
        .chain(std::iter::repeat(("default".to_owned(), status::WAITING.to_owned())).take(3))
        .collect();
    assert_eq!(by_queue, expected);
}
