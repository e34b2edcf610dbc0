//! Wake-ups: every engine here polls once an hour, so only a notification (or the
//! listener's check right after it connects) can start a task within a test.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz};
use task_engine::models::status;
use task_engine::schema::{task_executions, tasks};
use task_engine::{EngineStats, Registry, Runner, RunningEngine};
use test_db::TestDatabase;

use crate::support::{executions_of, load_task, runner, start_engine, wait_until, wait_until_idle};

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Inserts an `echo` task with plain SQL, as psql would, and returns its id.
fn insert_by_sql(conn: &mut PgConnection) -> i64 {
    diesel::sql_query("INSERT INTO tasks (task_class, task_parameters) VALUES ('echo', '\"sql\"') RETURNING id")
        .get_result::<Id>(conn)
        .unwrap()
        .id
}

fn wait_until_stopped(conn: &mut PgConnection, id: i64) {
    wait_until(&format!("task {id} has run"), || load_task(conn, id).status == status::STOPPED);
}

fn wasted_since(engine: &RunningEngine, before: EngineStats) -> u64 {
    engine.stats().wasted_claims - before.wasted_claims
}

#[test]
fn a_task_inserted_by_plain_sql_while_every_worker_sleeps_starts() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "sql-insert", 4);
    wait_until_idle(&engine, 4);
    let before = engine.stats();

    let mut conn = db.connect();
    let id = insert_by_sql(&mut conn);
    wait_until_stopped(&mut conn, id);

    wait_until_idle(&engine, 4);
    let after = engine.stats();
    assert_eq!(after.notifications - before.notifications, 1);
    // One claim, for the task: nothing wasted.
    let wasted = after.wasted_claims - before.wasted_claims;
    assert_eq!(wasted, 0, "one task, {wasted} claims wasted");
    engine.shutdown();
}

#[test]
fn a_task_inserted_in_a_transaction_starts_after_commit_and_a_rollback_wakes_nobody() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "transactions", 4);
    wait_until_idle(&engine, 4);
    let before = engine.stats();
    let mut conn = db.connect();

    conn.batch_execute("BEGIN").unwrap();
    insert_by_sql(&mut conn);
    conn.batch_execute("ROLLBACK").unwrap();

    conn.batch_execute("BEGIN").unwrap();
    let id = insert_by_sql(&mut conn);
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = Timestamptz)]
        now: chrono::DateTime<chrono::Utc>,
    }
    let before_commit = diesel::sql_query("SELECT clock_timestamp() AS now").get_result::<Now>(&mut conn).unwrap().now;
    conn.batch_execute("COMMIT").unwrap();
    wait_until_stopped(&mut conn, id);

    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1);
    assert!(executions[0].started_at > before_commit, "started before its commit");
    let all: i64 = tasks::table.count().get_result(&mut conn).unwrap();
    assert_eq!(all, 1, "the rolled-back insert left a row");

    wait_until_idle(&engine, 4);
    let after = engine.stats();
    assert_eq!(after.notifications - before.notifications, 1, "the rolled-back insert sent a notification");
    assert_eq!(wasted_since(&engine, before), 0, "the instance woke for the rolled-back insert");
    engine.shutdown();
}

#[test]
fn one_task_with_three_idle_instances_of_8_workers_is_claimed_once_with_few_wasted_claims() {
    let db = TestDatabase::new();
    let engines: Vec<RunningEngine> = (0..3).map(|i| start_engine(&db, &format!("herd-{i}"), 8)).collect();
    for engine in &engines {
        wait_until_idle(engine, 8);
    }
    let before: Vec<EngineStats> = engines.iter().map(RunningEngine::stats).collect();

    let mut conn = db.connect();
    let id = insert_by_sql(&mut conn);
    wait_until_stopped(&mut conn, id);
    for engine in &engines {
        wait_until_idle(engine, 8);
    }

    assert_eq!(executions_of(&mut conn, id).len(), 1, "the task ran more than once");
    let wasted: u64 = engines.iter().zip(&before).map(|(e, b)| wasted_since(e, *b)).sum();
    let claims: u64 = engines.iter().zip(&before).map(|(e, b)| e.stats().claims - b.claims).sum();
    // One claim per instance: one wins, the two others find nothing. A herd (every
    // idle worker claiming) would waste 23.
    eprintln!("one task, 3 instances x 8 idle workers: {claims} claims, {wasted} wasted");
    assert!(wasted <= 2, "{wasted} claims wasted on one task ({claims} claims)");
    for engine in engines {
        engine.shutdown();
    }
}

#[test]
fn a_bulk_insert_of_1000_tasks_gets_every_idle_worker_busy() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "bulk", 8);
    wait_until_idle(&engine, 8);
    let before = engine.stats();
    let mut conn = db.connect();

    diesel::sql_query(
        "INSERT INTO tasks (task_class, task_parameters)
         SELECT 'sleep', '{\"ms\": 2}' FROM generate_series(1, 1000)",
    )
    .execute(&mut conn)
    .unwrap();
    wait_until("the 1000 tasks have run", || crate::support::unfinished(&mut conn) == 0);
    wait_until_idle(&engine, 8);

    let workers: Vec<i32> = task_executions::table.select(task_executions::worker).distinct().load(&mut conn).unwrap();
    assert_eq!(workers.len(), 8, "only workers {workers:?} took part");
    // And at once: at some moment all eight ran a task.
    #[derive(QueryableByName)]
    struct Most {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let most = diesel::sql_query(
        "SELECT max((SELECT count(*) FROM task_executions b
                     WHERE b.started_at <= a.started_at AND b.stopped_at > a.started_at)) AS n
         FROM task_executions a",
    )
    .get_result::<Most>(&mut conn)
    .unwrap()
    .n;
    assert!(most >= 8, "at most {most} tasks ran at once");
    let after = engine.stats();
    assert_eq!(after.notifications - before.notifications, 1, "one statement, one notification");
    let wasted = after.wasted_claims - before.wasted_claims;
    eprintln!("1000 tasks, 8 workers: {} claims, {wasted} wasted", after.claims - before.claims);
    // Each worker finds the queue empty once at the end.
    assert!(wasted <= 16, "{wasted} claims wasted");
    engine.shutdown();
}

#[test]
fn a_task_inserted_while_the_listener_is_disconnected_runs_once_it_reconnects() {
    let db = TestDatabase::new();
    let engine = start_engine(&db, "reconnect", 2);
    wait_until_idle(&engine, 2);
    let mut conn = db.connect();

    // Keep the listener out while the task goes in: the database refuses new
    // connections (ours stays open), then its connection is terminated.
    let mut admin = PgConnection::establish(&test_db::with_database(db.url(), "postgres")).unwrap();
    let quoted = format!("\"{}\"", db.name());
    admin.batch_execute(&format!("ALTER DATABASE {quoted} ALLOW_CONNECTIONS false")).unwrap();
    #[derive(QueryableByName)]
    struct Terminated {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let terminated = diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity
         WHERE application_name = 'task_engine session reconnect'",
    )
    .get_result::<Terminated>(&mut conn)
    .unwrap();
    assert_eq!(terminated.n, 1, "no listener connection to terminate");
    wait_until("the listener has noticed", || !engine.stats().listening);

    let id = insert_by_sql(&mut conn);
    assert!(!engine.stats().listening, "the listener reconnected before the insert");
    admin.batch_execute(&format!("ALTER DATABASE {quoted} ALLOW_CONNECTIONS true")).unwrap();

    wait_until_stopped(&mut conn, id);
    assert_eq!(engine.stats().listener_connections, 2);
    engine.shutdown();
}

/// A second deployment in the database, in schema `other`: its URL and a connection.
fn schema_other(conn: &mut PgConnection, db: &TestDatabase) -> (String, PgConnection) {
    conn.batch_execute("CREATE SCHEMA other").unwrap();
    let url = format!("{}?options=-csearch_path%3Dother", db.url());
    let mut other = PgConnection::establish(&url).unwrap();
    task_engine::run_migrations(&mut other).unwrap();
    (url, other)
}

/// An instance named `other` on the deployment at `url`, polling once an hour.
fn engine_in_schema(url: &str, workers: usize) -> RunningEngine {
    Runner::new(url, Registry::from_inventory().unwrap())
        .instance("other")
        .workers(workers)
        .poll_interval(std::time::Duration::from_secs(3600))
        .start()
        .unwrap()
}

#[test]
fn engines_in_two_schemas_of_one_database_do_not_wake_each_other() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (other_url, mut other) = schema_other(&mut conn, &db);

    let public_engine = start_engine(&db, "public", 2);
    let other_engine = engine_in_schema(&other_url, 2);
    wait_until_idle(&public_engine, 2);
    wait_until_idle(&other_engine, 2);
    let (public_before, other_before) = (public_engine.stats(), other_engine.stats());

    let id = insert_by_sql(&mut other);
    wait_until_stopped(&mut other, id);
    wait_until_idle(&other_engine, 2);

    assert_eq!(other_engine.stats().notifications - other_before.notifications, 1);
    assert_eq!(public_engine.stats().notifications, public_before.notifications, "woken by the other schema");
    let public_tasks: i64 = tasks::table.count().get_result(&mut conn).unwrap();
    assert_eq!(public_tasks, 0);
    public_engine.shutdown();
    other_engine.shutdown();
}

#[test]
fn no_wake_up_is_lost_to_a_race_between_an_instance_going_idle_and_an_insert() {
    let db = TestDatabase::new();
    // One worker, no buffer: every claim of one task comes back full (the instance
    // is busy and lets inserts skip their NOTIFY), and the claim after it comes back
    // empty (the instance goes idle: it takes the stripes and looks once more).
    let engine = runner(&db, "racer", 1).claim_buffer(0).start().unwrap();
    wait_until_idle(&engine, 1);
    let mut conn = db.connect();
    // The second insert of each round lands somewhere in the instance's way from
    // busy back to idle. With the fallback poll at an hour, a lost wake-up leaves a
    // task waiting and the test times out.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..200 {
        let first = insert_by_sql(&mut conn);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_micros(seed % 2000));
        let second = insert_by_sql(&mut conn);
        for id in [first, second] {
            wait_until(&format!("round {round}: task {id} has run"), || {
                load_task(&mut conn, id).status == status::STOPPED
            });
        }
    }
    let stats = engine.stats();
    eprintln!(
        "race: 400 tasks, {} notifications, {} claims, {} wasted",
        stats.notifications, stats.claims, stats.wasted_claims
    );
    engine.shutdown();
}

#[test]
fn an_insert_that_would_wake_nobody_does_not_notify() {
    let db = TestDatabase::new();
    let gate_name = format!("{}-busy", db.name());
    let gate = crate::support::Gate::named(&gate_name);
    let engine = runner(&db, "busy", 2).claim_buffer(0).start().unwrap();
    wait_until_idle(&engine, 2);
    let mut conn = db.connect();
    for _ in 0..2 {
        task_engine::enqueue(&mut conn, &crate::support::Gated { gate: gate_name.clone() }).unwrap();
    }
    gate.wait_for_started(2);
    wait_until("the instance no longer marks itself idle", || !engine.stats().marked_idle);
    let before = engine.stats();

    // Every worker busy, no room: these inserts skip their NOTIFY...
    let ids: Vec<i64> = (0..5).map(|_| insert_by_sql(&mut conn)).collect();
    // ...and still run once the workers are free.
    gate.open();
    for id in ids {
        wait_until_stopped(&mut conn, id);
    }
    assert_eq!(engine.stats().notifications, before.notifications, "an insert notified a busy instance");
    engine.shutdown();
}

/// The trigger's side of "notify only when an instance sleeps", step by step, with
/// a stand-in for an idle producer.
#[test]
fn an_insert_notifies_only_if_an_instance_sleeps_and_a_sleeper_waits_for_uncommitted_inserts() {
    use postgres::fallible_iterator::FallibleIterator;
    let db = TestDatabase::new();
    let mut listener = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    let channel: String = listener.query_one("SELECT task_engine_channel()", &[]).unwrap().get(0);
    assert_eq!(channel, "public.task_engine");
    listener.batch_execute(&format!("LISTEN \"{channel}\"")).unwrap();
    let heard = |listener: &mut postgres::Client| -> usize {
        listener.notifications().timeout_iter(std::time::Duration::from_millis(200)).count().unwrap()
    };
    let take_stripes = "SELECT bool_and(pg_try_advisory_lock_shared(hashtext(task_engine_channel()), s)) AS taken
                        FROM generate_series(0, task_engine_stripes() - 1) s";
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        taken: bool,
    }
    let mut sleeper = db.connect();
    let mut inserter = db.connect();

    // Nobody sleeps: no notification, and the inserter holds its stripe until it
    // commits, so a would-be sleeper cannot take the stripes in between...
    inserter.batch_execute("BEGIN").unwrap();
    insert_by_sql(&mut inserter);
    let taken: Taken = diesel::sql_query(take_stripes).get_result(&mut sleeper).unwrap();
    assert!(!taken.taken, "a sleeper took the stripes while an insert that skipped its NOTIFY was uncommitted");
    sleeper.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
    inserter.batch_execute("COMMIT").unwrap();
    assert_eq!(heard(&mut listener), 0, "an insert notified though nobody slept");

    // ...and can once it has committed (its next look sees the task).
    let taken: Taken = diesel::sql_query(take_stripes).get_result(&mut sleeper).unwrap();
    assert!(taken.taken);
    // A sleeper holds the stripes: every insert notifies.
    insert_by_sql(&mut inserter);
    assert_eq!(heard(&mut listener), 1, "an insert did not notify a sleeping instance");
    sleeper.batch_execute("SELECT pg_advisory_unlock_all()").unwrap();
    insert_by_sql(&mut inserter);
    assert_eq!(heard(&mut listener), 0);
}

#[test]
fn no_wake_up_is_lost_while_a_stream_of_inserts_keeps_an_instance_awake() {
    let db = TestDatabase::new();
    // While claims keep finding tasks, the instance holds no stripes and inserts skip
    // their NOTIFY; when a claim comes back empty it must take the stripes and look
    // once more. Rounds of concurrent inserts with random pauses cross that edge many
    // times; a lost wake-up leaves a task waiting (the fallback poll is an hour).
    let engine = start_engine(&db, "streamed", 8);
    wait_until_idle(&engine, 8);
    let mut conn = db.connect();
    let before = engine.stats();
    let mut inserted = 0;
    for round in 0..6u64 {
        let clients: Vec<_> = (0..4u64)
            .map(|client| {
                let url = db.url().to_owned();
                std::thread::spawn(move || {
                    let mut conn = PgConnection::establish(&url).unwrap();
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (round * 4 + client + 1);
                    for _ in 0..80 {
                        insert_by_sql(&mut conn);
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        std::thread::sleep(std::time::Duration::from_micros(seed % 600));
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        inserted += 4 * 80;
        wait_until(&format!("round {round}: every streamed task has run"), || {
            crate::support::unfinished(&mut conn) == 0
        });
    }
    let executions: i64 = task_executions::table.count().get_result(&mut conn).unwrap();
    assert_eq!(executions, inserted, "each task runs once");
    let stats = engine.stats();
    eprintln!(
        "stream: {inserted} tasks, {} notifications, {} claims, {} wasted",
        stats.notifications - before.notifications,
        stats.claims - before.claims,
        stats.wasted_claims - before.wasted_claims
    );
    engine.shutdown();
}

#[test]
fn an_insert_that_names_the_schema_from_a_session_that_does_not_see_it_still_wakes_its_engine() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (other_url, mut other) = schema_other(&mut conn, &db);
    let engine = engine_in_schema(&other_url, 2);
    wait_until_idle(&engine, 2);
    let before = engine.stats();

    // An application's session whose search_path names no schema of the engine's.
    conn.batch_execute("SET search_path = ''").unwrap();
    let id = diesel::sql_query(
        "INSERT INTO other.tasks (task_class, task_parameters) VALUES ('echo', '\"qualified\"') RETURNING id",
    )
    .get_result::<Id>(&mut conn)
    .unwrap()
    .id;
    wait_until_stopped(&mut other, id);
    assert_eq!(engine.stats().notifications - before.notifications, 1);
    engine.shutdown();
}
