//! Batched claims and completions.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::{task_executions, tasks};
use task_engine::NewTask;
use test_db::TestDatabase;

use crate::support::{
    attempts_not_recorded_once, counted_runs, runner, start_engine, wait_until, wait_until_idle, Counted, Gate, Gated,
    Poisoned,
};

fn count_status(conn: &mut PgConnection, wanted: &str) -> i64 {
    tasks::table.filter(tasks::status.eq(wanted)).count().get_result(conn).unwrap()
}

#[test]
fn a_batch_of_claims_never_hands_one_task_to_two_workers() {
    let db = TestDatabase::new();
    let key = format!("{}-once", db.name());
    let mut conn = db.connect();
    NewTask::new(&Counted { key: key.clone() }).unwrap().insert_copies(&mut conn, 5000).unwrap();
    let engine = runner(&db, "batches", 8).claim_buffer(100).start().unwrap();
    wait_until("the 5000 tasks have run", || count_status(&mut conn, status::STOPPED) == 5000);
    let stats = engine.stats();
    engine.shutdown();
    assert_eq!(counted_runs(&key), 5000);
    let executions: i64 = task_executions::table.count().get_result(&mut conn).unwrap();
    assert_eq!(executions, 5000);
    let untaken: i64 =
        task_executions::table.filter(task_executions::worker.lt(0)).count().get_result(&mut conn).unwrap();
    assert_eq!(untaken, 0, "an execution does not name the worker that ran it");
    assert!(stats.claims < 1000, "claims were not batched: {} claims for 5000 tasks", stats.claims);
    assert!(stats.completion_batches < 5000, "completions were not batched");
}

#[test]
fn a_stop_records_every_completion_still_buffered() {
    let db = TestDatabase::new();
    let key = format!("{}-buffered", db.name());
    let mut conn = db.connect();
    NewTask::new(&Counted { key: key.clone() }).unwrap().insert_copies(&mut conn, 50).unwrap();
    // The completer would wait an hour before writing.
    let engine = runner(&db, "buffered", 4).flush_delay(Duration::from_secs(3600)).start().unwrap();
    wait_until("the 50 tasks have run", || counted_runs(&key) == 50);
    assert_eq!(count_status(&mut conn, status::STOPPED), 0, "the outcomes were not buffered");
    engine.shutdown();
    assert_eq!(count_status(&mut conn, status::STOPPED), 50);
    assert_eq!(attempts_not_recorded_once(&mut conn), 0);
}

#[test]
fn outcomes_that_cannot_reach_the_database_are_kept_and_recorded_when_it_is_back() {
    let mut db = TestDatabase::on_own_cluster();
    let gate_name = format!("{}-{}-away", db.name(), std::process::id());
    let gate = Gate::named(&gate_name);
    let mut conn = db.connect();
    let ids: Vec<i64> =
        (0..3).map(|_| task_engine::enqueue(&mut conn, &Gated { gate: gate_name.clone() }).unwrap()).collect();
    let engine = start_engine(&db, "patient", 3);
    gate.wait_for_started(3);

    db.cluster().stop();
    gate.open(); // the tasks end while the database is away
                 // Their outcomes wait in the completer; the database comes back.
    wait_until("the completer has failed to record them", || engine.stats().completion_failures >= 1);
    db.cluster().start();
    let mut conn = db.connect();
    wait_until("the outcomes are recorded", || count_status(&mut conn, status::STOPPED) == 3);
    for id in ids {
        let errors: Vec<Option<String>> = task_executions::table
            .filter(task_executions::task_id.eq(id))
            .select(task_executions::error)
            .load(&mut conn)
            .unwrap();
        assert_eq!(errors, [None], "task {id}");
    }
    engine.shutdown();
}

#[test]
fn a_bulk_insert_of_10000_tasks_wakes_the_idle_workers_and_every_task_runs_once() {
    let db = TestDatabase::new();
    let key = format!("{}-bulk", db.name());
    let engine = start_engine(&db, "bulk-10k", 8);
    wait_until_idle(&engine, 8);
    let before = engine.stats();
    let mut conn = db.connect();
    let batch: Vec<NewTask> = (0..10_000).map(|_| NewTask::new(&Counted { key: key.clone() }).unwrap()).collect();
    task_engine::enqueue_many(&mut conn, &batch).unwrap();
    wait_until("the 10,000 tasks have run", || count_status(&mut conn, status::STOPPED) == 10_000);
    assert_eq!(counted_runs(&key), 10_000);
    let executions: i64 = task_executions::table.count().get_result(&mut conn).unwrap();
    assert_eq!(executions, 10_000);
    assert_eq!(engine.stats().notifications - before.notifications, 1, "one statement, one notification");
    engine.shutdown();
}

#[test]
fn a_claimed_task_that_waits_too_long_for_a_worker_is_given_back_and_an_idle_instance_runs_it() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let gate_name = format!("{}-{}-hoard", db.name(), std::process::id());
    let gate = Gate::named(&gate_name);
    let hoarder = runner(&db, "hoarder", 1).max_queue_wait(Duration::from_secs(2)).start().unwrap();
    // No-op tasks first: the instance learns that its tasks are short, and claims ahead.
    NewTask::new(&::tasks::Noop {}).unwrap().insert_copies(&mut conn, 20).unwrap();
    wait_until("the first tasks have run", || count_status(&mut conn, status::STOPPED) == 20);
    // A task that blocks its only worker, ahead of 5 no-op tasks: one claim takes all six.
    let mut batch = vec![NewTask::new(&Gated { gate: gate_name }).unwrap().priority(10)];
    batch.extend((0..5).map(|_| NewTask::new(&::tasks::Noop {}).unwrap()));
    let ids = task_engine::enqueue_many(&mut conn, &batch).unwrap();
    gate.wait_for_started(1);
    let held = |conn: &mut PgConnection| {
        tasks::table
            .filter(tasks::id.eq_any(&ids[1..]))
            .filter(tasks::status.eq(status::RUNNING))
            .filter(tasks::instance.eq("hoarder"))
            .count()
            .get_result::<i64>(conn)
            .unwrap()
    };
    wait_until("the busy instance holds the 5 tasks", || held(&mut conn) == 5);

    // An idle instance, asleep before they are given back: only a notification can
    // wake it (its fallback poll is an hour away).
    let helper = start_engine(&db, "helper", 2);
    wait_until_idle(&helper, 2);
    assert_eq!(hoarder.stats().given_back, 0, "the tasks were given back before the other instance slept");
    wait_until("the helper has run the 5 tasks", || {
        tasks::table
            .filter(tasks::id.eq_any(&ids[1..]))
            .filter(tasks::status.eq(status::STOPPED))
            .filter(tasks::instance.eq("helper"))
            .count()
            .get_result::<i64>(&mut conn)
            .unwrap()
            == 5
    });
    assert_eq!(hoarder.stats().given_back, 5);
    assert!(helper.stats().notifications >= 1);
    // Given back unstarted: the attempt on the busy instance left no trace.
    let executions: Vec<(i64, i32, String)> = task_executions::table
        .filter(task_executions::task_id.eq_any(&ids[1..]))
        .select((task_executions::task_id, task_executions::attempt, task_executions::instance))
        .order(task_executions::task_id)
        .load(&mut conn)
        .unwrap();
    let expected: Vec<(i64, i32, String)> = ids[1..].iter().map(|&id| (id, 1, "helper".to_owned())).collect();
    assert_eq!(executions, expected);
    // The gated task never left the busy instance, whose only worker it holds.
    assert_eq!(
        tasks::table.find(ids[0]).select(tasks::instance).first::<Option<String>>(&mut conn).unwrap().as_deref(),
        Some("hoarder")
    );
    gate.open();
    hoarder.shutdown();
    helper.shutdown();
}

#[test]
fn outcomes_the_database_refuses_fail_their_tasks_with_the_reason_and_hold_up_nothing_else() {
    let db = TestDatabase::new();
    let key = format!("{}-poison", db.name());
    let mut conn = db.connect();
    let mut batch: Vec<NewTask> = (0..3000).map(|_| NewTask::new(&Counted { key: key.clone() }).unwrap()).collect();
    for i in 0..6 {
        // Spread among the others, so that they share batches.
        batch.insert(i * 500 + 250, NewTask::new(&Poisoned { in_result: i % 2 == 0 }).unwrap());
    }
    let ids = task_engine::enqueue_many(&mut conn, &batch).unwrap();
    let poisoned: Vec<i64> = (0..6).map(|i| ids[i * 500 + 250]).collect();
    let engine = start_engine(&db, "poisoned", 8);
    wait_until("every task has ended", || crate::support::unfinished(&mut conn) == 0);
    let stats = engine.stats();
    let stopped = std::time::Instant::now();
    engine.shutdown();
    assert!(stopped.elapsed() < Duration::from_secs(10), "the stop took {:?}", stopped.elapsed());

    assert_eq!(count_status(&mut conn, status::STOPPED), 3000);
    assert_eq!(counted_runs(&key), 3000);
    for id in poisoned {
        let (task_status, attempts): (String, i32) =
            tasks::table.find(id).select((tasks::status, tasks::attempts)).first(&mut conn).unwrap();
        assert_eq!((task_status.as_str(), attempts), (status::FAILED, 1), "task {id}");
        let errors: Vec<Option<String>> = task_executions::table
            .filter(task_executions::task_id.eq(id))
            .select(task_executions::error)
            .load(&mut conn)
            .unwrap();
        let [Some(error)] = &errors[..] else { panic!("task {id}: {errors:?}") };
        assert!(error.contains("a nul \\u{0} byte") || error.contains("a nul \\u0000 byte"), "task {id}: {error}");
        assert!(error.contains("could not be stored"), "task {id}: {error}");
    }
    assert!(stats.completion_failures > 0, "no statement was refused: the test proves nothing");
}

#[test]
fn a_task_row_another_session_holds_locked_delays_only_its_own_outcome() {
    let db = TestDatabase::new();
    let key = format!("{}-locked", db.name());
    let gate_name = format!("{}-locked", db.name());
    let gate = Gate::named(&gate_name);
    let mut conn = db.connect();
    let engine = start_engine(&db, "patient", 2);
    let held = task_engine::enqueue(&mut conn, &Gated { gate: gate_name }).unwrap();
    gate.wait_for_started(1);
    // Another session locks the running task's row, then the task ends.
    let mut holder = db.connect();
    holder.batch_execute(&format!("BEGIN; SELECT * FROM tasks WHERE id = {held} FOR UPDATE")).unwrap();
    gate.open();
    NewTask::new(&Counted { key: key.clone() }).unwrap().insert_copies(&mut conn, 200).unwrap();
    wait_until("the other tasks are recorded", || count_status(&mut conn, status::STOPPED) == 200);
    assert_eq!(counted_runs(&key), 200);
    let running: String = tasks::table.find(held).select(tasks::status).first(&mut conn).unwrap();
    assert_eq!(running, status::RUNNING, "recorded through another session's lock");

    holder.batch_execute("COMMIT").unwrap();
    wait_until("the held task is recorded", || count_status(&mut conn, status::STOPPED) == 201);
    assert_eq!(crate::support::executions_of(&mut conn, held).len(), 1);
    engine.shutdown();
}
