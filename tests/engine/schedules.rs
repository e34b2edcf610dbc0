//! Recurring tasks: each tick enqueued once, whichever instances run, start, stop or
//! die around it; missed ticks follow the schedule's catch-up. Schedules declared with
//! the code: a newer declaration is not undone by an older instance, one removed from
//! the code goes, one added by hand stays.

use std::sync::mpsc;
use std::thread;

use chrono::{DateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz};
use task_engine::{add_schedule, fire_due, list_schedules, register_schedule, Declarations, Schedule, ScheduleState};
use test_db::TestDatabase;

use crate::support::{runner, wait_until};

#[derive(QueryableByName, Debug, PartialEq)]
struct Tick {
    #[diesel(sql_type = Timestamptz)]
    run_at: DateTime<Utc>,
    #[diesel(sql_type = BigInt)]
    tasks: i64,
}

/// The ticks enqueued (a task is due at its tick), with how many tasks each got.
fn ticks(conn: &mut PgConnection) -> Vec<Tick> {
    diesel::sql_query("SELECT run_at, count(*) AS tasks FROM tasks GROUP BY run_at ORDER BY run_at").load(conn).unwrap()
}

/// Every second from the first tick to the last enqueued, each once.
fn each_second_enqueued_once(ticks: &[Tick]) {
    assert!(ticks.iter().all(|t| t.tasks == 1), "a tick enqueued twice: {ticks:?}");
    let (first, last) = (ticks[0].run_at, ticks[ticks.len() - 1].run_at);
    assert_eq!((last - first).num_seconds() + 1, ticks.len() as i64, "a tick was lost: {ticks:?}");
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

#[test]
fn a_schedule_fires_once_per_tick_while_three_instances_start_and_stop_around_the_ticks() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Every second; a tick missed while the machine stalls is caught up, so that a gap
    // can only mean a tick lost.
    let every_second = Schedule::new("every-second", "* * * * * *", &::tasks::Noop {}).unwrap().catch_up(1000);
    let start = |name: &str| runner(&db, name, 1).schedule(every_second.clone()).start().unwrap();
    let mut seen = 0;
    let mut two_more_ticks = |conn: &mut PgConnection| {
        wait_until("two more ticks are enqueued", || ticks(conn).len() >= seen + 2);
        seen = ticks(conn).len();
    };

    let (a, b, c) = (start("cron-a"), start("cron-b"), start("cron-c"));
    two_more_ticks(&mut conn);
    a.shutdown();
    two_more_ticks(&mut conn);
    let a = start("cron-a2");
    b.shutdown();
    two_more_ticks(&mut conn);
    let b = start("cron-b2");
    c.shutdown();
    two_more_ticks(&mut conn);
    a.shutdown();
    b.shutdown();

    each_second_enqueued_once(&ticks(&mut conn));
}

#[test]
fn ticks_missed_while_no_instance_ran_follow_each_schedules_catch_up() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    for (name, catch_up) in [("skips", 0), ("catches-up-2", 2)] {
        let schedule = Schedule::new(name, "0 * * * * *", &::tasks::Echo(serde_json::json!(name))).unwrap();
        add_schedule(&mut conn, &schedule.catch_up(catch_up)).unwrap();
    }
    conn.batch_execute("UPDATE task_engine_schedules SET last_tick = '2026-11-30T10:00:00Z'").unwrap();

    // Back at 10:05:20: 10:05 is on time, 10:01 to 10:04 were missed.
    assert_eq!(fire_due(&mut conn, at("2026-11-30T10:05:20Z")).unwrap(), 4);
    assert_eq!(fire_due(&mut conn, at("2026-11-30T10:05:20Z")).unwrap(), 0, "fired twice");
    let of = |conn: &mut PgConnection, name: &str| -> Vec<DateTime<Utc>> {
        diesel::sql_query(
            "SELECT run_at, 1::bigint AS tasks FROM tasks WHERE task_parameters = to_jsonb($1::text) ORDER BY run_at",
        )
        .bind::<diesel::sql_types::Text, _>(name)
        .load::<Tick>(conn)
        .unwrap()
        .into_iter()
        .map(|t| t.run_at)
        .collect()
    };
    assert_eq!(of(&mut conn, "skips"), [at("2026-11-30T10:05:00Z")]);
    let caught_up = ["10:03", "10:04", "10:05"].map(|m| at(&format!("2026-11-30T{m}:00Z")));
    assert_eq!(of(&mut conn, "catches-up-2"), caught_up);
}

#[test]
fn a_tick_being_fired_elsewhere_is_waited_for_then_fired_once_whether_that_instance_commits_or_dies() {
    let db = TestDatabase::new();
    let mut watcher = db.connect();
    let schedule = Schedule::new("minutely", "0 * * * * *", &::tasks::Noop {}).unwrap();
    add_schedule(&mut watcher, &schedule).unwrap();
    for (minute, dies) in [(1, true), (2, false)] {
        let (mut first, mut other) = (db.connect(), db.connect());
        let now = at(&format!("2026-11-30T10:0{minute}:05Z"));
        watcher
            .batch_execute(&format!("UPDATE task_engine_schedules SET last_tick = '2026-11-30T10:0{}:00Z'", minute - 1))
            .unwrap();

        // The first instance enqueues the tick, and commits or dies before its commit.
        AnsiTransactionManager::begin_transaction(&mut first).unwrap();
        assert_eq!(fire_due(&mut first, now).unwrap(), 1);
        let other_pid: i32 = diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("pg_backend_pid()"))
            .get_result(&mut other)
            .unwrap();
        let (sent, fired) = mpsc::channel();
        let firing = thread::spawn(move || sent.send(fire_due(&mut other, now).unwrap()).unwrap());
        wait_until("the other instance waits for the schedule's lock", || {
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(&format!(
                "EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {other_pid} AND wait_event_type = 'Lock')"
            )))
            .get_result(&mut watcher)
            .unwrap()
        });
        if dies {
            AnsiTransactionManager::rollback_transaction(&mut first).unwrap();
        } else {
            AnsiTransactionManager::commit_transaction(&mut first).unwrap();
        }
        assert_eq!(fired.recv().unwrap(), usize::from(dies), "dies: {dies}");
        firing.join().unwrap();
        let tick = at(&format!("2026-11-30T10:0{minute}:00Z"));
        let fired: Vec<Tick> = ticks(&mut watcher).into_iter().filter(|t| t.run_at == tick).collect();
        assert_eq!(fired, [Tick { run_at: tick, tasks: 1 }], "dies: {dies}");
    }
}

#[test]
fn a_schedule_that_cannot_fire_holds_up_no_other_and_says_why() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    // Written by SQL: an expression that does not parse, a queue the table refuses.
    conn.batch_execute(
        "INSERT INTO task_engine_schedules (name, cron, task_class, queue, last_tick) VALUES
             ('a-bad-cron', 'every minute', 'noop', 'default', '2026-11-30T10:00:00Z'),
             ('b-bad-queue', '0 * * * * *', 'noop', '', '2026-11-30T10:00:00Z'),
             ('c-good', '0 * * * * *', 'noop', 'default', '2026-11-30T10:00:00Z')",
    )
    .unwrap();
    assert_eq!(fire_due(&mut conn, at("2026-11-30T10:01:05Z")).unwrap(), 1);
    assert_eq!(ticks(&mut conn), [Tick { run_at: at("2026-11-30T10:01:00Z"), tasks: 1 }]);
    let listed = task_engine::list_schedules(&mut conn).unwrap();
    let bad = listed.iter().find(|s| s.schedule.name == "a-bad-cron").unwrap();
    assert!(bad.error.as_deref().is_some_and(|e| e.contains("\"every minute\" is not valid")), "{bad:?}");
    assert!(listed.iter().find(|s| s.schedule.name == "c-good").unwrap().error.is_none());
}

/// Declarations of one scope, `billing`, as a crate's `register_schedule!`s make them.
fn billing(schedules: &[&Schedule]) -> Declarations {
    let mut declarations = Declarations::default();
    for schedule in schedules {
        declarations.declare("billing", (*schedule).clone()).unwrap();
    }
    declarations
}

fn stored(conn: &mut PgConnection, name: &str) -> Option<ScheduleState> {
    list_schedules(conn).unwrap().into_iter().find(|s| s.schedule.name == name)
}

fn report(cron: &str) -> Schedule {
    Schedule::new("report", cron, &::tasks::Echo(serde_json::json!("report"))).unwrap()
}

/// Makes the newest set of `billing` look as if its instances had stopped over a
/// minute ago.
fn newest_set_stopped(conn: &mut PgConnection) {
    conn.batch_execute(
        "UPDATE task_engine_declarations SET last_seen = now() - interval '2 minutes'
         WHERE scope = 'billing'
           AND generation = (SELECT max(generation) FROM task_engine_declarations WHERE scope = 'billing')",
    )
    .unwrap();
}

thread_local! {
    /// Whether the declaration below is made on this thread: in the one test that
    /// wants it, not in the other tests' instances (each test runs on a thread of its own).
    static DECLARING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

register_schedule!(if DECLARING.get() =>
    Schedule::new("declared-every-second", "* * * * * *", &::tasks::Noop {})?.catch_up(1000));

#[test]
fn a_declared_schedule_fires_once_per_tick_with_two_instances_that_declare_it() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let names = |d: &Declarations| d.schedules().map(|(scope, s)| format!("{scope}: {}", s.name)).collect::<Vec<_>>();
    assert_eq!(names(&Declarations::from_inventory().unwrap()), [] as [String; 0], "declared without its condition");
    DECLARING.set(true);
    assert_eq!(names(&Declarations::from_inventory().unwrap()), ["engine: declared-every-second"]);
    // Plain instances: they collect the declarations linked into the binary at their start.
    let (a, b) = (runner(&db, "declared-a", 1).start().unwrap(), runner(&db, "declared-b", 1).start().unwrap());
    DECLARING.set(false);
    let row = stored(&mut conn, "declared-every-second").expect("the declaration was applied at the start");
    assert_eq!((row.schedule.cron.as_str(), row.declared_in.as_deref()), ("* * * * * *", Some("engine")));

    wait_until("four ticks are enqueued", || ticks(&mut conn).len() >= 4);
    a.shutdown();
    b.shutdown();
    each_second_enqueued_once(&ticks(&mut conn));
}

#[test]
fn an_older_declaration_starting_after_a_newer_one_does_not_undo_it_until_the_newer_one_stops_running() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let (old, new) = (billing(&[&report("0 2 1 1 *")]), billing(&[&report("0 3 1 1 *")]));
    let start =
        |name: &str, declared: &Declarations| runner(&db, name, 1).declarations(declared.clone()).start().unwrap();
    let cron_of = |conn: &mut PgConnection| stored(conn, "report").unwrap().schedule.cron;

    // The old version runs; the new one is deployed beside it.
    let b = start("old-b", &old);
    assert_eq!(cron_of(&mut conn), "0 2 1 1 *");
    // Ticks once a year: none comes during the test, the last tick dealt with is now.
    conn.batch_execute("UPDATE task_engine_schedules SET last_tick = now()").unwrap();
    let last_tick = stored(&mut conn, "report").unwrap().last_tick;
    let a = start("new-a", &new);
    assert_eq!(cron_of(&mut conn), "0 3 1 1 *");
    // An instance of the old version restarts late: it starts, and its cron part
    // renews its declarations, without undoing the new one.
    b.shutdown();
    let b = start("old-b", &old);
    assert_eq!(cron_of(&mut conn), "0 3 1 1 *", "the late start of an older instance undid the newer declaration");
    let old_seen = |conn: &mut PgConnection| -> DateTime<Utc> {
        diesel::select(diesel::dsl::sql::<Timestamptz>(
            "(SELECT last_seen FROM task_engine_declarations WHERE scope = 'billing' AND generation = 1)",
        ))
        .get_result(conn)
        .unwrap()
    };
    let at_start = old_seen(&mut conn);
    wait_until("the old instance's cron part has renewed its declarations", || old_seen(&mut conn) > at_start);
    assert_eq!(cron_of(&mut conn), "0 3 1 1 *", "the older instance's renewal undid the newer declaration");

    // The new version is rolled back: once none of its instances has run for a
    // minute, the old declaration is applied again, its ticks dealt with kept.
    a.shutdown();
    newest_set_stopped(&mut conn);
    wait_until("the old declaration is applied again", || cron_of(&mut conn) == "0 2 1 1 *");
    assert_eq!(stored(&mut conn, "report").unwrap().last_tick, last_tick);
    b.shutdown();
}

#[test]
fn a_schedule_removed_from_the_code_is_removed_and_one_added_by_hand_never_is() {
    let db = TestDatabase::new();
    let mut conn = db.connect();
    let cleanup = Schedule::new("cleanup", "0 4 * * *", &::tasks::Noop {}).unwrap();
    let by_hand = Schedule::new("by-hand", "0 5 * * *", &::tasks::Noop {}).unwrap();
    add_schedule(&mut conn, &by_hand).unwrap();
    // v1 also declares `by-hand`, which the hand-added schedule keeps.
    let v1 = billing(&[&report("0 2 * * *"), &cleanup, &Schedule { cron: "0 6 * * *".into(), ..by_hand.clone() }]);
    let v2 = billing(&[&report("0 2 * * *")]);
    let start =
        |name: &str, declared: &Declarations| runner(&db, name, 1).declarations(declared.clone()).start().unwrap();
    let origins = |conn: &mut PgConnection| -> Vec<(String, Option<String>, String)> {
        list_schedules(conn).unwrap().into_iter().map(|s| (s.schedule.name, s.declared_in, s.schedule.cron)).collect()
    };
    let declared = |name: &str, cron: &str| (name.to_owned(), Some("billing".to_owned()), cron.to_owned());
    let hand = (by_hand.name.clone(), None, by_hand.cron.clone());

    let one = start("v1", &v1);
    assert_eq!(origins(&mut conn), [hand.clone(), declared("cleanup", "0 4 * * *"), declared("report", "0 2 * * *")]);
    let two = start("v2", &v2);
    assert_eq!(origins(&mut conn), [hand.clone(), declared("report", "0 2 * * *")], "cleanup was not removed");
    one.shutdown();
    let one = start("v1", &v1);
    assert_eq!(origins(&mut conn), [hand.clone(), declared("report", "0 2 * * *")], "an older start put cleanup back");

    // A declared schedule is changed in its code, not by hand; removed by hand, it comes
    // back at the next start of the newest code.
    let error = add_schedule(&mut conn, &report("0 9 * * *")).unwrap_err();
    assert!(matches!(error, task_engine::Error::InvalidValue(_)), "{error}");
    assert!(error.to_string().contains("declared in code (by the crate billing)"), "{error}");
    assert!(task_engine::remove_schedule(&mut conn, "report").unwrap());
    two.shutdown();
    let two = start("v2", &v2);
    assert_eq!(origins(&mut conn), [hand, declared("report", "0 2 * * *")]);
    one.shutdown();
    two.shutdown();
}
