//! PostgreSQL itself failing under a running engine: the server killed with SIGKILL
//! (crash recovery), and a failover to a synchronous standby promoted while the engine
//! runs (a multi-host URL with `target_session_attrs=read-write`). Overlap is judged by
//! the tasks' own record, kept in this process's memory: a crash of the database
//! cannot lose it.

use std::time::Duration;

use diesel::prelude::*;
use task_engine::models::status;
use task_engine::schema::{task_executions, tasks};
use task_engine::NewTask;
use test_db::{TestCluster, TestDatabase};

use crate::support::{attempts_not_recorded_once, logged_runs, runner, unfinished, wait_until, Logged};

#[test]
fn the_server_killed_under_load_recovers_and_no_task_is_lost_or_run_twice_at_once() {
    let mut db = TestDatabase::on_own_durable_cluster();
    let key = format!("{}-{}-crash", db.name(), std::process::id());
    let mut conn = db.connect();
    let ids = NewTask::new(&Logged { key: key.clone() }).unwrap().insert_copies(&mut conn, 2000).unwrap();
    let lease = Duration::from_secs(2);
    let engines =
        [runner(&db, "one", 4).lease(lease).start().unwrap(), runner(&db, "two", 4).lease(lease).start().unwrap()];
    wait_until("a fifth of the tasks have run", || stopped(&mut conn) >= 400);

    db.cluster().crash_and_recover();
    let mut conn = db.connect();
    wait_until("every task has run after the crash", || unfinished(&mut conn) == 0);
    for engine in engines {
        engine.shutdown();
    }

    let (runs, lost) = nothing_lost_nor_run_twice_at_once(&mut conn, &key, ids.len());
    eprintln!("crash: {runs} runs of {} tasks, {lost} lost attempts recorded, 0 overlapping", ids.len());
}

#[test]
fn a_failover_to_a_synchronous_standby_loses_no_task_and_runs_none_twice_at_once() {
    use diesel::connection::SimpleConnection;
    // The server binaries of the other versions come without pg_basebackup; there the
    // crash test above stands in (the engine's side of a failover, a multi-host URL, is
    // libpq's and the same on every version).
    if let Some(why) = TestCluster::standby_unavailable() {
        eprintln!("skipped on this server: {why}");
        return;
    }
    let mut db = TestDatabase::on_own_durable_cluster();
    let standby = db.cluster().standby();
    let mut conn = db.connect();
    // Synchronous replication: a claim's commit returns once the standby has it.
    conn.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'").unwrap();
    conn.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the standby is synchronous", || {
        diesel::sql_query("SELECT 1 AS n FROM pg_stat_replication WHERE sync_state = 'sync'")
            .execute(&mut conn)
            .unwrap()
            == 1
    });
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        db.cluster().port(),
        standby.port(),
        db.name()
    );
    let key = format!("{}-{}-failover", db.name(), std::process::id());
    let ids = NewTask::new(&Logged { key: key.clone() }).unwrap().insert_copies(&mut conn, 2000).unwrap();
    let engines: Vec<task_engine::RunningEngine> = ["one", "two"]
        .into_iter()
        .map(|name| {
            task_engine::Runner::new(&url, task_engine::Registry::from_inventory().unwrap())
                .instance(name)
                .workers(4)
                .lease(Duration::from_secs(2))
                .poll_interval(Duration::from_secs(3600))
                .start()
                .unwrap()
        })
        .collect();
    wait_until("a fifth of the tasks have run", || stopped(&mut conn) >= 400);

    // The primary dies; the standby takes over.
    db.cluster().crash();
    standby.promote();
    let mut conn = PgConnection::establish(&url).expect("the promoted standby answers");
    wait_until("every task has run after the failover", || unfinished(&mut conn) == 0);
    for engine in engines {
        engine.shutdown();
    }

    let (runs, lost) = nothing_lost_nor_run_twice_at_once(&mut conn, &key, ids.len());
    eprintln!("failover: {runs} runs of {} tasks, {lost} lost attempts recorded, 0 overlapping", ids.len());
}

/// Checks the end of a disaster: every one of the `tasks` tasks stopped and ran, by
/// their own record no two runs of one overlapped, each attempt has one execution, the only
/// errors are lost attempts, each recorded; returns the runs and the lost attempts.
fn nothing_lost_nor_run_twice_at_once(conn: &mut PgConnection, key: &str, tasks: usize) -> (usize, usize) {
    assert_eq!(stopped(conn), tasks as i64, "tasks were lost");
    let (runs, ran, overlapping) = logged_runs(key);
    assert_eq!(ran, tasks, "tasks never ran");
    assert_eq!(overlapping, 0, "runs of one task overlapped, by the tasks' own record");
    assert_eq!(attempts_not_recorded_once(conn), 0, "attempts not recorded exactly once");
    let errors: Vec<String> = task_executions::table
        .filter(task_executions::error.is_not_null())
        .select(task_executions::error.assume_not_null())
        .load(conn)
        .unwrap();
    assert!(errors.iter().all(|e| e.starts_with("lost: ")), "{errors:?}");
    let executions: i64 = task_executions::table.count().get_result(conn).unwrap();
    assert_eq!(executions, (tasks + errors.len()) as i64, "an attempt is missing from the history");
    (runs, errors.len())
}

fn stopped(conn: &mut PgConnection) -> i64 {
    tasks::table.filter(tasks::status.eq(status::STOPPED)).count().get_result(conn).unwrap()
}
