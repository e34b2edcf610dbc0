//! Schedules declared with the code: [`register_schedule!`](crate::register_schedule)
//! next to a task type, collected into [`Declarations`], applied by every instance at its
//! start ([`apply_at_start`]) and kept by its cron part ([`Renewal`]).
//!
//! The rule, for a rolling deploy that runs two versions of one declaration: the
//! declarations of one crate (its scope) form a set, known by a hash of what they
//! declare. The sets of a scope are numbered in the order instances first recorded them
//! (generations): the newest is the one recorded last. Every running instance renews
//! its sets every few seconds; of a scope's sets renewed within [`LIVE`], only the newest
//! is applied: its schedules are added or changed, and the scope's declared schedules it
//! lacks are removed. So an older binary that starts late beside a newer one applies
//! nothing, and a binary whose declarations were seen before is applied again only once
//! no instance of a newer set has run for [`LIVE`] (a rollback). Schedules added by hand
//! are never changed or removed by declarations.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};

use crate::db::schedules::{self, ScheduleRow, SetStanding};
use crate::error::Error;
use crate::registry::Registry;
use crate::schedule::Schedule;

/// How long a set counts as running after an instance last renewed it.
pub(crate) const LIVE: Duration = Duration::from_secs(60);

/// How often the cron part renews its sets (and applies them if a newer set has stopped
/// running).
pub(crate) const RENEW_EVERY: Duration = Duration::from_secs(5);

/// One [`register_schedule!`](crate::register_schedule), type-erased: what `inventory`
/// collects.
pub struct ScheduleDeclaration {
    module: &'static str,
    declare: fn() -> Result<Option<Schedule>, Error>,
}

inventory::collect!(ScheduleDeclaration);

impl ScheduleDeclaration {
    /// A declaration made in `module`; [`register_schedule!`](crate::register_schedule)
    /// calls it.
    #[doc(hidden)]
    pub const fn new(module: &'static str, declare: fn() -> Result<Option<Schedule>, Error>) -> Self {
        Self { module, declare }
    }
}

/// Declares a recurring task with the code: every instance of a binary that links it
/// applies it at its start (`engine run`, or [`crate::Runner`] of one's own), and every
/// instance's cron part fires it, each tick once. The argument is a [`Schedule`] (its
/// builder's `?` may be used); with `if CONDITION =>` before it, the schedule is declared
/// only when the condition holds when the instance starts.
///
/// ```no_run
/// # use task_engine::{register_schedule, register_task, Schedule, Task, TaskContext, TaskError};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Report { kind: String }
/// # impl Task for Report { const NAME: &'static str = "report"; type Output = ();
/// #     fn run(&self, _: &TaskContext) -> Result<(), TaskError> { Ok(()) } }
/// register_task!(Report);
/// register_schedule!(Schedule::new("nightly-report", "0 2 * * *", &Report { kind: "daily".into() })?
///     .time_zone("Europe/Paris")?
///     .catch_up(3));
/// ```
///
/// The declarations of a crate are one set: see [`Declarations`] for what a deploy does
/// with them.
#[macro_export]
macro_rules! register_schedule {
    (if $condition:expr => $schedule:expr) => {
        $crate::__inventory::submit! {
            {
                fn declare() -> ::core::result::Result<::core::option::Option<$crate::Schedule>, $crate::Error> {
                    ::core::result::Result::Ok(if $condition {
                        ::core::option::Option::Some($schedule)
                    } else {
                        ::core::option::Option::None
                    })
                }
                $crate::ScheduleDeclaration::new(module_path!(), declare)
            }
        }
    };
    ($schedule:expr) => {
        $crate::register_schedule!(if true => $schedule);
    };
}

/// The schedules an instance declares, by scope (the crate that declares them).
///
/// A scope's declarations are applied as a whole: the instance that applies them adds
/// or changes each of its schedules, and removes the ones the scope declared before and
/// no longer does. Of the different sets of a scope that running instances declare (a
/// rolling deploy), only the one first recorded last is applied. A schedule added by hand
/// (`engine cron add`, [`crate::add_schedule`]) keeps its name: a declaration of that
/// name is not applied (and says so in the log).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Declarations {
    /// Each scope's schedules, by name.
    scopes: BTreeMap<String, BTreeMap<String, Schedule>>,
}

impl Declarations {
    /// Collects every [`register_schedule!`](crate::register_schedule) linked into the
    /// binary, each scoped by its crate. Refuses a declaration that fails, two
    /// declarations of one name, and a schedule of a task type that no
    /// [`register_task!`](crate::register_task) registers or whose parameters do not fit
    /// it.
    pub fn from_inventory() -> Result<Self, Error> {
        let registry = Registry::from_inventory()?;
        let mut declarations = Self::default();
        for entry in inventory::iter::<ScheduleDeclaration> {
            let scope = entry.module.split("::").next().unwrap_or(entry.module);
            // A crate whose declarations are all off still has a set: the empty one.
            declarations.scopes.entry(scope.to_owned()).or_default();
            let Some(schedule) = (entry.declare)()? else { continue };
            registry.check(&schedule.task_type, &schedule.parameters).map_err(|error| {
                Error::Config(format!("the schedule {:?} declared in {}: {error}", schedule.name, entry.module))
            })?;
            declarations.declare(scope, schedule)?;
        }
        Ok(declarations)
    }

    /// Declares `schedule` in `scope`, as [`register_schedule!`](crate::register_schedule)
    /// does in its crate: for a program that declares its schedules without `inventory`
    /// (see [`crate::Runner::declarations`]). Refuses a name already declared, and an
    /// expression or time zone that does not parse.
    pub fn declare(&mut self, scope: impl Into<String>, schedule: Schedule) -> Result<(), Error> {
        let scope = scope.into();
        if scope.is_empty() || scope.len() > 200 || scope.chars().any(char::is_control) {
            return Err(Error::Config(format!(
                "a declarations' scope must be 1 to 200 bytes without control characters, not {scope:?}"
            )));
        }
        schedule.check()?;
        if let Some(first) = self.scope_of(&schedule.name) {
            return Err(Error::Config(format!(
                "two schedules are declared as {:?}: in {first} and in {scope}",
                schedule.name
            )));
        }
        self.scopes.entry(scope).or_default().insert(schedule.name.clone(), schedule);
        Ok(())
    }

    /// Returns every declared schedule with its scope, by scope and name.
    pub fn schedules(&self) -> impl Iterator<Item = (&str, &Schedule)> + '_ {
        self.scopes.iter().flat_map(|(scope, schedules)| schedules.values().map(move |s| (scope.as_str(), s)))
    }

    /// Tells whether no scope declares anything, not even an empty set.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    fn scope_of(&self, name: &str) -> Option<&str> {
        self.scopes.iter().find(|(_, schedules)| schedules.contains_key(name)).map(|(scope, _)| scope.as_str())
    }

    /// Each scope with its set's hash and schedules.
    fn sets(&self) -> impl Iterator<Item = (&str, String, Vec<&Schedule>)> + '_ {
        self.scopes.iter().map(|(scope, schedules)| {
            let schedules: Vec<&Schedule> = schedules.values().collect();
            (scope.as_str(), set_hash(&schedules), schedules)
        })
    }
}

/// A hash of what a set declares, stable across builds and platforms (FNV-1a, 64 bits,
/// over each schedule as JSON with sorted keys, by name).
fn set_hash(schedules: &[&Schedule]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for schedule in schedules {
        let line = serde_json::json!({
            "name": schedule.name,
            "cron": schedule.cron,
            "time_zone": schedule.time_zone,
            "task_type": schedule.task_type,
            "parameters": schedule.parameters,
            "queue": schedule.queue,
            "priority": schedule.priority,
            "max_attempts": schedule.max_attempts,
            "catch_up": schedule.catch_up,
        })
        .to_string();
        for byte in line.bytes().chain([b'\n']) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// What an instance does with its set, given where the set stands.
#[derive(Debug, PartialEq)]
enum Turn {
    /// Writes the scope's schedules from it.
    Apply,
    /// Nothing: its schedules are already written from it.
    Current,
    /// Nothing: a newer set of the scope runs.
    Older { generation: i64, newest: i64 },
}

/// At an instance's start, the newest running set is applied even if it was before (a
/// schedule removed by hand comes back); later, only a set that has become the newest
/// (an older one whose newer set stopped running) is.
fn turn(standing: SetStanding, at_start: bool) -> Turn {
    if standing.generation < standing.newest_live {
        Turn::Older { generation: standing.generation, newest: standing.newest_live }
    } else if standing.applied && !at_start {
        Turn::Current
    } else {
        Turn::Apply
    }
}

/// What applying a set writes.
#[derive(Debug, Default, PartialEq)]
struct Plan<'a> {
    added: Vec<&'a Schedule>,
    changed: Vec<&'a Schedule>,
    unchanged: usize,
    /// Declared names another origin holds: (name, the scope that declares it, or `None`
    /// for a schedule added by hand).
    held: Vec<(String, Option<String>)>,
    /// The scope's declared schedules the set no longer declares.
    removed: Vec<String>,
}

/// Compares a set with the stored schedules of its scope and of its names.
fn plan<'a>(scope: &str, declared: &[&'a Schedule], stored: &[ScheduleRow]) -> Plan<'a> {
    let mut plan = Plan::default();
    for schedule in declared {
        match stored.iter().find(|row| row.name == schedule.name) {
            None => plan.added.push(schedule),
            Some(row) if row.declared_in.as_deref() != Some(scope) => {
                plan.held.push((row.name.clone(), row.declared_in.clone()));
            }
            Some(row) if Schedule::of(row.clone()) == **schedule => plan.unchanged += 1,
            Some(_) => plan.changed.push(schedule),
        }
    }
    plan.removed = stored
        .iter()
        .filter(|row| row.declared_in.as_deref() == Some(scope) && !declared.iter().any(|s| s.name == row.name))
        .map(|row| row.name.clone())
        .collect();
    plan
}

/// Applies the newest running set of each of `declarations`' scopes that this instance
/// declares, at its start; a scope whose set is older is left as it is (and logged).
pub(crate) fn apply_at_start(conn: &mut PgConnection, declarations: &Declarations) -> Result<(), Error> {
    for (scope, hash, schedules) in declarations.sets() {
        apply(conn, scope, &hash, &schedules, true)?;
    }
    Ok(())
}

/// Records the set and writes the scope's schedules from it if its turn says so, in one
/// transaction; says what it did once that has committed.
fn apply(
    conn: &mut PgConnection,
    scope: &str,
    hash: &str,
    declared: &[&Schedule],
    at_start: bool,
) -> Result<(), Error> {
    let (standing, turn, plan) = conn.transaction(|conn| {
        let standing = schedules::record_set(conn, scope, hash, LIVE)?;
        let turn = turn(standing, at_start);
        if turn != Turn::Apply {
            return Ok::<_, Error>((standing, turn, None));
        }
        let names: Vec<&str> = declared.iter().map(|s| s.name.as_str()).collect();
        let stored = schedules::lock_declared(conn, scope, &names)?;
        let plan = plan(scope, declared, &stored);
        write(conn, scope, &plan)?;
        schedules::mark_applied(conn, scope, hash)?;
        Ok((standing, turn, Some(plan)))
    })?;
    match (turn, plan) {
        (Turn::Older { generation, newest }, _) if at_start => log::info!(
            "schedules declared in {scope}: this binary's declarations (set {hash}, generation {generation}) are \
             older than generation {newest}, which an instance running now declares: they are not applied"
        ),
        (_, Some(plan)) => report(scope, hash, standing.generation, &plan, at_start),
        _ => {}
    }
    Ok(())
}

fn write(conn: &mut PgConnection, scope: &str, plan: &Plan<'_>) -> Result<(), Error> {
    for schedule in plan.added.iter().chain(&plan.changed) {
        schedules::upsert_declared(conn, &schedule.row(), scope)?;
    }
    let removed: Vec<&str> = plan.removed.iter().map(String::as_str).collect();
    schedules::remove_declared(conn, scope, &removed)?;
    Ok(())
}

fn report(scope: &str, hash: &str, generation: i64, plan: &Plan<'_>, at_start: bool) {
    let names = |schedules: &[&Schedule]| schedules.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    let set = format!("set {hash}, generation {generation}");
    if plan.added.is_empty() && plan.changed.is_empty() && plan.removed.is_empty() {
        log::info!("schedules declared in {scope}: {} unchanged ({set})", plan.unchanged);
        return report_held(scope, &plan.held);
    }
    let why = if at_start { "" } else { "; the instances of a newer set have stopped" };
    log::info!(
        "schedules declared in {scope}: added [{}], changed [{}], removed [{}], {} unchanged ({set}{why})",
        names(&plan.added),
        names(&plan.changed),
        plan.removed.join(", "),
        plan.unchanged,
    );
    report_held(scope, &plan.held);
}

/// Warns of each declaration not applied because another origin holds its name.
fn report_held(scope: &str, held: &[(String, Option<String>)]) {
    for (name, holder) in held {
        match holder {
            None => log::warn!(
                "schedule {name}: declared in {scope}, but a schedule of that name was added by hand (engine cron \
                 add); it stays as it is: remove it (engine cron remove {name}) for the declaration to take its place \
                 at the next start"
            ),
            Some(other) => {
                log::warn!("schedule {name}: declared in {scope} and in {other}; the one of {other} stays")
            }
        }
    }
}

/// The cron part's side of the declarations: renews the instance's sets every
/// [`RENEW_EVERY`], and applies a set that has become the newest running one.
pub(crate) struct Renewal {
    declarations: Declarations,
    last: Instant,
}

impl Renewal {
    /// Starts renewing after the start's application.
    pub(crate) fn new(declarations: Declarations) -> Self {
        Self { declarations, last: Instant::now() }
    }

    /// Renews the sets if it is time (a failure waits for the next time).
    pub(crate) fn renew_if_due(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        if self.declarations.is_empty() || self.last.elapsed() < RENEW_EVERY {
            return Ok(());
        }
        self.last = Instant::now();
        for (scope, hash, schedules) in self.declarations.sets() {
            // The common case, one statement and no table lock: the set is known and
            // either applied or older than another running one.
            match schedules::renew_set(conn, scope, &hash, LIVE)? {
                Some(standing) if turn(standing, false) != Turn::Apply => {}
                _ => apply(conn, scope, &hash, &schedules, false)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::context::TaskContext;
    use crate::task::{Task, TaskError};

    #[derive(Serialize, Deserialize)]
    struct Digest {
        kind: String,
    }
    impl Task for Digest {
        const NAME: &'static str = "declared-test-digest";
        type Output = ();
        fn run(&self, _: &TaskContext) -> Result<(), TaskError> {
            Ok(())
        }
    }
    fn digest(name: &str, cron: &str) -> Schedule {
        Schedule::new(name, cron, &Digest { kind: "daily".into() }).unwrap()
    }

    fn stored(schedule: &Schedule, declared_in: Option<&str>) -> ScheduleRow {
        ScheduleRow { declared_in: declared_in.map(str::to_owned), last_tick: Some(Utc::now()), ..schedule.row() }
    }

    #[test]
    fn a_name_declared_twice_or_a_bad_expression_is_refused_with_what_it_was() {
        let mut declarations = Declarations::default();
        declarations.declare("billing", digest("nightly", "0 2 * * *")).unwrap();
        let error = declarations.declare("reports", digest("nightly", "0 3 * * *")).unwrap_err().to_string();
        assert_eq!(error, "two schedules are declared as \"nightly\": in billing and in reports");
        let mut bad = digest("bad", "0 2 * * *");
        bad.cron = "every night".into();
        let error = declarations.declare("billing", bad).unwrap_err().to_string();
        assert!(error.contains("\"every night\" is not valid"), "{error}");
    }

    #[test]
    fn a_sets_hash_follows_what_it_declares_and_nothing_else() {
        let (a, b) = (digest("a", "0 2 * * *"), digest("b", "0 3 * * *"));
        assert_eq!(set_hash(&[&a, &b]), set_hash(&[&a.clone(), &b.clone()]));
        assert_ne!(set_hash(&[&a, &b]), set_hash(&[&a]));
        assert_ne!(set_hash(&[&a]), set_hash(&[&a.clone().catch_up(1)]));
        assert_ne!(set_hash(&[&a]), set_hash(&[&a.clone().max_attempts(2)]));
        // Fixed across builds: a stored hash must keep meaning the same set.
        assert_eq!(set_hash(&[]), "cbf29ce484222325");
    }

    #[test]
    fn only_the_newest_running_set_applies_and_later_only_once() {
        let standing = |generation, newest_live, applied| SetStanding { generation, newest_live, applied };
        assert_eq!(turn(standing(1, 2, false), true), Turn::Older { generation: 1, newest: 2 });
        assert_eq!(turn(standing(1, 2, true), false), Turn::Older { generation: 1, newest: 2 });
        assert_eq!(turn(standing(2, 2, true), true), Turn::Apply, "a start applies its set again");
        assert_eq!(turn(standing(2, 2, true), false), Turn::Current);
        assert_eq!(turn(standing(1, 1, false), false), Turn::Apply, "the newer set stopped running");
    }

    #[test]
    fn a_plan_adds_changes_and_removes_its_scopes_schedules_and_holds_back_before_any_other() {
        let kept = digest("kept", "0 1 * * *");
        let moved = digest("moved", "0 2 * * *");
        let new = digest("new", "0 3 * * *");
        let by_hand = digest("by-hand", "0 4 * * *");
        let elsewhere = digest("elsewhere", "0 5 * * *");
        let gone = digest("gone", "0 6 * * *");
        let stored = [
            stored(&kept, Some("billing")),
            stored(&digest("moved", "0 7 * * *"), Some("billing")),
            stored(&by_hand, None),
            stored(&elsewhere, Some("reports")),
            stored(&gone, Some("billing")),
        ];
        let declared = [&kept, &moved, &new, &by_hand, &elsewhere];
        let plan = plan("billing", &declared, &stored);
        assert_eq!(
            plan,
            Plan {
                added: vec![&new],
                changed: vec![&moved],
                unchanged: 1,
                held: vec![("by-hand".into(), None), ("elsewhere".into(), Some("reports".into()))],
                removed: vec!["gone".into()],
            }
        );
    }
}
