//! Enqueueing from Rust: typed, inside the caller's own transaction when it has one.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use diesel::{Connection, PgConnection};

use crate::db::insert::{self, TaskInsert};
use crate::db::micros;
use crate::db::unique;
use crate::error::Error;
use crate::registry::Registry;
use crate::task::Task;

/// The years of PostgreSQL's `timestamptz` (4713 BC is year -4712).
const FIRST_YEAR: i32 = -4712;
const LAST_YEAR: i32 = 294_276;

/// Where in `value` a string or a key holds a NUL character, as a JSON path.
fn nul_in(value: &serde_json::Value, path: &str) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => Some(path.to_owned()),
        serde_json::Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, item)| nul_in(item, &format!("{path}[{i}]")))
        }
        serde_json::Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let here = format!("{path}.{}", key.escape_debug());
            if key.contains('\0') {
                Some(here)
            } else {
                nul_in(item, &here)
            }
        }),
        _ => None,
    }
}

/// A task about to be inserted, with its scheduling options.
///
/// ```no_run
/// # use task_engine::{NewTask, Task, TaskContext, TaskError};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct SendEmail { to: String }
/// # impl Task for SendEmail { const NAME: &'static str = "send_email"; type Output = ();
/// #     fn run(&self, _: &TaskContext) -> Result<(), TaskError> { Ok(()) } }
/// # fn f(conn: &mut diesel::PgConnection) -> Result<(), task_engine::Error> {
/// use diesel::Connection;
/// conn.transaction(|conn| {
///     // ... the caller's own writes ...
///     NewTask::new(&SendEmail { to: "a@example.com".into() })?.priority(5).insert(conn)
/// })?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NewTask {
    task_type: String,
    parameters: serde_json::Value,
    priority: i32,
    run_at: Option<DateTime<Utc>>,
    delay: Duration,
    max_attempts: i32,
    queue: String,
    key: String,
    unique_key: Option<String>,
    unique_while_running: bool,
    on_conflict: OnConflict,
    timeout: Option<Duration>,
}

/// What inserting a task with a unique key does when another task holds the key
/// ([`NewTask::unique_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// Keeps the task that holds the key, as it is; the insert returns its id.
    #[default]
    Keep,
    /// Makes the holder, if it still waits, the new task: its type, parameters,
    /// priority, queue, key, time limit and due time (a debounce: the task runs once,
    /// with the last parameters, after the last delay). It keeps its id and history.
    Replace,
    /// As [`OnConflict::Replace`], but keeps the holder's due time.
    ReplaceParameters,
}

/// What an insert did ([`NewTask::upsert`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// A new task, with this id.
    Inserted(i64),
    /// The task that holds the key, left as it was: it waits (under [`OnConflict::Keep`])
    /// or runs (a running holder is never changed).
    Kept(i64),
    /// The waiting task that holds the key, made the new task ([`OnConflict::Replace`]).
    Replaced(i64),
}

impl Upserted {
    /// The id of the task inserted, kept or replaced.
    pub fn id(self) -> i64 {
        match self {
            Upserted::Inserted(id) | Upserted::Kept(id) | Upserted::Replaced(id) => id,
        }
    }
}

/// How many times an insert with unique keys tries again when each try finds the
/// holder of a key changed under it (it ended, or started, in between).
const UNIQUE_ROUNDS: usize = 50;

impl NewTask {
    /// Describes a typed task, with its type's defaults.
    pub fn new<T: Task>(task: &T) -> Result<Self, Error> {
        let parameters =
            serde_json::to_value(task).map_err(|source| Error::Serialization { task_type: T::NAME, source })?;
        Ok(Self::unchecked(T::NAME, parameters, T::MAX_ATTEMPTS, T::QUEUE))
    }

    /// Describes a task given by type name and JSON parameters, checked against the
    /// registry: an unknown type or parameters that do not fit are refused.
    pub fn from_json(registry: &Registry, task_type: &str, parameters: serde_json::Value) -> Result<Self, Error> {
        let entry = registry.check(task_type, &parameters)?;
        Ok(Self::unchecked(entry.name(), parameters, entry.max_attempts(), entry.queue()))
    }

    fn unchecked(task_type: &str, parameters: serde_json::Value, max_attempts: i32, queue: &str) -> Self {
        // A type declaring fewer than one attempt still gets one.
        let max_attempts = max_attempts.max(1);
        Self {
            task_type: task_type.to_owned(),
            parameters,
            priority: 0,
            run_at: None,
            delay: Duration::ZERO,
            max_attempts,
            queue: queue.to_owned(),
            key: String::new(),
            unique_key: None,
            unique_while_running: false,
            on_conflict: OnConflict::Keep,
            timeout: None,
        }
    }

    /// Makes the task unique: no other task holds `key` (1 to 1,000 bytes) while it
    /// waits. An insert that finds the key held does what [`Self::on_conflict`] says
    /// (by default, keeps the holder and returns its id). Once the task starts, the key
    /// is free for a new one, unless [`Self::unique_while_running`]. The key is the
    /// task's `unique_key` column.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Holds the unique key while the task runs too, until it ends (succeeded, failed
    /// or cancelled); a retry keeps it.
    pub fn unique_while_running(mut self) -> Self {
        self.unique_while_running = true;
        self
    }

    /// What to do when another task holds the unique key (default: [`OnConflict::Keep`]).
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }

    /// Puts the task in `queue` instead of its type's ([`Task::QUEUE`], by default
    /// `default`): 1 to 200 bytes.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Gives the task a key for fair dispatch within its queue (a tenant, a customer):
    /// keys are served in turn, and a queue's limit per key bounds how many tasks of
    /// one key run at once. Default: none (`""`).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Limits how long each attempt may run, overriding the type's
    /// [`Task::TIMEOUT`]: 1 ms to 24 days (see `docs/timeouts.md`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the priority: higher runs first (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Makes the task wait until `run_at` (default: due at once).
    pub fn run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self.delay = Duration::ZERO;
        self
    }

    /// Makes the task wait `delay` after its insert, measured on the database
    /// server's clock (default: due at once).
    pub fn run_in(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self.run_at = None;
        self
    }

    /// Overrides the type's number of attempts (at least 1).
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Returns the task type's name.
    pub fn task_type(&self) -> &str {
        &self.task_type
    }

    fn as_insert(&self) -> TaskInsert<'_> {
        TaskInsert {
            task_type: &self.task_type,
            parameters: &self.parameters,
            priority: self.priority,
            run_at: self.run_at,
            delay_us: micros(self.delay),
            max_attempts: self.max_attempts,
            queue: &self.queue,
            key: &self.key,
            unique_key: self.unique_key.as_deref(),
            unique_scope: if self.unique_while_running { "running" } else { "waiting" },
            timeout_ms: self.timeout.map(|t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX)),
        }
    }

    /// Checks that the database can store the task: no NUL character in its parameters
    /// (neither `jsonb` nor `text` can hold one), nor in its key, a queue name of 1 to 200
    /// bytes, a due time within PostgreSQL's range.
    /// Inserting calls it first; call it yourself to refuse bad input before anything
    /// else happens.
    pub fn validate(&self) -> Result<(), Error> {
        if self.queue.is_empty() || self.queue.len() > 200 || self.queue.contains('\0') {
            return Err(Error::InvalidValue(format!(
                "the queue of a task of type `{}` must be 1 to 200 bytes without NUL, not {:?}",
                self.task_type, self.queue
            )));
        }
        if let Some(timeout) = self.timeout {
            if timeout < Duration::from_millis(1) || timeout.as_millis() > i32::MAX as u128 {
                return Err(Error::InvalidValue(format!(
                    "the timeout of a task of type `{}` must be 1 ms to 24 days, not {timeout:?}",
                    self.task_type
                )));
            }
        }
        if let Some(unique_key) = &self.unique_key {
            if unique_key.is_empty() || unique_key.len() > 1000 || unique_key.contains('\0') {
                return Err(Error::InvalidValue(format!(
                    "the unique key of a task of type `{}` must be 1 to 1000 bytes without NUL, not {:?}",
                    self.task_type, unique_key
                )));
            }
        }
        if self.key.contains('\0') {
            return Err(Error::InvalidValue(format!(
                "the key of a task of type `{}` holds a NUL character, which PostgreSQL cannot store",
                self.task_type
            )));
        }
        if let Some(path) = nul_in(&self.parameters, "$") {
            return Err(Error::InvalidValue(format!(
                "the parameters of task type `{}` hold a NUL character (at {path}), which PostgreSQL cannot store",
                self.task_type
            )));
        }
        let due = match self.run_at {
            Some(at) => Some(at),
            None => chrono::TimeDelta::from_std(self.delay).ok().and_then(|d| Utc::now().checked_add_signed(d)),
        };
        match due {
            Some(at) if (FIRST_YEAR..=LAST_YEAR).contains(&at.year()) => Ok(()),
            _ => Err(Error::InvalidValue(format!(
                "the due time of a task of type `{}` is outside PostgreSQL's range (4713 BC to 294276 AD)",
                self.task_type
            ))),
        }
    }

    /// Inserts the task and returns its id. Inside the caller's transaction, the task
    /// exists (and wakes workers) only if that transaction commits.
    /// With a unique key, returns the id of the task inserted, kept or replaced
    /// ([`Self::upsert`] says which).
    pub fn insert(&self, conn: &mut PgConnection) -> Result<i64, Error> {
        self.upsert(conn).map(Upserted::id)
    }

    /// Inserts the task, or, when another task holds its unique key, keeps or replaces
    /// that one ([`Self::on_conflict`]), and says which. Race-free: of concurrent
    /// inserts of one key, from any number of clients, one inserts and the others
    /// find its task; inside the caller's transaction, the key is taken only if that
    /// transaction commits (a concurrent insert of the key waits for it).
    pub fn upsert(&self, conn: &mut PgConnection) -> Result<Upserted, Error> {
        self.validate()?;
        if self.unique_key.is_some() {
            return Ok(conn.transaction(|conn| insert_unique(conn, &[self]))?[0]);
        }
        let ids = insert::insert_tasks(conn, &[self.as_insert()])?;
        Ok(Upserted::Inserted(ids[0]))
    }

    /// Inserts `count` copies of the task in one statement and returns their ids. A
    /// unique task has no copies: refused.
    pub fn insert_copies(&self, conn: &mut PgConnection, count: u32) -> Result<Vec<i64>, Error> {
        self.validate()?;
        if self.unique_key.is_some() {
            return Err(Error::InvalidValue(format!(
                "a task of type `{}` with a unique key cannot be inserted in copies",
                self.task_type
            )));
        }
        Ok(insert::insert_copies(conn, &self.as_insert(), i64::from(count))?)
    }
}

/// Inserts a typed task, due at once, and returns its id.
pub fn enqueue<T: Task>(conn: &mut PgConnection, task: &T) -> Result<i64, Error> {
    NewTask::new(task)?.insert(conn)
}

/// Inserts many tasks in one statement and returns their ids, in the order given.
/// Tasks with a unique key take two statements more, at most (see [`NewTask::upsert`]);
/// their ids are those of the tasks inserted, kept or replaced. Several tasks of the
/// batch with one key behave as if inserted one after the other: one task results.
pub fn enqueue_many(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<Vec<i64>, Error> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    tasks.iter().try_for_each(NewTask::validate)?;
    type Numbered<'a> = Vec<(usize, &'a NewTask)>;
    let (unique, plain): (Numbered<'_>, Numbered<'_>) =
        tasks.iter().enumerate().partition(|(_, t)| t.unique_key.is_some());
    if unique.is_empty() {
        let inserts: Vec<TaskInsert<'_>> = tasks.iter().map(NewTask::as_insert).collect();
        return Ok(insert::insert_tasks(conn, &inserts)?);
    }
    // One transaction (a savepoint inside the caller's): all or nothing.
    conn.transaction(|conn| {
        let mut ids = vec![0; tasks.len()];
        if !plain.is_empty() {
            let inserts: Vec<TaskInsert<'_>> = plain.iter().map(|(_, t)| t.as_insert()).collect();
            for ((i, _), id) in plain.iter().zip(insert::insert_tasks(conn, &inserts)?) {
                ids[*i] = id;
            }
        }
        let unique_tasks: Vec<&NewTask> = unique.iter().map(|(_, t)| *t).collect();
        for ((i, _), done) in unique.iter().zip(insert_unique(conn, &unique_tasks)?) {
            ids[*i] = done.id();
        }
        Ok(ids)
    })
}

/// The tasks of one unique key in a batch, merged as if inserted one after the other.
struct KeyGroup<'a> {
    /// The row to insert if no task holds the key: the first task, with the parameters
    /// and priority of the last that replaces them, and the due time of the last that
    /// replaces it.
    row: TaskInsert<'a>,
    /// Whether an existing holder's parameters, and its due time, are replaced.
    replace: bool,
    replace_due: bool,
    /// Where in the batch its tasks are, and how each meets the one before it.
    members: Vec<(usize, OnConflict)>,
    done: Option<Upserted>,
}

/// Inserts tasks that all have a unique key: replaces the waiting holders of the keys
/// whose tasks say so, inserts the tasks whose key is free, then finds the holders of
/// the others; a key whose holder changed in between (it started, or ended) goes round
/// again. No running task is locked or changed.
fn insert_unique(conn: &mut PgConnection, batch: &[&NewTask]) -> Result<Vec<Upserted>, Error> {
    let mut groups: Vec<KeyGroup<'_>> = Vec::new();
    let mut by_key: HashMap<&str, usize> = HashMap::new();
    for (i, task) in batch.iter().enumerate() {
        let key = task.unique_key.as_deref().unwrap_or_default();
        let replace = task.on_conflict != OnConflict::Keep;
        let replace_due = task.on_conflict == OnConflict::Replace;
        match by_key.get(key) {
            None => {
                by_key.insert(key, groups.len());
                groups.push(KeyGroup {
                    row: task.as_insert(),
                    replace,
                    replace_due,
                    members: vec![(i, task.on_conflict)],
                    done: None,
                });
            }
            Some(&g) => {
                let group = &mut groups[g];
                if replace {
                    group.row.parameters = &task.parameters;
                    group.row.priority = task.priority;
                    group.replace = true;
                }
                if replace_due {
                    group.row.run_at = task.run_at;
                    group.row.delay_us = micros(task.delay);
                    group.replace_due = true;
                }
                group.members.push((i, task.on_conflict));
            }
        }
    }
    let mut pending: Vec<usize> = (0..groups.len()).collect();
    for _ in 0..UNIQUE_ROUNDS {
        let replacing: Vec<usize> = pending.iter().copied().filter(|&g| groups[g].replace).collect();
        if !replacing.is_empty() {
            let rows: Vec<&TaskInsert<'_>> = replacing.iter().map(|&g| &groups[g].row).collect();
            let due: Vec<bool> = replacing.iter().map(|&g| groups[g].replace_due).collect();
            for holder in unique::replace_waiting(conn, &rows, &due)? {
                groups[by_key[holder.unique_key.as_str()]].done = Some(Upserted::Replaced(holder.id));
            }
            pending.retain(|&g| groups[g].done.is_none());
        }
        if pending.is_empty() {
            break;
        }
        let rows: Vec<&TaskInsert<'_>> = pending.iter().map(|&g| &groups[g].row).collect();
        for holder in unique::insert_free(conn, &rows)? {
            groups[by_key[holder.unique_key.as_str()]].done = Some(Upserted::Inserted(holder.id));
        }
        pending.retain(|&g| groups[g].done.is_none());
        if pending.is_empty() {
            break;
        }
        let keys: Vec<&str> = pending.iter().map(|&g| groups[g].row.unique_key.unwrap_or_default()).collect();
        for holder in unique::holders(conn, &keys)? {
            let group = &mut groups[by_key[holder.unique_key.as_str()]];
            // A waiting holder that was to be replaced appeared after the replace: again.
            if !(group.replace && holder.waiting) {
                group.done = Some(Upserted::Kept(holder.id));
            }
        }
        pending.retain(|&g| groups[g].done.is_none());
        if pending.is_empty() {
            break;
        }
    }
    if let Some(&g) = pending.first() {
        return Err(Error::UniqueKeyContended(groups[g].row.unique_key.unwrap_or_default().to_owned()));
    }
    let mut done = vec![Upserted::Inserted(0); batch.len()];
    for group in &groups {
        let first = group.done.expect("every key was settled");
        for (n, &(i, on_conflict)) in group.members.iter().enumerate() {
            done[i] = match (n, on_conflict) {
                (0, _) => first,
                (_, OnConflict::Keep) => Upserted::Kept(first.id()),
                _ => Upserted::Replaced(first.id()),
            };
        }
    }
    Ok(done)
}
