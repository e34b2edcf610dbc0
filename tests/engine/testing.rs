//! `task_engine::testing` against a real database: a task run inline uses the test's
//! pool and nothing of the engine's own record, and parameters that do not fit fail
//! inline as the engine records them.

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use task_engine::schema::{task_executions, tasks};
use task_engine::testing::{perform, run_task, TestContext};
use task_engine::{Task, TaskContext, TaskError};
use test_db::TestDatabase;

use crate::support::{echo, executions_of, start_engine, wait_until_all_ended};

/// Counts the tasks of its database that wait, through its context's connection.
#[derive(Serialize, Deserialize)]
struct CountWaiting {}

impl Task for CountWaiting {
    const NAME: &'static str = "test_count_waiting";
    type Output = i64;

    fn run(&self, ctx: &TaskContext) -> Result<i64, TaskError> {
        let mut conn = ctx.connection()?;
        Ok(tasks::table.filter(tasks::status.eq("waiting")).count().get_result(&mut conn)?)
    }
}

#[test]
fn a_task_run_inline_queries_through_the_tests_pool_and_nothing_is_claimed_or_recorded() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    task_engine::enqueue_many(&mut conn, &[echo(serde_json::json!(1)), echo(serde_json::json!(2))]).unwrap();

    let ctx = TestContext::builder().task::<CountWaiting>().pool(db.pool(1)).build();
    assert_eq!(perform(&CountWaiting {}, &ctx).unwrap(), 2);

    // Its connection went back to the pool of one: a second run gets it again.
    assert_eq!(perform(&CountWaiting {}, &ctx).unwrap(), 2);
    let executions: i64 = task_executions::table.count().get_result(&mut conn).unwrap();
    assert_eq!(executions, 0, "an inline run writes no execution");
    let waiting: i64 = tasks::table.filter(tasks::status.eq("waiting")).count().get_result(&mut conn).unwrap();
    assert_eq!(waiting, 2, "an inline run claims nothing");
}

#[test]
fn parameters_that_do_not_fit_fail_inline_with_the_error_the_engine_records_for_them() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Keys whose stored order (by length) is not their alphabetical order: the engine
    // meets `ms` first and says so.
    let parameters = serde_json::json!({"a_long_name": 1, "ms": "soon"});
    let id: i64 = diesel::insert_into(tasks::table)
        .values((tasks::task_class.eq("sleep"), tasks::task_parameters.eq(&parameters)))
        .returning(tasks::id)
        .get_result(&mut conn)
        .unwrap();
    let engine = start_engine(&db, "inline", 1);
    wait_until_all_ended(&mut conn);
    engine.shutdown();
    let recorded = executions_of(&mut conn, id)[0].error.clone().expect("an error recorded");

    let inline = run_task::<::tasks::Sleep>(&parameters, &TestContext::new()).unwrap_err();
    assert!(inline.is_permanent(), "the engine does not retry it");
    assert_eq!(inline.message(), recorded);
}
