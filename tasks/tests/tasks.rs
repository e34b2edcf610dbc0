//! The crate's task types, each tested as docs/testing.md says: run inline with a test
//! context, without a database unless the task needs one.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use task_engine::testing::{perform, run_task, Progress, TestContext};
use tasks::{Echo, Fail, Journal, Sleep, Steps};

#[test]
fn echo_returns_its_parameters_as_its_result() {
    let parameters = json!({"greeting": "hello", "n": [1, 2, 3], "nested": {"ok": true}});
    assert_eq!(run_task::<Echo>(&parameters, &TestContext::new()).unwrap(), parameters);
    assert_eq!(perform(&Echo(json!("plain")), &TestContext::new()).unwrap(), json!("plain"));
}

#[test]
fn sleep_sleeps_its_time_and_ends() {
    let started = Instant::now();
    perform(&Sleep { ms: 20 }, &TestContext::new()).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(20));
}

/// Asked to stop, for whatever reason (its instance stops, a cancel, its time limit),
/// the sleep ends at once with an error: the engine makes of it an interrupt, a cancel
/// or a timeout (docs/timeouts.md).
#[test]
fn sleep_returns_at_once_when_asked_to_stop_for_any_reason() {
    let asks: [fn(task_engine::testing::Controls); 3] = [|c| c.stop(), |c| c.cancel(), |c| c.time_out()];
    for ask in asks {
        let ctx = TestContext::new();
        let controls = ctx.controls();
        // A minute's sleep: only the request can end it within the test.
        let result = std::thread::scope(|s| {
            s.spawn(move || ask(controls));
            perform(&Sleep { ms: 60_000 }, &ctx)
        });
        let error = result.expect_err("the sleep ran to its end");
        assert_eq!(error.message(), "asked to stop while sleeping");
    }
}

#[test]
fn sleep_refuses_parameters_that_do_not_fit_for_good() {
    let error = run_task::<Sleep>(&json!({"ms": "soon"}), &TestContext::new()).unwrap_err();
    assert!(error.is_permanent());
    assert!(error.message().starts_with("parameters do not fit task type `sleep`"), "{error}");
}

#[test]
fn fail_fails_for_good_only_when_it_says_so() {
    let ctx = TestContext::new();
    let again = perform(&Fail { message: "disk full".into(), permanent: false }, &ctx).unwrap_err();
    assert_eq!((again.message(), again.is_permanent()), ("disk full", false));
    let never = perform(&Fail { message: "no such customer".into(), permanent: true }, &ctx).unwrap_err();
    assert_eq!((never.message(), never.is_permanent()), ("no such customer", true));
}

#[test]
fn steps_reports_its_progress_and_saves_a_checkpoint_after_each_step() {
    let ctx = TestContext::builder().task::<Steps>().build();
    assert_eq!(perform(&Steps { steps: 4, ms: 0 }, &ctx).unwrap(), json!({"resumed_at": 0}));
    let expected: Vec<Progress> =
        (1..=4).map(|n| Progress { percent: n * 25, message: format!("step {n} of 4") }).collect();
    assert_eq!(ctx.progress_reports(), expected);
    assert_eq!(ctx.checkpoints(), [json!(1), json!(2), json!(3), json!(4)]);
}

#[test]
fn steps_resumes_after_the_last_step_an_earlier_attempt_saved() {
    let ctx = TestContext::builder().attempt(2).checkpoint(&3).build();
    assert_eq!(perform(&Steps { steps: 5, ms: 0 }, &ctx).unwrap(), json!({"resumed_at": 3}));
    assert_eq!(ctx.checkpoints(), [json!(4), json!(5)]);
}

#[test]
fn steps_stops_between_steps_when_asked_and_keeps_the_steps_done() {
    let ctx = TestContext::new();
    let controls = ctx.controls();
    let (stopped, was_stopped) = mpsc::channel();
    let result = std::thread::scope(|s| {
        let ctx = &ctx;
        s.spawn(move || {
            // Mid-run: once it has done a step.
            let deadline = Instant::now() + Duration::from_secs(30);
            while ctx.checkpoints().is_empty() {
                assert!(Instant::now() < deadline, "no step was done");
                std::thread::yield_now();
            }
            controls.stop();
            stopped.send(()).unwrap();
        });
        perform(&Steps { steps: 3000, ms: 10 }, ctx)
    });
    was_stopped.recv().unwrap();
    let error = result.expect_err("it ran all its steps");
    let done = ctx.checkpoints().len();
    assert!(done < 3000);
    assert_eq!(error.message(), format!("stopped after {done} of 3000 steps"));
    assert_eq!(ctx.last_checkpoint::<usize>().unwrap(), Some(done), "the next attempt resumes there");
}

#[test]
fn journal_writes_its_run_into_the_table_of_the_test_database() {
    let db = test_db::TestDatabase::new();
    let mut conn = db.connect();
    use diesel::RunQueryDsl;
    diesel::sql_query(
        "CREATE TABLE task_journal (task_id bigint, attempt int, instance text, started_at timestamptz,
                                    ended_at timestamptz)",
    )
    .execute(&mut conn)
    .unwrap();
    let ctx = TestContext::builder().task_id(42).attempt(2).instance("inline").pool(db.pool(1)).build();
    perform(&Journal { ms: 0 }, &ctx).unwrap();

    #[derive(diesel::QueryableByName, Debug, PartialEq)]
    struct Run {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        task_id: i64,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        attempt: i32,
        #[diesel(sql_type = diesel::sql_types::Text)]
        instance: String,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ended: bool,
    }
    let runs: Vec<Run> =
        diesel::sql_query("SELECT task_id, attempt, instance, ended_at >= started_at AS ended FROM task_journal")
            .load(&mut conn)
            .unwrap();
    assert_eq!(runs, [Run { task_id: 42, attempt: 2, instance: "inline".into(), ended: true }]);

    // Without a database, the task is told so.
    let error = perform(&Journal { ms: 0 }, &TestContext::new()).unwrap_err();
    assert!(error.message().contains("has no database: give it a pool"), "{error}");
}
