//! Named queues: an instance runs the queues it is told to; a queue's limits (at once
//! across instances, per key, per window) hold whoever claims; a paused queue starts
//! nothing; keys are served in turn. Judged by the tasks' own record of their runs.

use std::time::Duration;

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use task_engine::{register_task, NewTask, RunningEngine, Task, TaskContext, TaskError};
use test_db::TestDatabase;

use crate::support::{record_runs_here, run_recorded, runner, wait_until, wait_until_all_ended};

/// Records its run in `test_runs` (see [`record_runs_here`]), lasting `ms`.
#[derive(Serialize, Deserialize)]
struct Stint {
    ms: u64,
}

impl Task for Stint {
    const NAME: &'static str = "test_stint";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        // The task's own duration, not a wait for something.
        // The work itself: the `tasks` crate's `sleep`, which takes `ms` (and stops on a
        // cancel).
        run_recorded(ctx, || tasks::Sleep { ms: self.ms }.run(ctx))
    }
}
register_task!(Stint);

/// A type whose tasks go to a queue of their own unless the enqueue says otherwise.
#[derive(Serialize, Deserialize)]
struct Elsewhere {}

impl Task for Elsewhere {
    const NAME: &'static str = "test_elsewhere";
    const QUEUE: &'static str = "nobody_runs_this";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        Ok(())
    }
}
register_task!(Elsewhere);

fn enqueue_stints(conn: &mut PgConnection, queue: &str, key: &str, ms: u64, count: usize) -> Vec<i64> {
    let batch: Vec<NewTask> = (0..count).map(|_| NewTask::new(&Stint { ms }).unwrap().queue(queue).key(key)).collect();
    task_engine::enqueue_many(conn, &batch).unwrap()
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

/// The most runs going on at one instant (of one key, with `per_key`), by the tasks'
/// own record.
fn most_at_once(conn: &mut PgConnection, per_key: bool) -> i64 {
    let same_key = if per_key { "AND ta.fair_key = tb.fair_key" } else { "" };
    count(
        conn,
        &format!(
            "SELECT coalesce(max(c), 0) AS n FROM (
                 SELECT count(*) AS c FROM test_runs a
                 JOIN tasks ta ON ta.id = a.task_id
                 JOIN test_runs b ON b.started_at <= a.started_at AND coalesce(b.ended_at, 'infinity') > a.started_at
                 JOIN tasks tb ON tb.id = b.task_id {same_key}
                 GROUP BY a.task_id, a.attempt) x"
        ),
    )
}

/// The ids of the recorded runs, in the order they started.
fn run_order(conn: &mut PgConnection) -> Vec<i64> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        task_id: i64,
    }
    let ids: Vec<Id> = diesel::sql_query("SELECT task_id FROM test_runs ORDER BY started_at").load(conn).unwrap();
    ids.into_iter().map(|r| r.task_id).collect()
}

fn start_on_queue(db: &TestDatabase, instance: &str, queue: &str, workers: usize) -> RunningEngine {
    runner(db, instance, 1).queue(queue, workers).start().expect("engine starts")
}

#[test]
fn a_global_limit_is_never_exceeded_with_three_instances_claiming_at_once() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    task_engine::set_queue_concurrency(&mut conn, "limited", Some(3)).unwrap();
    enqueue_stints(&mut conn, "limited", "", 30, 60);
    let engines: Vec<RunningEngine> =
        ["a", "b", "c"].iter().map(|name| start_on_queue(&db, name, "limited", 4)).collect();
    wait_until_all_ended(&mut conn);
    engines.into_iter().for_each(RunningEngine::shutdown);

    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM test_runs"), 60);
    assert_eq!(most_at_once(&mut conn, false), 3, "the limit of 3 was overshot, or never reached");
    let instances = count(&mut conn, "SELECT count(DISTINCT instance) AS n FROM test_runs");
    assert!(instances >= 2, "one instance ran everything: the test proves nothing about instances");
}

#[test]
fn a_serial_queue_runs_its_tasks_one_at_a_time_in_order_across_instances() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    task_engine::set_queue_concurrency(&mut conn, "serial", Some(1)).unwrap();
    let ids = enqueue_stints(&mut conn, "serial", "", 5, 20);
    let engines: Vec<RunningEngine> = ["a", "b"].iter().map(|name| start_on_queue(&db, name, "serial", 3)).collect();
    wait_until_all_ended(&mut conn);
    engines.into_iter().for_each(RunningEngine::shutdown);

    assert_eq!(most_at_once(&mut conn, false), 1);
    assert_eq!(run_order(&mut conn), ids, "not run in order");
}

#[test]
fn a_paused_queue_starts_nothing_and_resumes_without_polling() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    task_engine::pause_queue(&mut conn, "paused").unwrap();
    // The fallback poll is an hour (see `runner`): only a notification wakes it.
    let engine = start_on_queue(&db, "a", "paused", 2);
    wait_until("the instance is idle, holding the stripes", || {
        let stats = engine.stats();
        stats.marked_idle && stats.listening && stats.sleeping_workers == 2
    });
    let claims = engine.stats().claims;
    let paused = enqueue_stints(&mut conn, "paused", "", 1, 5);
    // The insert's notification makes it claim, and the claim starts nothing.
    wait_until("the instance claimed after the insert", || engine.stats().claims > claims);
    wait_until("the instance is idle again", || engine.stats().marked_idle);
    let waiting = count(&mut conn, "SELECT count(*) AS n FROM tasks WHERE queue = 'paused' AND status = 'waiting'");
    assert_eq!(waiting, 5, "a paused queue's task started");
    assert!(run_order(&mut conn).is_empty());

    task_engine::resume_queue(&mut conn, "paused").unwrap();
    wait_until_all_ended(&mut conn);
    let mut ran = run_order(&mut conn);
    ran.sort_unstable();
    assert_eq!(ran, paused);
    engine.shutdown();
}

#[test]
fn a_queue_paused_and_resumed_by_sql_without_a_notification_follows_within_a_heartbeat() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    conn.batch_execute("INSERT INTO task_engine_queues (name) VALUES ('by_sql')").unwrap();
    // A lease of 3 s: a heartbeat every half second; the fallback poll is an hour.
    let engine = runner(&db, "a", 1).queue("by_sql", 2).lease(Duration::from_secs(3)).start().unwrap();
    wait_until("the instance is idle and has beaten once", || {
        let stats = engine.stats();
        stats.marked_idle && stats.listening && stats.sleeping_workers == 2 && stats.heartbeats >= 1
    });

    // Paused by a plain UPDATE of its row: no notification; the next claim reads it.
    conn.batch_execute("UPDATE task_engine_queues SET paused = true WHERE name = 'by_sql'").unwrap();
    let claims = engine.stats().claims;
    let ids = enqueue_stints(&mut conn, "by_sql", "", 1, 5);
    wait_until("the instance claimed after the insert", || engine.stats().claims > claims);
    let beats = engine.stats().heartbeats;
    wait_until("two heartbeats have gone by", || engine.stats().heartbeats >= beats + 2);
    let waiting = count(&mut conn, "SELECT count(*) AS n FROM tasks WHERE queue = 'by_sql' AND status = 'waiting'");
    assert_eq!(waiting, 5, "a paused queue's task started");

    // Resumed by a plain UPDATE: only a heartbeat can notice it.
    conn.batch_execute("UPDATE task_engine_queues SET paused = false WHERE name = 'by_sql'").unwrap();
    let beats = engine.stats().heartbeats;
    wait_until("the resumed queue's tasks are claimed", || engine.stats().claimed_tasks >= 5);
    let took = engine.stats().heartbeats - beats;
    assert!(took <= 2, "the resume took {took} heartbeats to arrive");
    wait_until_all_ended(&mut conn);
    let mut ran = run_order(&mut conn);
    ran.sort_unstable();
    assert_eq!(ran, ids);
    assert!(engine.stats().queue_changes_seen >= 1);
    assert_eq!(engine.stats().notifications, 1, "only the insert notified: the test proves nothing");
    engine.shutdown();
}

#[test]
fn a_rate_limit_holds_over_a_window() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    task_engine::set_queue_rate_limit(&mut conn, "rated", Some((3, Duration::from_millis(500)))).unwrap();
    enqueue_stints(&mut conn, "rated", "", 0, 9);
    let engine = start_on_queue(&db, "a", "rated", 4);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    // 9 tasks at 3 per window: three windows, and any 4 starts in a row span two.
    #[derive(QueryableByName)]
    struct Gap {
        #[diesel(sql_type = diesel::sql_types::Double)]
        ms: f64,
    }
    let gaps: Vec<Gap> = diesel::sql_query(
        "SELECT extract(epoch FROM lead(started_at, 3) OVER (ORDER BY started_at) - started_at)::float8 * 1000 AS ms
         FROM test_runs ORDER BY started_at LIMIT 6",
    )
    .load(&mut conn)
    .unwrap();
    assert_eq!(gaps.len(), 6);
    for gap in gaps {
        // A start may come a little after its claim, which opened the window.
        assert!(gap.ms >= 400.0, "4 starts within {} ms, under a limit of 3 per 500 ms", gap.ms);
    }
}

#[test]
fn a_key_s_backlog_does_not_starve_another_key() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    enqueue_stints(&mut conn, "fair", "big", 0, 400);
    let small = enqueue_stints(&mut conn, "fair", "small", 0, 5);
    let engine = start_on_queue(&db, "a", "fair", 2);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    // Keys in turn: the small key's five tasks alternate with the big key's (each among
    // the first fifteen to start, two workers making the order jitter), not behind the
    // 400 inserted before them.
    let order = run_order(&mut conn);
    let last_small = order.iter().rposition(|id| small.contains(id)).unwrap();
    let at: Vec<usize> = order.iter().enumerate().filter(|(_, id)| small.contains(id)).map(|(i, _)| i).collect();
    assert!(last_small < 15, "the small key's tasks ran at {at:?} of {}", order.len());
}

#[test]
fn a_limit_per_key_bounds_what_runs_of_one_key_across_instances() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    task_engine::set_queue_key_limit(&mut conn, "tenants", Some(2)).unwrap();
    for key in ["a", "b", "c"] {
        enqueue_stints(&mut conn, "tenants", key, 30, 12);
    }
    let engines: Vec<RunningEngine> = ["x", "y"].iter().map(|name| start_on_queue(&db, name, "tenants", 8)).collect();
    wait_until_all_ended(&mut conn);
    engines.into_iter().for_each(RunningEngine::shutdown);

    assert_eq!(most_at_once(&mut conn, true), 2, "a key ran more than 2 at once, or never 2");
    assert!(most_at_once(&mut conn, false) > 2, "the keys did not run beside one another");
}

#[test]
fn a_limit_per_key_leaves_tasks_without_a_key_be() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    task_engine::set_queue_key_limit(&mut conn, "invoices", Some(1)).unwrap();
    enqueue_stints(&mut conn, "invoices", "", 200, 4);
    let engine = start_on_queue(&db, "x", "invoices", 4);
    wait_until_all_ended(&mut conn);
    engine.shutdown();

    assert_eq!(most_at_once(&mut conn, false), 4, "tasks without a key were held to the limit per key");
}

#[test]
fn a_queue_no_instance_runs_waits() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    record_runs_here(&mut conn);
    let engine = start_on_queue(&db, "a", "default", 2);
    // By its type's queue, and by the enqueue's.
    let by_type = task_engine::enqueue(&mut conn, &Elsewhere {}).unwrap();
    let by_enqueue = enqueue_stints(&mut conn, "nobody_runs_this", "", 1, 1)[0];
    let claims = engine.stats().claims;
    let ran = enqueue_stints(&mut conn, "default", "", 1, 1);
    wait_until("the default queue's task ran, claimed after the others' insert", || {
        run_order(&mut conn).contains(&ran[0]) && engine.stats().claims > claims
    });
    let waiting: Vec<(i64, String)> = task_engine::schema::tasks::table
        .filter(task_engine::schema::tasks::status.eq("waiting"))
        .select((task_engine::schema::tasks::id, task_engine::schema::tasks::queue))
        .order(task_engine::schema::tasks::id)
        .load(&mut conn)
        .unwrap();
    let nobody = "nobody_runs_this".to_owned();
    assert_eq!(waiting, [(by_type, nobody.clone()), (by_enqueue, nobody)]);
    engine.shutdown();
}

#[test]
fn a_place_freed_by_a_rescue_under_a_limit_wakes_the_instance_waiting_for_it() {
    use diesel::connection::SimpleConnection;
    let db = TestDatabase::new();
    let mut conn = db.connect();
    task_engine::set_queue_concurrency(&mut conn, "serial", Some(1)).unwrap();
    // What a crash leaves: the queue's one place taken by a vanished instance's task
    // (on its last attempt), and a task waiting behind it.
    conn.batch_execute(
        "INSERT INTO tasks (id, task_class, task_parameters, status, instance, attempts, max_attempts, queue)
             VALUES (51, 'echo', '1', 'running', 'vanished', 1, 1, 'serial'),
                    (52, 'echo', '2', 'waiting', NULL, 0, 1, 'serial')",
    )
    .unwrap();
    // Its lease (30 s) keeps it from judging others within the test; it polls hourly.
    let waiting = runner(&db, "waiting", 1).queue("serial", 1).start().unwrap();
    wait_until("the instance found the queue full and went idle", || {
        let stats = waiting.stats();
        stats.claims >= 2 && stats.marked_idle && stats.sleeping_workers == 1
    });
    // The rescuer runs another queue, and judges after a second.
    let rescuer = runner(&db, "rescuer", 1).lease(Duration::from_secs(1)).start().unwrap();
    wait_until("the rescuer has ended the lost task", || {
        rescuer.stats().rescue_passes > 0 && {
            task_engine::schema::tasks::table
                .find(51)
                .select(task_engine::schema::tasks::status)
                .first::<String>(&mut conn)
                .unwrap()
                == "failed"
        }
    });
    wait_until("the waiting task ran, woken by the rescue", || {
        task_engine::schema::tasks::table
            .find(52)
            .select(task_engine::schema::tasks::status)
            .first::<String>(&mut conn)
            .unwrap()
            == "stopped"
    });
    waiting.shutdown();
    rescuer.shutdown();
}
