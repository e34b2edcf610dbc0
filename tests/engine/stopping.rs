use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::tasks;
use task_engine::{register_task, NewTask, Task, TaskContext, TaskError};
use test_db::TestDatabase;

use crate::support::{executions_of, load_task, start_engine, wait_for_status, wait_until, Gate, Gated};

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

/// On its first attempt, runs until it is asked to stop and then fails; on the next,
/// succeeds.
#[derive(serde::Serialize, serde::Deserialize)]
struct StopsHalfway {}

impl Task for StopsHalfway {
    const NAME: &'static str = "test_stops_halfway";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        if ctx.attempt() > 1 {
            return Ok(());
        }
        wait_until("the task is asked to stop", || ctx.stop_requested());
        Err(TaskError::new("stopped halfway"))
    }
}
register_task!(StopsHalfway);

fn start_stopping_halfway(db: &TestDatabase, conn: &mut PgConnection) -> (i64, task_engine::RunningEngine) {
    let id = NewTask::new(&StopsHalfway {}).unwrap().max_attempts(1).unique_key("halfway").insert(conn).unwrap();
    let engine = start_engine(db, "deployed", 1);
    wait_for_status(conn, id, status::RUNNING);
    (id, engine)
}

#[test]
fn a_task_its_instance_stops_waits_again_at_once_without_using_an_attempt() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (id, engine) = start_stopping_halfway(&db, &mut conn);
    engine.shutdown();

    let task = load_task(&mut conn, id);
    assert_eq!((task.status.as_str(), task.attempts, task.max_attempts), (status::WAITING, 1, 2));
    assert!(task.run_at <= chrono::Utc::now(), "an interrupted task waits for a retry delay");
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1);
    assert!(executions[0].interrupted, "the attempt is not recorded as interrupted");
    assert_eq!(executions[0].error.as_deref(), Some("stopped halfway"));
    // It kept its key (no other task took it).
    assert_eq!(task.unique_scope, "waiting");

    // Its last attempt was not used up: the next instance runs it.
    let engine = start_engine(&db, "next", 1);
    wait_for_status(&mut conn, id, status::STOPPED);
    engine.shutdown();
    let attempts: Vec<(i32, bool)> = executions_of(&mut conn, id).iter().map(|e| (e.attempt, e.interrupted)).collect();
    assert_eq!(attempts, [(1, true), (2, false)]);
}

#[test]
fn a_cancel_requested_wins_over_the_instance_s_stop() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (id, engine) = start_stopping_halfway(&db, &mut conn);
    // Requested, and not yet heard by the instance: the database decides.
    diesel::sql_query("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(id)
        .execute(&mut conn)
        .unwrap();
    engine.shutdown();

    let task = load_task(&mut conn, id);
    assert_eq!(task.status, status::CANCELLED);
    assert!(!executions_of(&mut conn, id)[0].interrupted, "a cancelled attempt is recorded as interrupted");
}
