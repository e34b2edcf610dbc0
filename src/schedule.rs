//! Recurring tasks: a schedule enqueues a task at each tick of a cron expression, in a
//! time zone. Schedules live in the database (`task_engine_schedules`): declared with
//! the code ([`crate::register_schedule!`], applied by `crate::declared`), added from
//! code ([`crate::Runner::schedule`], [`add_schedule`]), from the command line (`engine
//! cron add`) or by SQL, and fired by whichever instances run. Each tick is enqueued once:
//! the instance that enqueues it moves the schedule's `last_tick` in the same
//! transaction, under the schedule's row lock ([`fire_due`]).

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use diesel::{Connection, PgConnection};

use crate::db::insert::{self, TaskInsert};
use crate::db::schedules::{self, ScheduleRow, Upserted};
use crate::error::Error;
use crate::registry::Registry;
use crate::task::Task;

/// The latest a tick is enqueued and still on time: a minute after it, or its next
/// tick if that comes sooner. Later, it is missed, and the schedule's catch-up says
/// whether it is enqueued.
const ON_TIME: Duration = Duration::from_secs(60);

/// The most ticks one firing walks from the last tick dealt with; past that (a schedule
/// of every second, down for more than a day), the walk restarts an hour before now.
const MAX_WALK: usize = 100_000;

/// A recurring task: at each tick of `cron` (5 fields, or 6 with seconds first) in
/// `time_zone`, a task of `task_type` with `parameters`.
///
/// ```no_run
/// # use task_engine::{Schedule, Task, TaskContext, TaskError};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Report { kind: String }
/// # impl Task for Report { const NAME: &'static str = "report"; type Output = ();
/// #     fn run(&self, _: &TaskContext) -> Result<(), TaskError> { Ok(()) } }
/// # fn f(registry: task_engine::Registry) -> Result<(), task_engine::Error> {
/// let nightly = Schedule::new("nightly-report", "0 2 * * *", &Report { kind: "daily".into() })?
///     .time_zone("Europe/Paris")?
///     .catch_up(3);
/// let engine = task_engine::Runner::new("postgres://localhost/app", registry).schedule(nightly).start()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    /// An IANA time zone name (`UTC`, `Europe/Paris`).
    pub time_zone: String,
    pub task_type: String,
    pub parameters: serde_json::Value,
    pub queue: String,
    pub priority: i32,
    pub max_attempts: i32,
    /// How many of the ticks missed while no instance ran are enqueued when one comes
    /// back (the most recent); 0 (the default) skips them.
    pub catch_up: u32,
}

/// A schedule as stored, with its last tick dealt with and its next one.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleState {
    pub schedule: Schedule,
    /// The last tick enqueued or skipped; `None` before the first.
    pub last_tick: Option<DateTime<Utc>>,
    /// The next tick after now.
    pub next_tick: Option<DateTime<Utc>>,
    /// Why it does not fire: its expression or time zone (written by SQL) does not
    /// parse.
    pub error: Option<String>,
    /// The crate that declares it with [`crate::register_schedule!`]; `None`: added by
    /// hand (`engine cron add`, [`add_schedule`], [`crate::Runner::schedule`], SQL).
    pub declared_in: Option<String>,
}

impl Schedule {
    /// A schedule of a typed task, in UTC, with the type's queue and attempts.
    pub fn new<T: Task>(name: impl Into<String>, cron: impl Into<String>, task: &T) -> Result<Self, Error> {
        let parameters =
            serde_json::to_value(task).map_err(|source| Error::Serialization { task_type: T::NAME, source })?;
        Self::unchecked(name.into(), cron.into(), T::NAME, parameters, T::QUEUE, T::MAX_ATTEMPTS)
    }

    /// A schedule of a task given by type name and JSON parameters, checked against the
    /// registry.
    pub fn from_json(
        registry: &Registry,
        name: impl Into<String>,
        cron: impl Into<String>,
        task_type: &str,
        parameters: serde_json::Value,
    ) -> Result<Self, Error> {
        let entry = registry.check(task_type, &parameters)?;
        Self::unchecked(name.into(), cron.into(), entry.name(), parameters, entry.queue(), entry.max_attempts())
    }

    fn unchecked(
        name: String,
        cron: String,
        task_type: &str,
        parameters: serde_json::Value,
        queue: &str,
        max_attempts: i32,
    ) -> Result<Self, Error> {
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(Error::InvalidValue(format!(
                "a schedule's name must be 1 to 200 bytes without control characters, not {name:?}"
            )));
        }
        parse_cron(&cron)?;
        Ok(Self {
            name,
            cron,
            time_zone: "UTC".into(),
            task_type: task_type.to_owned(),
            parameters,
            queue: queue.to_owned(),
            priority: 0,
            max_attempts: max_attempts.max(1),
            catch_up: 0,
        })
    }

    /// Reads the cron expression in this time zone (an IANA name) instead of UTC.
    pub fn time_zone(mut self, time_zone: &str) -> Result<Self, Error> {
        parse_time_zone(time_zone)?;
        self.time_zone = time_zone.to_owned();
        Ok(self)
    }

    /// Enqueues up to `ticks` missed ticks (the most recent) when an instance comes back
    /// after none ran (default 0: they are skipped).
    pub fn catch_up(mut self, ticks: u32) -> Self {
        self.catch_up = ticks;
        self
    }

    /// Puts its tasks in `queue` instead of their type's.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Gives its tasks this priority (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Gives its tasks this many attempts (default: their type's; at least 1).
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Refuses a cron expression or time zone that does not parse (the fields are
    /// public: a schedule may not come from the constructors).
    pub(crate) fn check(&self) -> Result<(), Error> {
        parse_cron(&self.cron)?;
        parse_time_zone(&self.time_zone)?;
        Ok(())
    }

    pub(crate) fn row(&self) -> ScheduleRow {
        ScheduleRow {
            name: self.name.clone(),
            cron: self.cron.clone(),
            time_zone: self.time_zone.clone(),
            task_class: self.task_type.clone(),
            task_parameters: self.parameters.clone(),
            queue: self.queue.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            catch_up: i32::try_from(self.catch_up).unwrap_or(i32::MAX),
            last_tick: None,
            created_at: Utc::now(),
            declared_in: None,
        }
    }

    pub(crate) fn of(row: ScheduleRow) -> Self {
        Self {
            name: row.name,
            cron: row.cron,
            time_zone: row.time_zone,
            task_type: row.task_class,
            parameters: row.task_parameters,
            queue: row.queue,
            priority: row.priority,
            max_attempts: row.max_attempts,
            catch_up: u32::try_from(row.catch_up).unwrap_or(0),
        }
    }
}

fn parse_cron(cron: &str) -> Result<Cron, Error> {
    Cron::new(cron)
        .with_seconds_optional()
        .parse()
        .map_err(|e| Error::InvalidValue(format!("the cron expression {cron:?} is not valid: {e}")))
}

fn parse_time_zone(time_zone: &str) -> Result<Tz, Error> {
    Tz::from_str(time_zone)
        .map_err(|_| Error::InvalidValue(format!("unknown time zone {time_zone:?} (an IANA name: UTC, Europe/Paris)")))
}

/// Adds a schedule, or replaces the one of that name (the ticks it already dealt with
/// stay dealt with). Returns whether it was new. Refuses to change a schedule declared
/// in code ([`crate::register_schedule!`]): its code says what it is
/// ([`Error::InvalidValue`], nothing written).
pub fn add_schedule(conn: &mut PgConnection, schedule: &Schedule) -> Result<bool, Error> {
    schedule.check()?;
    match schedules::upsert(conn, &schedule.row())? {
        Upserted::Added => Ok(true),
        Upserted::Changed => Ok(false),
        Upserted::Declared(scope) => Err(Error::InvalidValue(format!(
            "the schedule {:?} is declared in code (by the crate {scope}): change it there",
            schedule.name
        ))),
    }
}

/// Removes a schedule (the tasks it enqueued stay). Returns whether there was one.
pub fn remove_schedule(conn: &mut PgConnection, name: &str) -> Result<bool, Error> {
    Ok(schedules::remove(conn, name)?)
}

/// Every schedule, by name, with its last and next tick.
pub fn list_schedules(conn: &mut PgConnection) -> Result<Vec<ScheduleState>, Error> {
    let now = schedules::now(conn)?;
    schedules::list(conn)?
        .into_iter()
        .map(|row| {
            let (next_tick, error) = match Ticks::of(&row) {
                Ok(ticks) => (ticks.after(now), None),
                Err(error) => (None, Some(error.to_string())),
            };
            Ok(ScheduleState {
                last_tick: row.last_tick,
                next_tick,
                error,
                declared_in: row.declared_in.clone(),
                schedule: Schedule::of(row),
            })
        })
        .collect()
}

/// A schedule's ticks.
pub(crate) struct Ticks {
    cron: Cron,
    time_zone: Tz,
}

impl Ticks {
    pub(crate) fn of(row: &ScheduleRow) -> Result<Self, Error> {
        Ok(Self { cron: parse_cron(&row.cron)?, time_zone: parse_time_zone(&row.time_zone)? })
    }

    /// The first tick after `time`.
    pub(crate) fn after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = time.with_timezone(&self.time_zone);
        self.cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }
}

/// What a firing does: the ticks to enqueue, oldest first, and the last tick dealt with.
#[derive(Debug, PartialEq)]
pub(crate) struct Plan {
    pub enqueue: Vec<DateTime<Utc>>,
    pub last_tick: Option<DateTime<Utc>>,
    /// Ticks missed and skipped.
    pub skipped: usize,
}

/// The ticks after `after` up to `now`: each on time (before its next tick, and within
/// a minute) is enqueued; of the missed ones, the most recent `catch_up`.
pub(crate) fn plan(ticks: &Ticks, mut after: DateTime<Utc>, now: DateTime<Utc>, catch_up: usize) -> Plan {
    let on_time = TimeDelta::from_std(ON_TIME).expect("a minute");
    let (mut enqueue, mut missed, mut skipped, mut last_tick) = (Vec::new(), VecDeque::new(), 0, None);
    let mut walked = 0;
    let mut tick = ticks.after(after);
    while let Some(t) = tick.filter(|t| *t <= now) {
        walked += 1;
        if walked > MAX_WALK && after < now - TimeDelta::hours(1) {
            // Far behind: what is more than an hour old is missed in any case.
            log::warn!("a schedule is more than {MAX_WALK} ticks behind: ticks older than an hour are skipped");
            after = now - TimeDelta::hours(1);
            // Everything walked so far is older than that: skipped, whatever the catch-up.
            skipped += missed.len();
            missed.clear();
            walked = 0;
            tick = ticks.after(after);
            continue;
        }
        let next = ticks.after(t);
        let window = next.map_or(on_time, |n| (n - t).min(on_time));
        if now - t < window {
            enqueue.push(t);
        } else {
            missed.push_back(t);
            if missed.len() > catch_up {
                missed.pop_front();
                skipped += 1;
            }
        }
        last_tick = Some(t);
        tick = next;
    }
    let mut all: Vec<DateTime<Utc>> = missed.into();
    all.append(&mut enqueue);
    Plan { enqueue: all, last_tick, skipped }
}

/// Fires every schedule due at `now` (the server's clock): for each, in its own
/// transaction, locks its row, enqueues its ticks due since its last (each task due at
/// its tick), and moves its `last_tick`. A schedule another instance fires at the same
/// time waits for the lock and then finds nothing due. A schedule whose tasks cannot be
/// inserted (a row written by SQL with a queue the table refuses, say) is logged and
/// left, and the others fire. Returns the tasks enqueued.
pub fn fire_due(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<usize, Error> {
    let mut enqueued = 0;
    for row in schedules::list(conn)? {
        let due = Ticks::of(&row).ok().and_then(|t| t.after(row.last_tick.unwrap_or(row.created_at)));
        if !matches!(due, Some(due) if due <= now) {
            continue;
        }
        match conn.transaction(|conn| fire(conn, &row.name, now)) {
            Ok(n) => enqueued += n,
            Err(error) => {
                log::error!("schedule {}: its tick could not be enqueued ({error}); the others fire", row.name)
            }
        }
    }
    Ok(enqueued)
}

/// Fires one schedule, in the caller's transaction.
fn fire(conn: &mut PgConnection, name: &str, now: DateTime<Utc>) -> Result<usize, Error> {
    let Some(row) = schedules::lock(conn, name)? else { return Ok(0) };
    let ticks = match Ticks::of(&row) {
        Ok(ticks) => ticks,
        Err(error) => {
            log::error!("schedule {name}: {error}; it does not fire");
            return Ok(0);
        }
    };
    let plan = plan(&ticks, row.last_tick.unwrap_or(row.created_at), now, usize::try_from(row.catch_up).unwrap_or(0));
    let Some(last_tick) = plan.last_tick else { return Ok(0) };
    if plan.skipped > 0 {
        log::warn!("schedule {name}: {} missed tick(s) skipped (catch-up {})", plan.skipped, row.catch_up);
    }
    let inserts: Vec<TaskInsert<'_>> = plan
        .enqueue
        .iter()
        .map(|tick| TaskInsert {
            task_type: &row.task_class,
            parameters: &row.task_parameters,
            priority: row.priority,
            run_at: Some(*tick),
            delay_us: 0,
            max_attempts: row.max_attempts,
            queue: &row.queue,
            key: "",
            unique_key: None,
            unique_scope: "waiting",
            timeout_ms: None,
        })
        .collect();
    if !inserts.is_empty() {
        insert::insert_tasks(conn, &inserts)?;
    }
    schedules::record_tick(conn, name, last_tick)?;
    Ok(inserts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn ticks(cron: &str, time_zone: &str) -> Ticks {
        Ticks { cron: parse_cron(cron).unwrap(), time_zone: parse_time_zone(time_zone).unwrap() }
    }

    #[test]
    fn a_tick_on_time_is_enqueued_and_missed_ticks_follow_the_catch_up() {
        let minutely = ticks("0 * * * * *", "UTC");
        let last = at("2026-11-30T10:00:00Z");
        // 20 s after 10:05: 10:05 is on time, 10:01 to 10:04 were missed.
        let now = at("2026-11-30T10:05:20Z");
        let skip = plan(&minutely, last, now, 0);
        assert_eq!(
            (skip.enqueue, skip.last_tick, skip.skipped),
            (vec![at("2026-11-30T10:05:00Z")], Some(at("2026-11-30T10:05:00Z")), 4)
        );
        let two = plan(&minutely, last, now, 2);
        let expected = ["10:03", "10:04", "10:05"].map(|m| at(&format!("2026-11-30T{m}:00Z")));
        assert_eq!((two.enqueue, two.skipped), (expected.to_vec(), 2));
        // Nothing due: nothing moves.
        assert_eq!(plan(&minutely, at("2026-11-30T10:05:00Z"), now, 5).last_tick, None);
        // A tick seen more than a minute late is missed, even before the next.
        let hourly = ticks("0 0 * * * *", "UTC");
        let late = plan(&hourly, at("2026-11-30T10:00:00Z"), at("2026-11-30T11:01:30Z"), 0);
        assert_eq!((late.enqueue.len(), late.last_tick, late.skipped), (0, Some(at("2026-11-30T11:00:00Z")), 1));
        let in_time = plan(&hourly, at("2026-11-30T10:00:00Z"), at("2026-11-30T11:00:50Z"), 0);
        assert_eq!(in_time.enqueue, [at("2026-11-30T11:00:00Z")]);
    }

    #[test]
    fn a_schedule_of_every_second_down_for_two_days_catches_up_its_latest_ticks_without_walking_them_all() {
        let every_second = ticks("* * * * * *", "UTC");
        let now = at("2026-11-30T10:00:00.500Z");
        let plan = plan(&every_second, at("2026-11-28T10:00:00Z"), now, 3);
        let expected = ["09:59:57", "09:59:58", "09:59:59", "10:00:00"].map(|t| at(&format!("2026-11-30T{t}Z")));
        assert_eq!((plan.enqueue, plan.last_tick), (expected.to_vec(), Some(at("2026-11-30T10:00:00Z"))));
        assert!(plan.skipped > MAX_WALK, "{}", plan.skipped);
    }

    #[test]
    fn ticks_follow_the_time_zone_across_a_change_of_daylight_saving_time() {
        let paris_2am = ticks("0 2 * * *", "Europe/Paris");
        // Winter: 02:00 in Paris is 01:00 UTC; summer: 00:00 UTC.
        assert_eq!(paris_2am.after(at("2026-01-10T12:00:00Z")), Some(at("2026-01-11T01:00:00Z")));
        assert_eq!(paris_2am.after(at("2026-07-10T12:00:00Z")), Some(at("2026-07-11T00:00:00Z")));
    }

    #[test]
    fn a_bad_cron_expression_or_time_zone_is_refused_with_what_it_was() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("*/5 * * * * *").is_ok(), "six fields: seconds first");
        let error = parse_cron("every five minutes").unwrap_err().to_string();
        assert!(error.contains("\"every five minutes\" is not valid"), "{error}");
        let error = parse_time_zone("Mars/Olympus").unwrap_err().to_string();
        assert!(error.contains("unknown time zone \"Mars/Olympus\""), "{error}");
    }
}
