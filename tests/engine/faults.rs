//! Faults caused for real: a live instance's long task, an instance restarted under
//! its name, the server restarted under a running engine. (A killed `engine run`
//! process is in `engine/tests/cli.rs`.)

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::{task_executions, tasks};
use task_engine::{NewTask, Registry, Runner};
use test_db::TestDatabase;

use crate::support::{
    attempts_not_recorded_once, executions_of, load_task, logged_runs, overlapping_runs, record_runs_here,
    recorded_runs, runner, unfinished, wait_until, wait_until_idle, Gate, Gated, Logged, Recorded,
};

#[test]
fn a_long_task_on_a_live_instance_is_never_rescued() {
    let db = TestDatabase::new();
    let lease = Duration::from_secs(1);
    let owner = runner(&db, "owner", 1).lease(lease).start().unwrap();
    let gate = Gate::named(&format!("{}-long", db.name()));
    let mut conn = db.connect();
    let id = task_engine::enqueue(&mut conn, &Gated { gate: format!("{}-long", db.name()) }).unwrap();
    gate.wait_for_started(1);
    let watcher = runner(&db, "watcher", 1).lease(lease).start().unwrap();

    // The watcher looks for dead instances every 166 ms: give it many looks, over
    // several leases, while the task runs on.
    let passes = watcher.stats().rescue_passes;
    wait_until("the watcher has looked 20 times", || watcher.stats().rescue_passes >= passes + 20);
    assert_eq!(load_task(&mut conn, id).status, status::RUNNING);
    assert_eq!(watcher.stats().rescued, 0);

    gate.open();
    wait_until("the long task has ended", || load_task(&mut conn, id).status == status::STOPPED);
    let executions = executions_of(&mut conn, id);
    assert_eq!(executions.len(), 1, "the task of a live instance was rescued");
    assert_eq!(executions[0].instance, "owner");
    owner.shutdown();
    watcher.shutdown();
}

#[test]
fn an_instance_restarted_under_its_name_recovers_its_orphans_at_start_and_a_live_name_is_refused() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // What a crash leaves: a running task with an open execution, and a fresh row.
    conn.batch_execute(
        "INSERT INTO tasks (id, task_class, task_parameters, status, instance, attempts)
             VALUES (41, 'echo', '\"again\"', 'running', 'phoenix', 1);
         INSERT INTO task_executions (task_id, attempt, started_at, instance, worker)
             VALUES (41, 1, now(), 'phoenix', 0);
         INSERT INTO task_engine_instances (name, host, pid) VALUES ('phoenix', 'h', 1)",
    )
    .unwrap();

    // The default lease is 30 s: only the recovery at start can explain a quick rerun.
    let engine = runner(&db, "phoenix", Runner::DEFAULT_WORKERS).start().unwrap();
    wait_until("the orphan has run again", || load_task(&mut conn, 41).status == status::STOPPED);
    let executions = executions_of(&mut conn, 41);
    assert_eq!(executions.len(), 2);
    assert_eq!(executions[0].error.as_deref(), Some("lost: its instance restarted (instance phoenix, attempt 1)"));
    assert!(executions[0].stopped_at.is_some());
    assert_eq!(executions[1].result, Some(serde_json::json!("again")));
    assert_eq!(load_task(&mut conn, 41).attempts, 2);

    let twin = Runner::new(db.url(), Registry::from_inventory().unwrap()).instance("phoenix").start();
    let refused = twin.err().expect("a second live instance took the name").to_string();
    assert!(refused.contains("instance name `phoenix` is in use"), "{refused}");
    engine.shutdown();
}

#[test]
fn the_server_restarting_under_a_running_engine_loses_nothing_and_runs_nothing_twice_at_once() {
    let mut db = TestDatabase::on_own_cluster();
    let mut conn = db.connect();
    let key = format!("{}-{}-restart", db.name(), std::process::id());
    let ids = NewTask::new(&Logged { key: key.clone() }).unwrap().insert_copies(&mut conn, 400).unwrap();
    let engine = runner(&db, "survivor", 4).lease(Duration::from_secs(2)).start().unwrap();
    wait_until("some tasks have run", || {
        tasks::table.filter(tasks::status.eq(status::STOPPED)).count().get_result::<i64>(&mut conn).unwrap() >= 40
    });

    db.cluster().restart();
    let mut conn = db.connect();
    wait_until("every task has run after the restart", || unfinished(&mut conn) == 0);
    let stopped: i64 = tasks::table.filter(tasks::status.eq(status::STOPPED)).count().get_result(&mut conn).unwrap();
    assert_eq!(stopped, ids.len() as i64);
    let (_, ran, overlapping) = logged_runs(&key);
    assert_eq!(ran, ids.len(), "tasks never ran");
    assert_eq!(overlapping, 0, "runs of one task overlapped, by the tasks' own record");
    let errors: Vec<String> = task_executions::table
        .filter(task_executions::error.is_not_null())
        .select(task_executions::error.assume_not_null())
        .load(&mut conn)
        .unwrap();
    assert!(errors.iter().all(|e| e.starts_with("lost: ")), "{errors:?}");
    assert_eq!(attempts_not_recorded_once(&mut conn), 0);

    // And while idle: the listener comes back and a new task starts without polling.
    wait_until_idle(&engine, 4);
    db.cluster().restart();
    let mut conn = db.connect();
    let id = task_engine::enqueue(&mut conn, &::tasks::Echo(serde_json::json!("after"))).unwrap();
    wait_until("a task inserted after the second restart has run", || {
        load_task(&mut conn, id).status == status::STOPPED
    });
    eprintln!("restart: {} lost attempts recorded, stats {:?}", errors.len(), engine.stats());
    engine.shutdown();
}

#[test]
fn a_graceful_stop_keeps_the_instance_alive_until_its_last_attempt_is_recorded() {
    // A deploy: the instance is told to stop while its task runs longer than the lease.
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    let lease = Duration::from_secs(1);
    let gate_name = format!("{}-deploy", db.name());
    let gate = Gate::named(&gate_name);
    let leaving = runner(&db, "leaving", 1).lease(lease).start().unwrap();
    let id = task_engine::enqueue(&mut conn, &Recorded { gate: gate_name }).unwrap();
    gate.wait_for_started(1);
    let watcher = runner(&db, "watcher", 1).lease(lease).start().unwrap();
    let stopping = std::thread::spawn(move || leaving.shutdown());

    // The watcher looks for dead instances every 166 ms: many looks, over several
    // leases, while the stopping instance waits for its task.
    let passes = watcher.stats().rescue_passes;
    wait_until("the watcher has looked 20 times", || watcher.stats().rescue_passes >= passes + 20);
    assert_eq!(watcher.stats().rescued, 0, "the attempt of an instance that was finishing it was taken");
    assert_eq!(load_task(&mut conn, id).status, status::RUNNING);

    gate.open();
    stopping.join().unwrap();
    assert_eq!(load_task(&mut conn, id).status, status::STOPPED);
    assert_eq!(recorded_runs(&mut conn, id), 1, "the task ran again");
    assert_eq!(overlapping_runs(&mut conn), 0);
    assert_eq!(executions_of(&mut conn, id).len(), 1);
    watcher.shutdown();
}

#[test]
fn an_instance_with_a_short_lease_never_robs_a_live_one_with_a_long_lease() {
    // A rolling change of --lease: the owner beats every 10 s / 6, the watcher would
    // take any instance silent for 1 s for dead, were it judged by the watcher's lease.
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    let gate_name = format!("{}-leases", db.name());
    let gate = Gate::named(&gate_name);
    let owner = runner(&db, "owner", 1).lease(Duration::from_secs(10)).start().unwrap();
    let id = task_engine::enqueue(&mut conn, &Recorded { gate: gate_name }).unwrap();
    gate.wait_for_started(1);
    let watcher = runner(&db, "watcher", 1).lease(Duration::from_secs(1)).start().unwrap();

    let passes = watcher.stats().rescue_passes;
    wait_until("the watcher has looked 20 times", || watcher.stats().rescue_passes >= passes + 20);
    assert_eq!(watcher.stats().rescued, 0, "the live instance with the longer lease was robbed");
    gate.open();
    wait_until("the task has ended", || load_task(&mut conn, id).status == status::STOPPED);
    assert_eq!(recorded_runs(&mut conn, id), 1);
    assert_eq!(overlapping_runs(&mut conn), 0);
    owner.shutdown();
    watcher.shutdown();
}

#[test]
fn an_instance_whose_row_was_deleted_keeps_its_tasks_and_registers_again() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    let gate_name = format!("{}-rowless", db.name());
    let gate = Gate::named(&gate_name);
    let lease = Duration::from_secs(1);
    let owner = runner(&db, "owner", 1).lease(lease).start().unwrap();
    let id = task_engine::enqueue(&mut conn, &Recorded { gate: gate_name }).unwrap();
    gate.wait_for_started(1);
    let watcher = runner(&db, "watcher", 1).lease(lease).start().unwrap();

    // An operator deletes the owner's row, again and again, while the watcher looks.
    let has_row = |conn: &mut PgConnection| {
        diesel::sql_query("SELECT 1 AS n FROM task_engine_instances WHERE name = 'owner'").execute(conn).unwrap() == 1
    };
    let passes = watcher.stats().rescue_passes;
    for round in 0..5 {
        wait_until(&format!("round {round}: the owner has registered again"), || has_row(&mut conn));
        conn.batch_execute("DELETE FROM task_engine_instances WHERE name = 'owner'").unwrap();
    }
    wait_until("the watcher has looked 20 times", || watcher.stats().rescue_passes >= passes + 20);
    wait_until("the owner has registered again", || has_row(&mut conn));
    assert_eq!(watcher.stats().rescued, 0, "the tasks of a live instance without a row were taken");
    gate.open();
    wait_until("the task has ended", || load_task(&mut conn, id).status == status::STOPPED);
    assert_eq!(recorded_runs(&mut conn, id), 1);
    owner.shutdown();
    watcher.shutdown();
}

#[test]
fn an_instance_whose_heartbeat_is_stuck_claims_nothing_until_it_beats_again() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let engine = runner(&db, "stuck", 1).lease(Duration::from_secs(1)).start().unwrap();
    wait_until_idle(&engine, 1);
    let holder = name_holder(&mut conn, "stuck").expect("the instance holds its name");
    // Another session holds the instance's row: each heartbeat waits for it, then
    // fails (its lock waits are bounded).
    let mut blocker = db.connect();
    blocker.batch_execute("BEGIN; SELECT * FROM task_engine_instances WHERE name = 'stuck' FOR UPDATE").unwrap();
    wait_until("the instance knows its heartbeat is late", || !engine.stats().heartbeat_current);

    let before = engine.stats();
    let id = task_engine::enqueue(&mut conn, &::tasks::Echo(serde_json::json!("later"))).unwrap();
    wait_until("a reason to claim came and was left alone", || {
        let now = engine.stats();
        now.notifications > before.notifications && now.paused_claims > before.paused_claims
    });
    let task = load_task(&mut conn, id);
    assert_eq!((task.status.as_str(), task.attempts), (status::WAITING, 0), "claimed with a late heartbeat");
    // Its statements failed, not its connection: the session that holds the name is
    // the same one (had it closed, the name would have gone, if only for a while).
    assert_eq!(name_holder(&mut conn, "stuck"), Some(holder), "the heartbeat let go of the name");

    blocker.batch_execute("COMMIT").unwrap();
    wait_until("the task has run once the heartbeat is back", || load_task(&mut conn, id).status == status::STOPPED);
    assert!(engine.stats().heartbeat_current);
    engine.shutdown();
}

/// The server process of the session that holds an instance's name lock.
fn name_holder(conn: &mut PgConnection, instance: &str) -> Option<i32> {
    #[derive(QueryableByName)]
    struct Holder {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    diesel::sql_query(
        "SELECT l.pid FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = x'7461736b'::int4::oid
           AND l.objid = hashtext(task_engine_channel() || '/' || $1)::oid",
    )
    .bind::<diesel::sql_types::Text, _>(instance)
    .get_result::<Holder>(conn)
    .optional()
    .unwrap()
    .map(|h| h.pid)
}

#[test]
fn a_task_rescued_by_an_instance_that_cannot_run_it_runs_on_one_that_can_without_polling() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // What a crash leaves: a running task of an instance with no row and no name lock.
    conn.batch_execute(
        "INSERT INTO tasks (id, task_class, task_parameters, status, instance, attempts)
             VALUES (51, 'echo', '\"again\"', 'running', 'vanished', 1);
         INSERT INTO task_executions (task_id, attempt, started_at, instance, worker)
             VALUES (51, 1, now(), 'vanished', 0)",
    )
    .unwrap();
    // The instance that can run it: its lease (30 s) keeps it from judging others
    // within the test, and it polls once an hour.
    let able = runner(&db, "able", 1).start().unwrap();
    wait_until_idle(&able, 1);
    // The rescuer runs other types only, and judges after a second.
    let registry = Registry::from_inventory().unwrap().only(&["noop"]).unwrap();
    let rescuer = Runner::new(db.url(), registry)
        .instance("rescuer")
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    wait_until("the rescuer has put the task back", || rescuer.stats().rescued == 1);
    // Due a few seconds later (the rescue's backoff): only a notification can tell.
    wait_until("the able instance has run it", || load_task(&mut conn, 51).status == status::STOPPED);
    let executions = executions_of(&mut conn, 51);
    assert_eq!(executions.len(), 2);
    assert_eq!(executions[1].instance, "able");
    able.shutdown();
    rescuer.shutdown();
}
