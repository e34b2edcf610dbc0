use std::collections::HashMap;

use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::{task_executions, tasks};
use task_engine::NewTask;
use test_db::TestDatabase;

use crate::support::{executions_of, load_task, start_engine, wait_until_all_ended};

#[test]
fn a_task_runs_once_and_leaves_exactly_one_execution_with_its_result() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let parameters = serde_json::json!({"greeting": "hello", "n": [1, 2, 3]});
    let id = task_engine::enqueue(&mut conn, &::tasks::Echo(parameters.clone())).unwrap();

    let engine = start_engine(&db, "solo", 2);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    let task = load_task(&mut conn, id);
    assert_eq!(task.status, status::STOPPED);
    assert_eq!(task.instance.as_deref(), Some("solo"));
    assert_eq!(task.attempts, 1);
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1, "{executions:?}");
    let execution = &executions[0];
    assert_eq!(execution.result, Some(parameters));
    assert_eq!(execution.error, None);
    assert_eq!(execution.attempt, 1);
    assert_eq!(execution.instance, "solo");
    let stopped_at = execution.stopped_at.expect("the execution is closed");
    assert!(stopped_at >= execution.started_at);
}

#[test]
fn errors_and_panics_are_recorded_and_the_worker_goes_on_to_the_next_task() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // One worker, so the task after the panic can only run if that worker survived.
    let ids = task_engine::enqueue_many(
        &mut conn,
        &[
            NewTask::new(&::tasks::Fail { message: "disk full".into(), permanent: false })
                .unwrap()
                .max_attempts(1)
                .priority(3),
            NewTask::new(&::tasks::Panic { message: "index out of bounds".into() })
                .unwrap()
                .max_attempts(1)
                .priority(2),
            NewTask::new(&::tasks::Echo(serde_json::json!("after"))).unwrap().priority(1),
        ],
    )
    .unwrap();

    let engine = start_engine(&db, "single", 1);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    let (fail, panic, after) = (ids[0], ids[1], ids[2]);
    assert_eq!(load_task(&mut conn, fail).status, status::FAILED);
    assert_eq!(executions_of(&mut conn, fail)[0].error.as_deref(), Some("disk full"));
    assert_eq!(load_task(&mut conn, panic).status, status::FAILED);
    assert_eq!(executions_of(&mut conn, panic)[0].error.as_deref(), Some("panicked: index out of bounds"));
    assert_eq!(load_task(&mut conn, after).status, status::STOPPED);
    let after_runs = executions_of(&mut conn, after);
    assert_eq!(after_runs[0].result, Some(serde_json::json!("after")));
    assert_eq!(after_runs[0].worker, 0);
}

#[test]
fn stored_parameters_that_no_longer_fit_the_type_fail_the_task_with_the_reason() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // As if the type's parameters changed in a deploy after this row was written.
    let id: i64 = diesel::insert_into(tasks::table)
        .values((tasks::task_class.eq("sleep"), tasks::task_parameters.eq(serde_json::json!({"seconds": 1}))))
        .returning(tasks::id)
        .get_result(&mut conn)
        .unwrap();

    let engine = start_engine(&db, "deploy", 1);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    assert_eq!(load_task(&mut conn, id).status, status::FAILED);
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1, "undeserialisable parameters were retried");
    let error = executions[0].error.clone().unwrap();
    assert!(error.contains("parameters do not fit task type `sleep`"), "{error}");
}

#[test]
fn two_instances_on_one_database_never_run_the_same_task_twice() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let ids = NewTask::new(&::tasks::Noop {}).unwrap().insert_copies(&mut conn, 3000).unwrap();

    let first = start_engine(&db, "first", 4);
    let second = start_engine(&db, "second", 4);
    wait_until_all_ended(&mut conn);
    first.shutdown();
    second.shutdown();

    let runs: Vec<(i64, String)> =
        task_executions::table.select((task_executions::task_id, task_executions::instance)).load(&mut conn).unwrap();
    let mut per_task: HashMap<i64, usize> = HashMap::new();
    for (task_id, _) in &runs {
        *per_task.entry(*task_id).or_default() += 1;
    }
    let twice: Vec<_> = per_task.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks run more than once: {twice:?}");
    assert_eq!(per_task.len(), ids.len(), "every task ran");
    let stopped: i64 = tasks::table.filter(tasks::status.eq(status::STOPPED)).count().get_result(&mut conn).unwrap();
    assert_eq!(stopped, 3000);
}

#[test]
fn a_stored_row_the_engine_cannot_read_fails_that_task_alone_with_the_reason() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // JSON that PostgreSQL stores and serde_json cannot read (a number beyond f64),
    // inserted by another program, among tasks that are fine.
    let good = NewTask::new(&::tasks::Echo(serde_json::json!("fine"))).unwrap().insert_copies(&mut conn, 100).unwrap();
    let bad: i64 = diesel::insert_into(tasks::table)
        .values((tasks::task_class.eq("echo"), tasks::task_parameters.eq(serde_json::json!({"n": 1}))))
        .returning(tasks::id)
        .get_result(&mut conn)
        .unwrap();
    diesel::sql_query("UPDATE tasks SET task_parameters = '{\"n\": 1e400}' WHERE id = $1")
        .bind::<diesel::sql_types::BigInt, _>(bad)
        .execute(&mut conn)
        .unwrap();

    let engine = start_engine(&db, "reader", 2);
    wait_until_all_ended(&mut conn);
    let stats = engine.stats();
    engine.shutdown();

    // (The models cannot read this row either: its status is read alone.)
    let bad_status: String = tasks::table.find(bad).select(tasks::status).first(&mut conn).unwrap();
    assert_eq!(bad_status, status::FAILED);
    let executions = executions_of(&mut conn, bad);
    assert_eq!(executions.len(), 1, "{executions:?}");
    let error = executions[0].error.clone().unwrap();
    assert!(error.contains("parameters do not fit task type `echo`"), "{error}");
    for id in good {
        assert_eq!(load_task(&mut conn, id).status, status::STOPPED, "task {id}");
        assert_eq!(executions_of(&mut conn, id).len(), 1, "task {id}");
    }
    assert_eq!(stats.rescued, 0, "attempts were lost");
}

/// The record of one worker's attempts, in the order they started, with their times.
fn attempts_of_one_worker(
    conn: &mut PgConnection,
) -> Vec<(i64, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> {
    task_executions::table
        .order((task_executions::started_at, task_executions::id))
        .select((task_executions::task_id, task_executions::started_at, task_executions::stopped_at.assume_not_null()))
        .load(conn)
        .unwrap()
}

#[test]
fn one_worker_s_attempts_are_recorded_in_order_without_overlap_whatever_claim_they_came_in() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    task_engine::set_queue_concurrency(&mut conn, "serial", Some(1)).unwrap();
    // Rounds of five on a serial queue, each by a new instance: its first claim finds
    // the queue limited and claims again, its next ones do not, and each task comes
    // in a claim of its own.
    for _ in 0..40 {
        let five: Vec<NewTask> =
            (0..5).map(|_| NewTask::new(&::tasks::Sleep { ms: 3 }).unwrap().queue("serial")).collect();
        task_engine::enqueue_many(&mut conn, &five).unwrap();
        let engine = crate::support::runner(&db, "serial", 1).queue("serial", 1).start().unwrap();
        wait_until_all_ended(&mut conn);
        engine.shutdown();
    }

    let record = attempts_of_one_worker(&mut conn);
    assert_eq!(record.len(), 200);
    let overlaps: Vec<_> = record
        .windows(2)
        .filter(|w| w[1].1 < w[0].2)
        .map(|w| format!("task {} started {} before task {} stopped", w[1].0, w[0].2 - w[1].1, w[0].0))
        .collect();
    assert!(overlaps.is_empty(), "one worker's attempts overlap in the record: {overlaps:#?}");
    let ids: Vec<i64> = record.iter().map(|r| r.0).collect();
    let mut in_claim_order = ids.clone();
    in_claim_order.sort_unstable();
    assert_eq!(ids, in_claim_order, "the record does not keep the order the attempts ran in");
}
