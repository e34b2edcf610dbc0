use diesel::prelude::*;
use task_engine::schema::tasks;
use task_engine::{Error, NewTask, Registry};
use test_db::TestDatabase;

fn task_count(conn: &mut PgConnection) -> i64 {
    tasks::table.count().get_result(conn).unwrap()
}

#[test]
fn an_unknown_task_type_is_refused_before_anything_is_inserted() {
    let registry = Registry::from_inventory().unwrap();
    let refused = NewTask::from_json(&registry, "no_such_type", serde_json::json!({}));
    match refused {
        Err(Error::UnknownTaskType { name, known }) => {
            assert_eq!(name, "no_such_type");
            assert!(known.contains(&"noop"), "the error lists the known types: {known:?}");
        }
        other => panic!("expected UnknownTaskType, got {other:?}"),
    }
}

#[test]
fn parameters_that_do_not_fit_the_type_are_refused_with_serdes_reason() {
    let registry = Registry::from_inventory().unwrap();
    for (parameters, reason) in [
        (serde_json::json!({}), "missing field `ms`"),
        (serde_json::json!({"ms": "soon"}), "invalid type"),
        (serde_json::json!({"ms": 5, "extra": true}), "unknown field `extra`"),
    ] {
        match NewTask::from_json(&registry, "sleep", parameters.clone()) {
            Err(error @ Error::InvalidParameters { .. }) => {
                assert!(error.to_string().contains(reason), "{parameters}: `{error}` lacks `{reason}`")
            }
            other => panic!("{parameters}: expected InvalidParameters, got {other:?}"),
        }
    }
    assert!(NewTask::from_json(&registry, "sleep", serde_json::json!({"ms": 5})).is_ok());
}

#[test]
fn an_enqueue_inside_the_callers_transaction_commits_and_rolls_back_with_it() {
    let db = TestDatabase::new();
    let mut conn = db.connect();

    let rolled_back: Result<(), diesel::result::Error> = conn.transaction(|conn| {
        task_engine::enqueue(conn, &::tasks::Sleep { ms: 1 }).unwrap();
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(rolled_back.is_err());
    assert_eq!(task_count(&mut conn), 0, "the rolled-back enqueue left a task");

    let id = conn
        .transaction(|conn| task_engine::enqueue(conn, &::tasks::Echo(serde_json::json!({"to": "a@b.c"}))))
        .unwrap();
    let row: (String, serde_json::Value, String) = tasks::table
        .find(id)
        .select((tasks::task_class, tasks::task_parameters, tasks::status))
        .first(&mut conn)
        .unwrap();
    assert_eq!(row, ("echo".to_owned(), serde_json::json!({"to": "a@b.c"}), "waiting".to_owned()));
}

#[test]
fn many_tasks_go_in_with_one_call_and_come_back_with_their_ids_in_order() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let batch: Vec<NewTask> =
        (0..500).map(|i| NewTask::new(&::tasks::Echo(serde_json::json!(i))).unwrap().priority(i % 3)).collect();
    let ids = task_engine::enqueue_many(&mut conn, &batch).unwrap();
    assert_eq!(ids.len(), 500);
    for (i, id) in ids.iter().enumerate().step_by(97) {
        let parameters: serde_json::Value =
            tasks::table.find(id).select(tasks::task_parameters).first(&mut conn).unwrap();
        assert_eq!(parameters, serde_json::json!(i), "id {id} is not the {i}th task given");
    }

    let copies = NewTask::new(&::tasks::Noop {}).unwrap().insert_copies(&mut conn, 1000).unwrap();
    assert_eq!(copies.len(), 1000);
    assert_eq!(task_count(&mut conn), 1500);
}

#[test]
fn values_the_database_would_refuse_are_refused_before_anything_is_inserted() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let nul = NewTask::new(&::tasks::Echo(serde_json::json!({"list": ["ok", "a\u{0}b"]}))).unwrap();
    match nul.insert(&mut conn) {
        Err(Error::InvalidValue(message)) => assert!(message.contains("NUL character (at $.list[1])"), "{message}"),
        other => panic!("expected InvalidValue, got {other:?}"),
    }
    let never = NewTask::new(&::tasks::Noop {}).unwrap().run_in(std::time::Duration::MAX);
    assert!(matches!(never.insert_copies(&mut conn, 3), Err(Error::InvalidValue(_))));
    let fine = NewTask::new(&::tasks::Noop {}).unwrap();
    assert!(matches!(task_engine::enqueue_many(&mut conn, &[fine, nul]), Err(Error::InvalidValue(_))));
    assert_eq!(task_count(&mut conn), 0, "a refused batch inserted something");
}
