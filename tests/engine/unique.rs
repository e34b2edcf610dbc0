//! Unique tasks: at most one task holds a key, whatever the number of clients inserting
//! it at once, in each conflict mode, inside transactions that commit or roll back.

use std::sync::{mpsc, Arc, Barrier};
use std::thread;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use task_engine::schema::tasks;
use task_engine::{NewTask, OnConflict, Upserted};
use test_db::TestDatabase;

use crate::support::{load_task, start_engine, wait_until, FailsOnceAtGate, Gate, Gated};

const CLIENTS: usize = 8;
const KEYS: usize = 4;
const INSERTS_PER_CLIENT: usize = 40;

/// The task each client inserts: its parameters and due time say who inserted it.
fn attempt_of(client: usize, n: usize, base: DateTime<Utc>) -> (serde_json::Value, DateTime<Utc>) {
    let seq = client * 1000 + n;
    (serde_json::json!({"client": client, "n": n}), base + TimeDelta::seconds(seq as i64))
}

fn holders_of(conn: &mut PgConnection, key: &str) -> Vec<(i64, serde_json::Value, DateTime<Utc>)> {
    tasks::table
        .filter(tasks::unique_key.eq(key))
        .select((tasks::id, tasks::task_parameters, tasks::run_at))
        .load(conn)
        .unwrap()
}

/// Runs `insert` for each of [`CLIENTS`] clients at once (they start together, each
/// on its own connection), [`INSERTS_PER_CLIENT`] times (`n`), and returns every result.
fn from_every_client<T: Send + 'static>(
    db: &TestDatabase,
    insert: impl Fn(usize, usize, &mut PgConnection) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let (barrier, insert) = (Arc::new(Barrier::new(CLIENTS)), Arc::new(insert));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (barrier, insert, mut conn) = (Arc::clone(&barrier), Arc::clone(&insert), db.connect());
            thread::spawn(move || {
                barrier.wait();
                (0..INSERTS_PER_CLIENT).map(|n| insert(client, n, &mut conn)).collect::<Vec<_>>()
            })
        })
        .collect();
    clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
}

#[test]
fn a_unique_key_holds_under_eight_concurrent_inserting_clients_in_each_conflict_mode() {
    let db = TestDatabase::new();
    let base = Utc::now().trunc_subsecs(0) + TimeDelta::hours(1);
    for mode in [OnConflict::Keep, OnConflict::Replace, OnConflict::ReplaceParameters] {
        let done = from_every_client(&db, move |client, n, conn| {
            let key = format!("{mode:?}-{}", (client + n) % KEYS);
            let (parameters, run_at) = attempt_of(client, n, base);
            let task = NewTask::new(&::tasks::Echo(parameters.clone()))
                .unwrap()
                .unique_key(key.clone())
                .on_conflict(mode)
                .run_at(run_at);
            (key, parameters, run_at, task.upsert(conn).unwrap())
        });

        let mut conn = db.connect();
        for k in 0..KEYS {
            let key = format!("{mode:?}-{k}");
            let holders = holders_of(&mut conn, &key);
            assert_eq!(holders.len(), 1, "{mode:?}: key {key} has {} tasks", holders.len());
            let (id, parameters, run_at) = holders[0].clone();
            let mine: Vec<_> = done.iter().filter(|(k, ..)| *k == key).collect();
            assert!(mine.iter().all(|(.., d)| d.id() == id), "{mode:?}: an insert of {key} returned another id");
            let inserted: Vec<_> = mine.iter().filter(|(.., d)| matches!(d, Upserted::Inserted(_))).collect();
            assert_eq!(inserted.len(), 1, "{mode:?}: {key} inserted {} times", inserted.len());
            let (_, first_parameters, first_run_at, _) = inserted[0];
            match mode {
                OnConflict::Keep => {
                    assert_eq!(
                        (&parameters, run_at),
                        (first_parameters, *first_run_at),
                        "{mode:?}: the holder changed"
                    );
                    assert!(mine.iter().all(|(.., d)| !matches!(d, Upserted::Replaced(_))));
                }
                // No holder runs here: each insert that did not insert replaced.
                _ if mine.iter().any(|(.., d)| matches!(d, Upserted::Kept(_))) => {
                    panic!("{mode:?}: {key} was kept instead of replaced")
                }
                OnConflict::Replace => {
                    // The parameters and the due time of one and the same insert: the last.
                    let last = mine.iter().find(|(_, p, ..)| *p == parameters).expect("parameters of an insert");
                    assert_eq!(last.2, run_at, "{mode:?}: parameters of one insert, due time of another");
                }
                OnConflict::ReplaceParameters => {
                    assert_eq!(run_at, *first_run_at, "{mode:?}: the due time was replaced");
                    assert!(mine.iter().any(|(_, p, ..)| *p == parameters));
                }
            }
        }
    }
}

/// The backend of `conn`, for watching it wait.
fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("pg_backend_pid()")).get_result(conn).unwrap()
}

fn waits_for_a_lock(conn: &mut PgConnection, pid: i32) -> bool {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(&format!(
        "EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock')"
    )))
    .get_result(conn)
    .unwrap()
}

#[test]
fn a_key_taken_in_a_transaction_is_held_only_if_it_commits_and_a_concurrent_insert_waits_for_it() {
    let db = TestDatabase::new();
    let mut watcher = db.connect();
    let echo = |n: i32| NewTask::new(&::tasks::Echo(serde_json::json!(n))).unwrap().unique_key("report");

    for commit in [false, true] {
        let (mut first, mut second) = (db.connect(), db.connect());
        let second_pid = backend_pid(&mut second);
        // Diesel's own transaction, which the insert's savepoint nests in.
        AnsiTransactionManager::begin_transaction(&mut first).unwrap();
        let first_id = echo(1).upsert(&mut first).unwrap();
        assert!(matches!(first_id, Upserted::Inserted(_)));

        let (sent, received) = mpsc::channel();
        let inserter = thread::spawn(move || sent.send(echo(2).upsert(&mut second).unwrap()).unwrap());
        wait_until("the second insert waits for the first transaction", || waits_for_a_lock(&mut watcher, second_pid));
        assert!(received.try_recv().is_err(), "the second insert went on before the first ended");

        if commit {
            AnsiTransactionManager::commit_transaction(&mut first).unwrap();
        } else {
            AnsiTransactionManager::rollback_transaction(&mut first).unwrap();
        }
        let second_id = received.recv().unwrap();
        inserter.join().unwrap();
        if commit {
            assert_eq!(second_id, Upserted::Kept(first_id.id()), "a committed holder is kept");
        } else {
            assert!(matches!(second_id, Upserted::Inserted(id) if id != first_id.id()), "{second_id:?}");
        }
        let holders = holders_of(&mut watcher, "report");
        assert_eq!(holders.len(), 1, "the key has {} tasks", holders.len());
        watcher.batch_execute("DELETE FROM tasks").unwrap();
    }

    // Inside a rolled-back transaction, a replace leaves the holder as it was.
    let holder = echo(1).insert(&mut watcher).unwrap();
    let rolled_back: Result<(), diesel::result::Error> = watcher.transaction(|conn| {
        assert_eq!(echo(2).on_conflict(OnConflict::Replace).upsert(conn).unwrap(), Upserted::Replaced(holder));
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(rolled_back.is_err());
    assert_eq!(load_task(&mut watcher, holder).task_parameters, serde_json::json!(1));
}

#[test]
fn a_key_held_while_waiting_frees_at_the_start_and_one_held_while_running_at_the_end() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let later = || {
        NewTask::new(&::tasks::Echo(serde_json::json!("later"))).unwrap().run_in(std::time::Duration::from_secs(3600))
    };

    let gate = Gate::named("unique-while-running");
    let running = NewTask::new(&Gated { gate: "unique-while-running".into() })
        .unwrap()
        .unique_key("running")
        .unique_while_running()
        .insert(&mut conn)
        .unwrap();
    let fails = NewTask::new(&FailsOnceAtGate { gate: "unique-fails-once".into() })
        .unwrap()
        .unique_key("waiting")
        .insert(&mut conn)
        .unwrap();
    let engine = start_engine(&db, "unique", 2);
    gate.wait_for_started(1);
    Gate::named("unique-fails-once").wait_for_started(1);

    // Both have started: the one held while running still holds its key.
    assert_eq!(later().unique_key("running").upsert(&mut conn).unwrap(), Upserted::Kept(running));
    let newer = later().unique_key("waiting").upsert(&mut conn).unwrap();
    assert!(matches!(newer, Upserted::Inserted(id) if id != fails), "{newer:?}");

    // The first fails and goes back to waiting while the newer task holds the key: it
    // lets the key go instead of colliding, and its retry runs.
    Gate::named("unique-fails-once").open();
    wait_until("the failed task's retry has succeeded", || load_task(&mut conn, fails).status == "stopped");
    let retried = load_task(&mut conn, fails);
    assert_eq!((retried.attempts, retried.unique_scope.as_str()), (2, "released"));
    assert_eq!(holders_of(&mut conn, "waiting").len(), 2);

    gate.open();
    wait_until("the held task has ended", || load_task(&mut conn, running).status == "stopped");
    let free = later().unique_key("running").upsert(&mut conn).unwrap();
    assert!(matches!(free, Upserted::Inserted(id) if id != running), "{free:?}");
    engine.shutdown();
}

#[test]
fn a_unique_key_holds_under_eight_clients_inserting_in_transactions_of_which_a_third_roll_back() {
    let db = TestDatabase::new();
    let done = from_every_client(&db, |client, n, conn| {
        let key = format!("tx-{}", (client + n) % KEYS);
        let commits = (client + n) % 3 != 0;
        let task = NewTask::new(&::tasks::Echo(serde_json::json!([client, n]))).unwrap().unique_key(&key);
        let mut done = None;
        let _ = conn.transaction(|conn| {
            done = Some(task.upsert(conn).unwrap());
            if commits {
                Ok(())
            } else {
                Err(diesel::result::Error::RollbackTransaction)
            }
        });
        (key, commits, done.unwrap())
    });
    let mut conn = db.connect();
    for k in 0..KEYS {
        let key = format!("tx-{k}");
        let holders = holders_of(&mut conn, &key);
        assert_eq!(holders.len(), 1, "key {key} has {} tasks", holders.len());
        let committed: Vec<_> = done.iter().filter(|(k, commits, _)| *k == key && *commits).collect();
        assert!(
            committed.iter().all(|(.., d)| d.id() == holders[0].0),
            "a committed insert of {key} returned a task that is not its holder"
        );
        let inserted = committed.iter().filter(|(.., d)| matches!(d, Upserted::Inserted(_))).count();
        assert_eq!(inserted, 1, "{key}: {inserted} committed inserts inserted");
    }
}

#[test]
fn a_replace_by_another_type_makes_the_holder_a_task_of_that_type_which_then_runs() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let holder = NewTask::new(&::tasks::Noop {}).unwrap().unique_key("k").max_attempts(2).insert(&mut conn).unwrap();
    conn.batch_execute(&format!("UPDATE tasks SET checkpoint = '{{\"noop\": 1}}' WHERE id = {holder}")).unwrap();

    let replace = NewTask::new(&::tasks::Echo(serde_json::json!({"a": 2})))
        .unwrap()
        .unique_key("k")
        .max_attempts(7)
        .key("tenant")
        .on_conflict(OnConflict::Replace);
    assert_eq!(replace.upsert(&mut conn).unwrap(), Upserted::Replaced(holder));
    let row = load_task(&mut conn, holder);
    assert_eq!(
        (row.task_class.as_str(), &row.task_parameters, row.max_attempts, row.fair_key.as_str(), &row.checkpoint),
        ("echo", &serde_json::json!({"a": 2}), 7, "tenant", &None),
        "the holder is not the new task"
    );

    let engine = start_engine(&db, "replaced", 1);
    wait_until("the replaced task has run", || load_task(&mut conn, holder).status != "waiting");
    wait_until("the replaced task has ended", || load_task(&mut conn, holder).status != "running");
    engine.shutdown();
    let row = load_task(&mut conn, holder);
    assert_eq!(row.status, "stopped", "the replaced task did not run as an echo");
}

#[test]
fn a_task_waiting_for_its_retry_keeps_its_key_when_no_newer_task_took_it() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let fails = ::tasks::Fail { message: "busy".into(), permanent: false };
    // The default retry delay after a first attempt is about 4 s: the enqueue below
    // comes well within it.
    let id = NewTask::new(&fails).unwrap().unique_key("k").max_attempts(3).insert(&mut conn).unwrap();
    let engine = start_engine(&db, "retrying", 1);
    wait_until("the first attempt has failed", || {
        let task = load_task(&mut conn, id);
        task.attempts == 1 && task.status == "waiting"
    });
    engine.shutdown();

    assert_eq!(load_task(&mut conn, id).unique_scope, "waiting", "the key was let go");
    let again = NewTask::new(&::tasks::Echo(serde_json::json!(1))).unwrap().unique_key("k").upsert(&mut conn).unwrap();
    assert_eq!(again, Upserted::Kept(id), "an enqueue during the retry's wait added a second task");
}

#[test]
fn a_key_inserted_by_an_open_transaction_while_its_holder_ran_stays_with_the_new_task() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let gate = Gate::named("unique-open-transaction");
    let first = NewTask::new(&FailsOnceAtGate { gate: "unique-open-transaction".into() })
        .unwrap()
        .unique_key("k")
        .insert(&mut conn)
        .unwrap();
    let engine = start_engine(&db, "open-transaction", 1);
    gate.wait_for_started(1);

    // While the first runs (its key free), a transaction inserts the key and stays open
    // while the first fails and goes back to waiting.
    let mut inserter = db.connect();
    AnsiTransactionManager::begin_transaction(&mut inserter).unwrap();
    let newer = NewTask::new(&::tasks::Echo(serde_json::json!(2)))
        .unwrap()
        .unique_key("k")
        .run_in(std::time::Duration::from_secs(3600))
        .upsert(&mut inserter)
        .unwrap();
    gate.open();
    wait_until("the retry has succeeded, the transaction still open", || {
        load_task(&mut conn, first).status == "stopped"
    });
    AnsiTransactionManager::commit_transaction(&mut inserter).unwrap();
    engine.shutdown();

    assert_eq!(load_task(&mut conn, first).unique_scope, "released");
    assert!(matches!(newer, Upserted::Inserted(id) if id != first), "{newer:?}");
    let holder = NewTask::new(&::tasks::Echo(serde_json::json!(3))).unwrap().unique_key("k").upsert(&mut conn).unwrap();
    assert_eq!(holder, Upserted::Kept(newer.id()));
}
