//! Enqueueing from Rust: typed, inside the caller's own transaction when it has one.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use diesel::PgConnection;

use crate::db::micros;
use crate::db::tasks::{self, TaskInsert};
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
}

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
        }
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
    pub fn insert(&self, conn: &mut PgConnection) -> Result<i64, Error> {
        self.validate()?;
        let ids = tasks::insert_tasks(conn, &[self.as_insert()])?;
        Ok(ids[0])
    }

    /// Inserts `count` copies of the task in one statement and returns their ids.
    pub fn insert_copies(&self, conn: &mut PgConnection, count: u32) -> Result<Vec<i64>, Error> {
        self.validate()?;
        Ok(tasks::insert_copies(conn, &self.as_insert(), i64::from(count))?)
    }
}

/// Inserts a typed task, due at once, and returns its id.
pub fn enqueue<T: Task>(conn: &mut PgConnection, task: &T) -> Result<i64, Error> {
    NewTask::new(task)?.insert(conn)
}

/// Inserts many tasks in one statement and returns their ids, in the order given.
pub fn enqueue_many(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<Vec<i64>, Error> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    tasks.iter().try_for_each(NewTask::validate)?;
    let inserts: Vec<TaskInsert<'_>> = tasks.iter().map(NewTask::as_insert).collect();
    Ok(tasks::insert_tasks(conn, &inserts)?)
}
