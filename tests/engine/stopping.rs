use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::tasks;
use task_engine::NewTask;
use test_db::TestDatabase;

use crate::support::{executions_of, load_task, start_engine, Gate, Gated};

#[test]
fn a_stop_lets_running_tasks_finish_and_claims_nothing_new() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let gate_name = format!("stop-{}", db.name());
    let gate = Gate::named(&gate_name);
    let gated = NewTask::new(&Gated { gate: gate_name }).unwrap().priority(10);
    let running = task_engine::enqueue_many(&mut conn, &[gated.clone(), gated]).unwrap();
    let left = NewTask::new(&::tasks::Noop {}).unwrap().insert_copies(&mut conn, 5).unwrap();

    let engine = start_engine(&db, "stopper", 2);
    gate.wait_for_started(2);
    engine.stop_handle().stop();
    gate.open();
    engine.shutdown();

    for id in running {
        assert_eq!(load_task(&mut conn, id).status, status::STOPPED, "task {id} in flight was not finished");
        let executions = executions_of(&mut conn, id);
        assert_eq!(executions.len(), 1);
        assert!(executions[0].stopped_at.is_some());
    }
    let untouched: i64 = tasks::table
        .filter(tasks::id.eq_any(&left))
        .filter(tasks::status.eq(status::WAITING))
        .filter(tasks::attempts.eq(0))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(untouched, 5, "tasks were claimed after the stop");
}
