//! Time limits: a task that ignores its stop request past its timeout and grace is
//! recorded as timed out, its worker is replaced, and it runs again only once its
//! thread has returned.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::NewTask;
use test_db::TestDatabase;

use crate::support::{
    attempts_not_recorded_once, executions_of, load_task, overlapping_runs, record_runs_here, runner, start_engine,
    wait_until, Gate, Gated, Recorded,
};

/// Whether the instance has its row (a live heartbeat keeps it).
fn registered(conn: &mut PgConnection, instance: &str) -> bool {
    diesel::select(diesel::dsl::exists(
        task_engine::schema::task_engine_instances::table
            .filter(task_engine::schema::task_engine_instances::name.eq(instance)),
    ))
    .get_result(conn)
    .unwrap()
}

#[test]
fn a_task_that_ignores_its_stop_past_its_timeout_is_recorded_timed_out_and_its_worker_is_replaced() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    let stuck = NewTask::new(&Recorded { gate: "timeout-stuck".into() })
        .unwrap()
        .timeout(Duration::from_millis(200))
        .max_attempts(2)
        .insert(&mut conn)
        .unwrap();
    let engine = runner(&db, "timeouts", 2).timeout_grace(Duration::from_millis(200)).start().unwrap();
    Gate::named("timeout-stuck").wait_for_started(1);

    wait_until("the stuck attempt is recorded as timed out", || {
        executions_of(&mut conn, stuck).iter().any(|e| e.error.as_deref().is_some_and(|m| m.contains("timed out")))
    });
    wait_until("its worker is replaced", || engine.stats().abandoned_workers == 1);
    // Its thread may still run it: the task stays held here, not run again.
    assert_eq!(load_task(&mut conn, stuck).status, "running");

    // The instance still has two working workers: two tasks run at once.
    let others = Gate::named("timeout-others");
    for _ in 0..2 {
        NewTask::new(&Gated { gate: "timeout-others".into() }).unwrap().insert(&mut conn).unwrap();
    }
    others.wait_for_started(2);
    others.open();

    // The stop does not wait for the abandoned worker; the instance stays registered,
    // so that no rescue runs its task elsewhere while its thread may still run it.
    engine.shutdown();
    assert!(registered(&mut conn, "timeouts"), "the instance left while its abandoned worker ran");

    // Its task returns at last: moved on as a timed-out attempt, retried per its policy.
    Gate::named("timeout-stuck").open();
    wait_until("the stuck task waits for its retry", || load_task(&mut conn, stuck).status == "waiting");
    wait_until("the instance has left", || !registered(&mut conn, "timeouts"));
    // Its retry delay (the type's default, seconds) is not what is tested here.
    conn.batch_execute(&format!("UPDATE tasks SET run_at = now() WHERE id = {stuck}")).unwrap();
    let engine = start_engine(&db, "timeouts-again", 1);
    wait_until("the retry has succeeded", || load_task(&mut conn, stuck).status == "stopped");
    engine.shutdown();

    let executions = executions_of(&mut conn, stuck);
    let errors: Vec<_> = executions.iter().map(|e| (e.attempt, e.error.is_some())).collect();
    assert_eq!(errors, [(1, true), (2, false)], "one timed-out attempt, then a success");
    assert_eq!(attempts_not_recorded_once(&mut conn), 0);
    assert_eq!(overlapping_runs(&mut conn), 0, "the retry ran while the abandoned thread still ran the task");
}

#[test]
fn a_task_past_its_types_time_limit_is_asked_to_stop_and_its_error_says_it_timed_out() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let id = task_engine::enqueue(&mut conn, &crate::support::UntilStopped {}).unwrap();
    let engine = start_engine(&db, "type-timeout", 1);
    wait_until("the task has failed", || load_task(&mut conn, id).status == "failed");
    let error = executions_of(&mut conn, id)[0].error.clone().unwrap_or_default();
    assert_eq!(error, "timed out after 100ms: stopped as asked");
    assert_eq!(engine.stats().abandoned_workers, 0, "a task that stopped when asked was abandoned");
    engine.shutdown();
}
