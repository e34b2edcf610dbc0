//! Due times and priorities: a task never starts before it is due, the timer starts it
//! when it is; higher priority first; a type no instance knows waits.
//! Engines poll once an hour: a start can only come from a notification, the
//! due-time timer or a worker looking for its next task.

use std::time::Duration;

use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::{task_executions, tasks};
use test_db::TestDatabase;

use crate::support::{
    echo, executions_of, load_task, start_engine, status_of, wait_for_status, wait_until, wait_until_all_ended,
    wait_until_idle,
};

#[test]
fn a_task_due_later_never_starts_early_and_starts_on_time_without_polling() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "on-time", 2);
    wait_until_idle(&engine, 2);
    let mut conn = db.connect();

    let id = echo(serde_json::json!("later")).run_in(Duration::from_millis(1500)).insert(&mut conn).unwrap();
    wait_for_status(&mut conn, id, status::STOPPED);

    let task = load_task(&mut conn, id);
    let started = executions_of(&mut conn, id)[0].started_at;
    assert!((task.run_at - task.created_at).num_milliseconds() >= 1500);
    assert!(started >= task.run_at, "started {started} before its time {}", task.run_at);
    let late = (started - task.run_at).num_microseconds().unwrap() as f64 / 1000.0;
    eprintln!("a task due in 1.5 s started {late:.2} ms after its time");
    // The bound is loose for a loaded machine; without the timer it would be an hour.
    assert!(late < 1000.0, "started {late} ms late");
    engine.shutdown();
}

#[test]
fn a_task_due_sooner_than_everything_waiting_rearms_the_timer() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "rearm", 2);
    wait_until_idle(&engine, 2);
    let mut conn = db.connect();

    let later = echo(serde_json::json!("in an hour")).run_in(Duration::from_secs(3600)).insert(&mut conn).unwrap();
    wait_until("the engine has heard of the first task", || engine.stats().notifications == 1);
    let sooner = echo(serde_json::json!("in a second")).run_in(Duration::from_secs(1)).insert(&mut conn).unwrap();
    wait_for_status(&mut conn, sooner, status::STOPPED);
    assert_eq!(load_task(&mut conn, later).status, status::WAITING);
    engine.shutdown();
}

#[test]
fn a_task_due_later_inserted_before_the_engine_started_runs_when_due() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let id = echo(serde_json::json!(1)).run_in(Duration::from_millis(800)).insert(&mut conn).unwrap();
    let engine = start_engine(&db, "found-at-start", 1);
    wait_for_status(&mut conn, id, status::STOPPED);
    let task = load_task(&mut conn, id);
    assert!(executions_of(&mut conn, id)[0].started_at >= task.run_at);
    engine.shutdown();
}

#[test]
fn higher_priority_runs_first_then_older_first() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let ids = task_engine::enqueue_many(
        &mut conn,
        &[
            echo(serde_json::json!("a")),
            echo(serde_json::json!("b")).priority(5),
            echo(serde_json::json!("c")),
            echo(serde_json::json!("d")).priority(5),
            echo(serde_json::json!("e")).priority(-1),
        ],
    )
    .unwrap();
    let engine = start_engine(&db, "priority", 1);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    // In claim order: a claim takes its tasks' execution ids in the order it hands
    // them out.
    let order: Vec<i64> =
        task_executions::table.order(task_executions::id).select(task_executions::task_id).load(&mut conn).unwrap();
    assert_eq!(order, [ids[1], ids[3], ids[0], ids[2], ids[4]]);
}

#[test]
fn a_task_of_a_type_no_instance_knows_stays_waiting() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let unknown: i64 = diesel::insert_into(tasks::table)
        .values(tasks::task_class.eq("from_the_next_deploy"))
        .returning(tasks::id)
        .get_result(&mut conn)
        .unwrap();
    let known = echo(serde_json::json!("known")).insert(&mut conn).unwrap();
    let engine = start_engine(&db, "old-deploy", 2);
    wait_for_status(&mut conn, known, status::STOPPED);
    wait_until_idle(&engine, 2);
    engine.shutdown();

    let task = load_task(&mut conn, unknown);
    assert_eq!((task.status.as_str(), task.attempts), (status::WAITING, 0));
    assert!(executions_of(&mut conn, unknown).is_empty());
}

#[test]
fn tasks_due_at_infinity_are_accepted_never_run_and_hold_up_no_task_due_later() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let insert = |conn: &mut PgConnection, run_at: &str| -> i64 {
        diesel::insert_into(tasks::table)
            .values((tasks::task_class.eq("echo"), tasks::task_parameters.eq(serde_json::json!(run_at))))
            .returning(tasks::id)
            .get_result::<i64>(conn)
            .and_then(|id| {
                diesel::sql_query(format!("UPDATE tasks SET run_at = '{run_at}' WHERE id = {id}")).execute(conn)?;
                Ok(id)
            })
            .unwrap()
    };
    // Before the engine starts: only the timer's first look can find the 1 s task.
    let never = insert(&mut conn, "infinity");
    let soon = echo(serde_json::json!("soon")).run_in(Duration::from_secs(1)).insert(&mut conn).unwrap();
    let engine = start_engine(&db, "edges", 2);
    wait_for_status(&mut conn, soon, status::STOPPED);

    // While the instance sleeps (every insert notifies): the insert itself must work.
    wait_until_idle(&engine, 2);
    let inserted = diesel::sql_query(
        "INSERT INTO tasks (task_class, task_parameters, run_at) VALUES ('echo', '\"never again\"', 'infinity'),
                                                                     ('echo', '\"at once\"', '-infinity')",
    )
    .execute(&mut conn);
    assert_eq!(inserted.ok(), Some(2), "an insert due at infinity failed");
    wait_until("the task due at -infinity has run", || {
        tasks::table.filter(tasks::status.eq(status::STOPPED)).count().get_result::<i64>(&mut conn).unwrap() == 2
    });
    assert_eq!(status_of(&mut conn, never), status::WAITING);
    engine.shutdown();
}
