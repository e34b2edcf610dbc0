use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use task_engine::models::{Task as TaskRow, TaskExecution};
use test_db::TestDatabase;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn table_count(conn: &mut PgConnection) -> i64 {
    diesel::sql_query(
        "SELECT count(*) AS n FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name IN ('tasks', 'task_executions')",
    )
    .get_result::<Count>(conn)
    .unwrap()
    .n
}

#[test]
fn migrations_create_the_tables_on_an_empty_database_and_a_second_run_changes_nothing() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(
        "DROP TABLE task_executions, tasks, task_engine_instances, task_engine_queues, task_engine_schedules,
                    task_engine_declarations,
                    __diesel_schema_migrations;
         DROP FUNCTION task_engine_notify_insert(), task_engine_delete_executions(),
                       task_engine_truncate_executions(), task_engine_channel(), task_engine_channel(text),
                       task_engine_stripes()",
    )
    .unwrap();
    assert_eq!(table_count(&mut conn), 0);
    let pending = task_engine::pending_migrations(&mut conn).unwrap();
    assert!(pending.len() >= 2, "every migration is pending on an empty database: {pending:?}");

    let applied = task_engine::run_migrations(&mut conn).unwrap();
    assert_eq!(applied.len(), pending.len(), "the first run applies every migration: {applied:?}");
    assert_eq!(table_count(&mut conn), 2);
    assert!(task_engine::pending_migrations(&mut conn).unwrap().is_empty());

    let again = task_engine::run_migrations(&mut conn).unwrap();
    assert!(again.is_empty(), "a second run applies nothing: {again:?}");
}

fn execution_count(conn: &mut PgConnection) -> i64 {
    diesel::sql_query("SELECT count(*) AS n FROM task_executions").get_result::<Count>(conn).unwrap().n
}

#[test]
fn deleting_tasks_deletes_their_executions_and_only_theirs() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Two attempts of task 1, one of task 2, one of task 3.
    conn.batch_execute(
        "INSERT INTO tasks (id, task_class, status) VALUES (1, 'noop', 'stopped'), (2, 'noop', 'stopped'),
                                                        (3, 'noop', 'failed');
         INSERT INTO task_executions (task_id, attempt, started_at, instance, worker)
         VALUES (1, 1, now(), 'i', 0), (1, 2, now(), 'i', 0), (2, 1, now(), 'i', 0), (3, 1, now(), 'i', 0)",
    )
    .unwrap();
    conn.batch_execute("DELETE FROM tasks WHERE id IN (1, 3)").unwrap();
    let left: Vec<i64> = task_engine::schema::task_executions::table
        .select(task_engine::schema::task_executions::task_id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(left, [2]);

    conn.batch_execute("TRUNCATE tasks").unwrap();
    assert_eq!(execution_count(&mut conn), 0);
}

#[test]
fn the_status_column_refuses_a_state_the_engine_does_not_know() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let refused =
        diesel::sql_query("INSERT INTO tasks (task_class, status) VALUES ('noop', 'lost')").execute(&mut conn);
    assert!(refused.is_err(), "an unknown status was accepted");
}

#[test]
fn the_models_read_a_task_and_its_executions_through_their_relation() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    conn.batch_execute(
        "INSERT INTO tasks (id, task_class, task_parameters, status, attempts)
             VALUES (7, 'echo', '{\"a\": 1}', 'stopped', 2);
         INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, error, instance, worker)
             VALUES (7, 1, now(), now(), 'first try failed', 'i1', 0);
         INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, result, instance, worker)
             VALUES (7, 2, now(), now(), '{\"a\": 1}', 'i1', 3)",
    )
    .unwrap();

    let (task, executions): (TaskRow, Vec<TaskExecution>) =
        task_engine::report::task_with_executions(&mut conn, 7).unwrap().expect("task 7");
    assert_eq!(task.task_class, "echo");
    assert_eq!(task.task_parameters, serde_json::json!({"a": 1}));
    assert_eq!(executions.len(), 2);
    assert_eq!(executions[0].error.as_deref(), Some("first try failed"));
    assert_eq!(executions[1].result, Some(serde_json::json!({"a": 1})));
    assert_eq!(executions[1].worker, 3);
    assert!(task_engine::report::task_with_executions(&mut conn, 8).unwrap().is_none());
}

#[test]
fn the_channel_is_the_schema_with_a_suffix_within_63_bytes() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    #[derive(QueryableByName)]
    struct Channels {
        #[diesel(sql_type = diesel::sql_types::Text)]
        public: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        seen: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        long_bytes: i32,
    }
    let channels: Channels = diesel::sql_query(
        "SELECT task_engine_channel('public') AS public, task_engine_channel() AS seen,
                octet_length(task_engine_channel(repeat('é', 40))) AS long_bytes",
    )
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(channels.public, "public.task_engine");
    assert_eq!(channels.seen, "public.task_engine", "the channel of the tasks table this session sees");
    assert!(channels.long_bytes <= 63, "a channel of {} bytes", channels.long_bytes);
}
