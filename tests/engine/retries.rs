//! Failed attempts and what follows them: retries, permanent errors, panics, snoozes,
//! and the checkpoint the next attempt resumes from.
//! Engines poll once an hour: a start can only come from a notification, the
//! due-time timer or a worker looking for its next task.

use diesel::prelude::*;
use task_engine::models::status;
use task_engine::NewTask;
use test_db::TestDatabase;

use crate::support::{
    executions_of, load_task, start_engine, wait_for_status, AlwaysFails, Flaky, PanicsOnce, Resumer, Snoozer,
};

#[test]
fn a_task_that_fails_twice_then_succeeds_has_three_executions_and_ends_stopped() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let id = task_engine::enqueue(&mut conn, &Flaky { key: format!("{}-flaky", db.name()), failures: 2 }).unwrap();
    let engine = start_engine(&db, "flaky", 2);
    wait_for_status(&mut conn, id, status::STOPPED);
    engine.shutdown();

    let executions = executions_of(&mut conn, id);
    let errors: Vec<Option<&str>> = executions.iter().map(|e| e.error.as_deref()).collect();
    assert_eq!(errors, [Some("failure 1"), Some("failure 2"), None]);
    assert_eq!(executions.iter().map(|e| e.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(executions[2].result, Some(serde_json::json!(3)));
    assert!(executions.iter().all(|e| e.stopped_at.is_some()));
    // Each retry waited for its due time, 10 ms after the failure was recorded. Both
    // ends on the server's clock: the failure's record is its execution's last update,
    // the retry's claim is the next execution's creation (`started_at` and
    // `stopped_at` also carry the engine's measure of the hand-over).
    for pair in executions.windows(2) {
        let gap = pair[1].created_at - pair[0].updated_at;
        assert!(gap >= chrono::Duration::milliseconds(10), "a retry was claimed {gap} after the failure");
    }
    assert_eq!(load_task(&mut conn, id).attempts, 3);
}

#[test]
fn a_task_that_always_fails_ends_failed_after_its_maximum_with_every_error() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let by_type = task_engine::enqueue(&mut conn, &AlwaysFails {}).unwrap();
    let by_enqueue = NewTask::new(&AlwaysFails {}).unwrap().max_attempts(5).insert(&mut conn).unwrap();
    let engine = start_engine(&db, "hopeless", 2);
    wait_for_status(&mut conn, by_type, status::FAILED);
    wait_for_status(&mut conn, by_enqueue, status::FAILED);
    engine.shutdown();

    for (id, max) in [(by_type, 3), (by_enqueue, 5)] {
        let executions = executions_of(&mut conn, id);
        let errors: Vec<String> = executions.iter().map(|e| e.error.clone().unwrap()).collect();
        let expected: Vec<String> = (1..=max).map(|n| format!("attempt {n} failed")).collect();
        assert_eq!(errors, expected, "task {id}");
        let task = load_task(&mut conn, id);
        assert_eq!((task.attempts, task.max_attempts), (max, max));
    }
}

#[test]
fn a_permanent_error_is_not_retried() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let fail = ::tasks::Fail { message: "account closed".into(), permanent: true };
    let id = task_engine::enqueue(&mut conn, &fail).unwrap();
    let engine = start_engine(&db, "permanent", 1);
    wait_for_status(&mut conn, id, status::FAILED);
    engine.shutdown();
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1);
    assert_eq!(executions[0].error.as_deref(), Some("account closed"));
    assert_eq!(load_task(&mut conn, id).max_attempts, 25, "it had attempts left");
}

#[test]
fn a_panic_is_recorded_and_retried_like_an_error() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let id = task_engine::enqueue(&mut conn, &PanicsOnce { key: format!("{}-panic", db.name()) }).unwrap();
    let engine = start_engine(&db, "panics", 1);
    wait_for_status(&mut conn, id, status::STOPPED);
    engine.shutdown();
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 2);
    let first_error = executions[0].error.clone().unwrap();
    assert!(first_error.starts_with("panicked: first run of"), "{first_error}");
    assert_eq!(executions[1].error, None);
}

#[test]
fn a_snoozed_task_keeps_its_attempts_and_each_snooze_is_recorded() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let engine = start_engine(&db, "a", 1);
    // One attempt allowed, two snoozes: without the snooze's rule it would end failed.
    let id = task_engine::enqueue(&mut conn, &Snoozer { key: "snooze-twice".into(), snoozes: 2 }).unwrap();
    wait_for_status(&mut conn, id, status::STOPPED);
    let task = load_task(&mut conn, id);
    assert_eq!((task.attempts, task.max_attempts), (3, 3), "each snooze allowed one more attempt");
    let executions = executions_of(&mut conn, id);
    let snoozed: Vec<bool> = executions.iter().map(|e| e.snoozed_until.is_some()).collect();
    assert_eq!(snoozed, [true, true, false]);
    for e in &executions[..2] {
        assert_eq!((&e.error, &e.result), (&None, &None), "a snooze is not a failure");
        // Due again 20 ms after the attempt's end, by the server's clock.
        let waited = e.snoozed_until.unwrap() - e.stopped_at.unwrap();
        assert!(waited >= chrono::TimeDelta::milliseconds(15), "{waited}");
        // It ran again only once due.
    }
    assert!(executions[1].started_at >= executions[0].snoozed_until.unwrap());
    assert_eq!(executions[2].result, Some(serde_json::json!(3)));
    engine.shutdown();
}

#[test]
fn a_checkpoint_survives_a_failed_attempt_and_the_next_one_resumes_from_it() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Counts the writes of progress or checkpoint to the task's row.
    conn.batch_execute(
        "CREATE TABLE progress_writes (at timestamptz);
         CREATE FUNCTION count_progress_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO progress_writes VALUES (clock_timestamp()); RETURN NEW; END $$;
         CREATE TRIGGER progress_written BEFORE UPDATE ON tasks FOR EACH ROW
         WHEN (OLD.checkpoint IS DISTINCT FROM NEW.checkpoint OR OLD.progress IS DISTINCT FROM NEW.progress)
         EXECUTE FUNCTION count_progress_write();",
    )
    .unwrap();
    let engine = start_engine(&db, "a", 1);
    // Ten steps; the first attempt fails after step 4, all within a second: only the
    // write at the attempt's end can have saved step 4.
    let id = task_engine::enqueue(&mut conn, &Resumer { steps: 10, fail_after: 4 }).unwrap();
    wait_for_status(&mut conn, id, status::STOPPED);
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 2);
    assert_eq!(executions[0].error.as_deref(), Some("crashed midway"));
    assert_eq!(executions[1].result, Some(serde_json::json!(4)), "the second attempt started after step 4");
    let task = load_task(&mut conn, id);
    assert_eq!(task.checkpoint, Some(serde_json::json!(10)));
    assert_eq!((task.progress, task.progress_message.as_deref()), (Some(100), Some("step 10 of 10")));
    // 20 reports of each kind, 4 writes: each attempt's first, and each attempt's end.
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let writes =
        diesel::sql_query("SELECT count(*) AS n FROM progress_writes").get_result::<Count>(&mut conn).unwrap().n;
    assert_eq!(writes, 4, "progress written on every report, not once a second");
    engine.shutdown();
}
