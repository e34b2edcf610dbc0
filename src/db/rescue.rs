//! The rescue of lost attempts in SQL: the running tasks of a previous run of this
//! instance, of dead instances, and this instance's own ghosts, each recorded as a lost
//! attempt and put back to waiting in one statement.

use std::sync::LazyLock;
use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Text};

use crate::db::transitions::{cancel_wins, default_retry_seconds, lets_waiting_key_go, notify_waiting};
use crate::db::{instances, micros};

/// The `worker` of a lost attempt's execution: the worker that ran it is not known.
pub(crate) const NOT_YET_TAKEN: i32 = -1;

/// Whose running tasks a rescue takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Those of a previous instance of this name (taken at start, under the name lock).
    PreviousSelf,
    /// Tasks marked running here that no worker here runs, claimed over a lease ago.
    OwnGhosts,
    /// Those of instances whose own lease expired, or that have no row and do not
    /// hold their name.
    Dead,
}

/// The rescue statement for running tasks matching `$lost` (`:default_retry_seconds`
/// stands for the default retry delay, filled in by [`statements`]); its parameters: $1 this
/// instance, $2 its lease in microseconds, $3 the tasks in flight here, $4 why, $5 the
/// first key of the name locks, $6 the worker a lost attempt is recorded with (which
/// worker ran it died with its instance).
macro_rules! rescue_statement {
    ($lost:literal) => {
        concat!(
            "WITH lost AS (
                 SELECT t.id, t.attempts, t.instance, t.updated_at FROM tasks t
                 WHERE t.status = 'running' AND ",
            $lost,
            "
                 FOR UPDATE OF t SKIP LOCKED
             ), closed AS (
                 -- Versions before migration 12 opened the execution at the claim.
                 UPDATE task_executions e
                 SET stopped_at = now(), updated_at = now(),
                     error = format('lost: %s (instance %s, attempt %s)', $4::text, e.instance, e.attempt)
                 FROM lost
                 WHERE e.task_id = ANY(ARRAY(SELECT id FROM lost)) AND e.task_id = lost.id
                   AND e.attempt = lost.attempts AND e.stopped_at IS NULL
                 RETURNING e.task_id
             ), recorded AS (
                 -- A running task's `updated_at` is its attempt's start (the claim).
                 INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, error, instance, worker)
                 SELECT l.id, l.attempts, l.updated_at, now(),
                        format('lost: %s (instance %s, attempt %s)', $4::text, l.instance, l.attempts),
                        l.instance, $6
                 FROM lost l
                 WHERE l.id NOT IN (SELECT task_id FROM closed)
                   -- An attempt whose worker was abandoned past its time limit is recorded.
                   AND NOT EXISTS (SELECT 1 FROM task_executions e WHERE e.task_id = l.id AND e.attempt = l.attempts)
             ), moved AS (
                 UPDATE tasks t
                 SET status = CASE ",
            cancel_wins!(),
            "
                                   WHEN t.attempts >= t.max_attempts THEN 'failed'
                                   ELSE 'waiting' END,
                     -- The default retry delay: a task that takes its instance down
                     -- does not crash-loop the fleet.
                     run_at = now() + :default_retry_seconds
                                      * interval '1 second',
                     ",
            lets_waiting_key_go!(),
            ",
                     updated_at = now()
                 WHERE t.id = ANY(ARRAY(SELECT id FROM lost))
                 RETURNING t.status, t.run_at
             ), notified AS (
                 -- Instances that run these types, not only this one, arm their timers;
                 -- and each rescued task freed a place under its queue's limit, if any.
                 SELECT ",
            notify_waiting!("count(*)", "extract(epoch FROM min(run_at) FILTER (WHERE status = 'waiting') - now())"),
            "
                 FROM moved HAVING count(*) > 0
             )
             SELECT count(*) FILTER (WHERE status = 'waiting') AS waiting,
                    (SELECT count(*) FROM notified) AS notifications
             FROM moved"
        )
    };
}

const RESCUE_PREVIOUS_SELF: &str = rescue_statement!("t.instance = $1");
const RESCUE_OWN_GHOSTS: &str = rescue_statement!(
    "t.instance = $1 AND NOT (t.id = ANY($3)) AND t.updated_at < now() - $2 * interval '1 microsecond'"
);
// An instance with a row is judged by the lease it recorded; one without a row (an
// operator deleted it, or it was paused for ten leases) only if it does not hold its
// name lock either: a live heartbeat holds it, and registers again.
const RESCUE_DEAD: &str = rescue_statement!(
    "t.instance <> $1
     AND NOT EXISTS (
         SELECT FROM task_engine_instances i
         WHERE i.name = t.instance
           AND i.last_seen_at >= now() - coalesce(i.lease, $2 * interval '1 microsecond'))
     AND (EXISTS (SELECT FROM task_engine_instances i WHERE i.name = t.instance)
          OR NOT EXISTS (
              SELECT FROM pg_locks l
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = $5::int4::oid AND l.objid = hashtext(task_engine_channel() || '/' || t.instance)::oid))"
);

/// The rescue statements (of a previous self, of this instance's ghosts, of dead
/// instances), built once with the default retry delay's curve
/// ([`crate::retry::DEFAULT`], the one of [`crate::default_retry_delay`]).
pub(crate) fn statements() -> [(&'static str, &'static str); 3] {
    static STATEMENTS: LazyLock<[String; 3]> = LazyLock::new(|| {
        let retry = default_retry_seconds("t.attempts", "random()");
        [RESCUE_PREVIOUS_SELF, RESCUE_OWN_GHOSTS, RESCUE_DEAD].map(|s| s.replace(":default_retry_seconds", &retry))
    });
    let [previous_self, own_ghosts, dead] = &*STATEMENTS;
    [("rescue of a previous self", previous_self), ("rescue of ghosts", own_ghosts), ("rescue of the dead", dead)]
}

/// Records the lost attempts of the running tasks `lost` names (an execution from the
/// claim to now, with an error saying why and where), and puts their tasks back to waiting, due after the
/// default retry delay of their attempt (or `failed` after their last attempt,
/// `cancelled` if cancelled), in one statement; notifies when the first is due.
/// Locks those task rows, passing over rows another session holds (they are taken at a
/// later pass). `in_flight` are the tasks this instance is running; `lease` is how long
/// a ghost or a silent instance is given. Returns how many tasks wait again.
pub(crate) fn rescue(
    conn: &mut PgConnection,
    lost: Lost,
    instance: &str,
    lease: Duration,
    in_flight: &[i64],
) -> QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Rescued {
        #[diesel(sql_type = BigInt)]
        waiting: i64,
    }
    let [previous_self, own_ghosts, dead] = statements();
    let (statement, why) = match lost {
        Lost::PreviousSelf => (previous_self.1, "its instance restarted"),
        Lost::OwnGhosts => (own_ghosts.1, "its outcome never reached the database"),
        Lost::Dead => (dead.1, "its instance stopped sending heartbeats"),
    };
    let rescued: Rescued = diesel::sql_query(statement)
        .bind::<Text, _>(instance)
        .bind::<BigInt, _>(micros(lease))
        .bind::<Array<BigInt>, _>(in_flight)
        .bind::<Text, _>(why)
        .bind::<Integer, _>(instances::NAME_LOCK)
        .bind::<Integer, _>(NOT_YET_TAKEN)
        .get_result(conn)?;
    Ok(usize::try_from(rescued.waiting).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{Bool, Double, Nullable};

    use super::*;
    use crate::attempt::{Completion, Outcome};
    use crate::db::claim::claim;
    use crate::db::claim::tests::lane;
    use crate::db::completion::{complete, record_timed_out};

    /// A task running on `instance`, with its open execution.
    fn running_on(conn: &mut PgConnection, id: i64, instance: &str) {
        for statement in [
            "INSERT INTO tasks (id, task_class, status, instance, attempts) VALUES ($1, 'noop', 'running', $2, 1)",
            "INSERT INTO task_executions (task_id, attempt, started_at, instance, worker) VALUES ($1, 1, now(), $2, 0)",
        ] {
            diesel::sql_query(statement).bind::<BigInt, _>(id).bind::<Text, _>(instance).execute(conn).unwrap();
        }
    }

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Recorded {
        #[diesel(sql_type = BigInt)]
        task_id: i64,
        #[diesel(sql_type = Integer)]
        attempt: i32,
        /// Started at the claim, a minute ago.
        #[diesel(sql_type = Bool)]
        from_claim: bool,
        #[diesel(sql_type = Nullable<Text>)]
        error: Option<String>,
    }

    fn recorded(conn: &mut PgConnection) -> Vec<Recorded> {
        diesel::sql_query(
            "SELECT task_id, attempt, started_at < now() - interval '59 seconds' AS from_claim, error
             FROM task_executions WHERE stopped_at IS NOT NULL ORDER BY task_id, attempt",
        )
        .load(conn)
        .unwrap()
    }

    /// A lost attempt is recorded once, from its claim to its rescue; an attempt an
    /// older version claimed (it opened the execution at the claim) by closing that one.
    #[test]
    fn a_lost_attempt_is_recorded_once_from_its_claim_to_its_rescue() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (id, task_class, status, instance, attempts, updated_at) VALUES
                 (1, 'noop', 'running', 'gone', 2, now() - interval '1 minute'),
                 (2, 'noop', 'running', 'gone', 1, now() - interval '1 minute');
             INSERT INTO task_executions (task_id, attempt, started_at, stopped_at, instance, worker)
                 VALUES (1, 1, now() - interval '2 minutes', now() - interval '90 seconds', 'gone', 0),
                        (2, 1, now() - interval '1 minute', NULL, 'gone', 0)",
        )
        .unwrap();
        assert_eq!(rescue(&mut conn, Lost::Dead, "judge", Duration::from_secs(1), &[]).unwrap(), 2);
        let lost = |task_id, attempt| Recorded {
            task_id,
            attempt,
            from_claim: true,
            error: Some(format!("lost: its instance stopped sending heartbeats (instance gone, attempt {attempt})")),
        };
        let first = Recorded { task_id: 1, attempt: 1, from_claim: true, error: None };
        assert_eq!(recorded(&mut conn), vec![first, lost(1, 2), lost(2, 1)]);
        let open: Vec<Recorded> = diesel::sql_query(
            "SELECT task_id, attempt, true AS from_claim, error FROM task_executions WHERE stopped_at IS NULL",
        )
        .load(&mut conn)
        .unwrap();
        assert_eq!(open, vec![], "an execution was left open");
    }

    /// The attempt's outcome, arriving after the rescue took its task, writes nothing:
    /// the attempt keeps the one execution the rescue wrote.
    #[test]
    fn an_outcome_after_the_rescue_writes_no_second_execution() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute("INSERT INTO tasks (task_class) VALUES ('noop')").unwrap();
        let task =
            claim(&mut conn, crate::db::connect::Session::Own, &lane("me", &["noop"]), 1).unwrap().tasks.remove(0);
        assert!(recorded(&mut conn).is_empty(), "an execution was written before the attempt ended");
        assert_eq!(rescue(&mut conn, Lost::PreviousSelf, "me", Duration::from_secs(1), &[]).unwrap(), 1);
        let outcome = Completion {
            execution_id: task.execution_id,
            task_id: task.id,
            attempt: task.attempt,
            worker: 0,
            started_at: task.claimed_at,
            stopped_at: task.claimed_at + chrono::TimeDelta::milliseconds(5),
            elapsed: Duration::from_millis(5),
            outcome: Outcome::Succeeded(serde_json::Value::Null),
            frees_a_place: false,
        };
        assert_eq!(complete(&mut conn, crate::db::connect::Session::Own, &[outcome]).unwrap(), 0);
        let errors: Vec<Option<String>> = recorded(&mut conn).into_iter().map(|r| r.error).collect();
        assert_eq!(errors, vec![Some("lost: its instance restarted (instance me, attempt 1)".to_string())]);
    }

    fn status_of(conn: &mut PgConnection, id: i64) -> String {
        crate::db::operator::lock_status(conn, id).unwrap().unwrap()
    }

    #[test]
    fn an_instance_is_judged_dead_by_the_lease_it_recorded_not_by_the_judges() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        running_on(&mut conn, 1, "slow");
        running_on(&mut conn, 2, "gone");
        running_on(&mut conn, 3, "legacy");
        conn.batch_execute(
            "INSERT INTO task_engine_instances (name, host, pid, lease, last_seen_at) VALUES
                 ('slow', 'h', 1, interval '10 seconds', now() - interval '3 seconds'),
                 ('gone', 'h', 2, interval '10 seconds', now() - interval '11 seconds'),
                 ('legacy', 'h', 3, NULL, now() - interval '3 seconds')",
        )
        .unwrap();
        // The judge's own lease is a second: by it, all three would be dead; it judges
        // only the row that records no lease (an older engine's) by it.
        assert_eq!(rescue(&mut conn, Lost::Dead, "judge", Duration::from_secs(1), &[]).unwrap(), 2);
        assert_eq!(status_of(&mut conn, 1), "running", "an instance within its own lease was robbed");
        assert_eq!(status_of(&mut conn, 2), "waiting");
        assert_eq!(status_of(&mut conn, 3), "waiting");
    }

    #[test]
    fn an_instance_without_a_row_is_dead_only_once_it_no_longer_holds_its_name() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        running_on(&mut conn, 1, "rowless");
        let config: postgres::Config = db.url().parse().unwrap();
        let (holder, _) = crate::db::channel::Listening::start(&config, "test", "rowless", None).unwrap();
        assert!(holder.holds_name());
        let lease = Duration::from_secs(1);
        assert_eq!(rescue(&mut conn, Lost::Dead, "judge", lease, &[]).unwrap(), 0, "a live instance was robbed");
        assert_eq!(status_of(&mut conn, 1), "running");
        drop(holder); // its session ends, and the name lock with it (soon: the server notices)
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while rescue(&mut conn, Lost::Dead, "judge", lease, &[]).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "the task of an instance gone without a row stayed running");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(status_of(&mut conn, 1), "waiting");
    }

    #[test]
    fn a_rescued_attempt_waits_like_a_failed_one_before_the_task_runs_again() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        running_on(&mut conn, 1, "crashed");
        running_on(&mut conn, 2, "crashed");
        conn.batch_execute("UPDATE tasks SET attempts = 3 WHERE id = 2").unwrap();
        assert_eq!(rescue(&mut conn, Lost::PreviousSelf, "crashed", Duration::from_secs(1), &[]).unwrap(), 2);
        #[derive(QueryableByName)]
        struct Wait {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = Double)]
            seconds: f64,
        }
        let waits: Vec<Wait> = diesel::sql_query(
            // From the rescue's own time (its `updated_at`): a later `now()` would have the
            // time between the two statements taken off (3.59 s once, for 3.6 at least).
            "SELECT id, extract(epoch FROM run_at - updated_at)::float8 AS seconds FROM tasks ORDER BY id",
        )
        .load(&mut conn)
        .unwrap();
        let seconds: Vec<(i64, f64)> = waits.iter().map(|w| (w.id, w.seconds)).collect();
        // attempt 1: 4 s, attempt 3: 84 s, give or take 10%.
        assert!((3.6..=4.4).contains(&seconds[0].1) && (75.6..=92.4).contains(&seconds[1].1), "{seconds:?}");
    }

    #[test]
    fn a_rescue_keeps_the_record_of_an_attempt_timed_out_and_writes_one_for_an_attempt_lost() {
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        conn.batch_execute(
            "INSERT INTO tasks (id, task_class, status, instance, attempts)
             VALUES (1, 'noop', 'running', 'crashed', 1), (2, 'noop', 'running', 'crashed', 1)",
        )
        .unwrap();
        let timed_out = Completion {
            execution_id: 100,
            task_id: 1,
            attempt: 1,
            worker: 0,
            started_at: Utc::now(),
            stopped_at: Utc::now() + chrono::TimeDelta::seconds(2),
            elapsed: Duration::from_secs(2),
            outcome: Outcome::Failed("timed out".into()),
            frees_a_place: false,
        };
        assert!(record_timed_out(&mut conn, "crashed", &timed_out).unwrap());
        assert!(!record_timed_out(&mut conn, "crashed", &timed_out).unwrap(), "recorded twice");
        // The instance died while the abandoned thread still ran task 1.
        assert_eq!(rescue(&mut conn, Lost::PreviousSelf, "crashed", Duration::from_secs(1), &[]).unwrap(), 2);
        #[derive(QueryableByName, Debug, PartialEq)]
        struct Execution {
            #[diesel(sql_type = BigInt)]
            task_id: i64,
            #[diesel(sql_type = Text)]
            error: String,
        }
        let executions: Vec<Execution> =
            diesel::sql_query("SELECT task_id, left(error, 9) AS error FROM task_executions ORDER BY task_id, id")
                .load(&mut conn)
                .unwrap();
        let expected =
            [(1, "timed out"), (2, "lost: its")].map(|(task_id, error)| Execution { task_id, error: error.into() });
        assert_eq!(executions, expected);
    }
}
