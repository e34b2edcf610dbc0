//! The [`Registry`]: the task types an instance can run, by name, built once at
//! start-up from every [`register_task!`](crate::register_task) linked into the binary
//! (or type by type, with [`Registry::register`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::context::TaskContext;
use crate::error::Error;
use crate::task::{Task, TaskError};

/// One registered task type, type-erased: what `inventory` collects.
#[derive(Clone, Copy)]
pub struct TaskEntry {
    name: &'static str,
    rust_type: &'static str,
    max_attempts: i32,
    queue: &'static str,
    timeout: Option<Duration>,
    retry_delay: fn(i32) -> Duration,
    check: fn(&serde_json::Value) -> Result<(), serde_json::Error>,
    run: fn(&str, &TaskContext) -> Result<serde_json::Value, RunFailure>,
}

inventory::collect!(TaskEntry);

impl TaskEntry {
    /// Describes `T` for the registry; [`register_task!`](crate::register_task) calls it.
    #[doc(hidden)]
    pub const fn of<T: Task>(rust_type: &'static str) -> Self {
        Self {
            name: T::NAME,
            rust_type,
            max_attempts: T::MAX_ATTEMPTS,
            queue: T::QUEUE,
            timeout: T::TIMEOUT,
            retry_delay: T::retry_delay,
            check: check_parameters::<T>,
            run: run_erased::<T>,
        }
    }

    /// Returns the type's name, as stored in `tasks.task_class`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Returns the path of the Rust type that implements it.
    pub fn rust_type(&self) -> &'static str {
        self.rust_type
    }

    /// Returns the type's default number of attempts.
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }

    /// Returns the queue its tasks go to unless their enqueue says otherwise.
    pub fn queue(&self) -> &'static str {
        self.queue
    }

    /// Returns the type's time limit for an attempt, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Returns the wait before the attempt after failed attempt `attempt`.
    pub fn retry_delay(&self, attempt: i32) -> Duration {
        (self.retry_delay)(attempt)
    }

    /// Runs the task of `parameters`, JSON as stored.
    pub(crate) fn run(&self, parameters: &str, ctx: &TaskContext) -> Result<serde_json::Value, RunFailure> {
        (self.run)(parameters, ctx)
    }
}

/// How an erased run failed.
pub(crate) enum RunFailure {
    /// The stored parameters no longer deserialise into the type: never retried.
    Parameters(String),
    /// The task returned an error.
    Task(TaskError),
    /// The task's output could not be serialised: never retried, rerunning the task
    /// would produce the same unserialisable output.
    Output(String),
    /// The task panicked, with this message.
    Panic(String),
}

impl RunFailure {
    /// Tells whether no later attempt can succeed.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            Self::Parameters(_) | Self::Output(_) => true,
            Self::Task(error) => error.is_permanent(),
            Self::Panic(_) => false,
        }
    }

    /// How long the task asked to wait, if it snoozed.
    pub(crate) fn snoozed_for(&self) -> Option<Duration> {
        match self {
            Self::Task(error) => error.snoozed_for(),
            _ => None,
        }
    }

    /// Returns the failure as the error a task returns, with the message and the
    /// permanence the engine records for it (a test's inline run reports it so).
    pub(crate) fn into_task_error(self) -> TaskError {
        match self {
            Self::Task(error) => error,
            Self::Parameters(message) | Self::Output(message) => TaskError::permanent(message),
            Self::Panic(message) => TaskError::new(format!("panicked: {message}")),
        }
    }

    /// Returns the message recorded as the attempt's error.
    pub(crate) fn into_message(self) -> String {
        match self {
            Self::Parameters(message) | Self::Output(message) => message,
            Self::Task(error) => error.into_message(),
            Self::Panic(message) => format!("panicked: {message}"),
        }
    }
}

fn check_parameters<T: Task>(parameters: &serde_json::Value) -> Result<(), serde_json::Error> {
    T::deserialize(parameters).map(drop)
}

fn run_erased<T: Task>(parameters: &str, ctx: &TaskContext) -> Result<serde_json::Value, RunFailure> {
    run_typed::<T>(parameters, ctx).map(|(_, result)| result)
}

/// Runs one attempt of `T` as the engine does, panics aside (the worker contains them):
/// parses the stored `parameters`, runs the task, and serialises its output for the
/// record. Returns the output and its JSON. A test's inline run goes through here too.
pub(crate) fn run_typed<T: Task>(
    parameters: &str,
    ctx: &TaskContext,
) -> Result<(T::Output, serde_json::Value), RunFailure> {
    let task = serde_json::from_str::<T>(parameters)
        .map_err(|e| RunFailure::Parameters(format!("parameters do not fit task type `{}`: {e}", T::NAME)))?;
    let output = task.run(ctx).map_err(RunFailure::Task)?;
    let result = serde_json::to_value(&output)
        .map_err(|e| RunFailure::Output(format!("could not serialise the result of `{}`: {e}", T::NAME)))?;
    Ok((output, result))
}

/// The task types an instance can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, TaskEntry>,
}

impl Registry {
    /// Builds the registry from every [`register_task!`](crate::register_task) linked
    /// into the binary, and refuses two types registered under one name.
    pub fn from_inventory() -> Result<Self, Error> {
        let mut registry = Self::default();
        for entry in inventory::iter::<TaskEntry> {
            registry.add(*entry)?;
        }
        Ok(registry)
    }

    /// Adds the task type `T` (a registry of a program's own types, without
    /// `inventory`), and refuses a second type under its name.
    pub fn register<T: Task>(&mut self) -> Result<(), Error> {
        self.add(TaskEntry::of::<T>(std::any::type_name::<T>()))
    }

    fn add(&mut self, entry: TaskEntry) -> Result<(), Error> {
        if let Some(first) = self.entries.insert(entry.name, entry) {
            let (a, b) = ordered(first.rust_type, entry.rust_type);
            return Err(Error::DuplicateTaskType { name: entry.name, first: a, second: b });
        }
        Ok(())
    }

    /// Keeps only the named types: an instance that should run part of the types.
    /// Unknown names are an error.
    pub fn only(&self, names: &[&str]) -> Result<Self, Error> {
        let mut entries = BTreeMap::new();
        for name in names {
            let entry = self.get(name)?;
            entries.insert(entry.name, *entry);
        }
        Ok(Self { entries })
    }

    /// Returns the registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    /// Returns every entry, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = &TaskEntry> + '_ {
        self.entries.values()
    }

    /// Finds a type by name.
    pub fn get(&self, name: &str) -> Result<&TaskEntry, Error> {
        self.entries.get(name).ok_or_else(|| Error::UnknownTaskType { name: name.to_owned(), known: self.names() })
    }

    /// Checks that `parameters` deserialise into the named type, without running it.
    pub fn check(&self, name: &str, parameters: &serde_json::Value) -> Result<&TaskEntry, Error> {
        let entry = self.get(name)?;
        (entry.check)(parameters).map_err(|source| Error::InvalidParameters { task_type: name.to_owned(), source })?;
        Ok(entry)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}

fn ordered(a: &'static str, b: &'static str) -> (&'static str, &'static str) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::task::TaskError;

    #[derive(Serialize, Deserialize)]
    struct Billing {}
    impl Task for Billing {
        const NAME: &'static str = "send_invoice";
        type Output = ();
        fn run(&self, _: &TaskContext) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct Mailing {}
    impl Task for Mailing {
        const NAME: &'static str = "send_invoice";
        const MAX_ATTEMPTS: i32 = 3;
        type Output = ();
        fn run(&self, _: &TaskContext) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[test]
    fn two_types_under_one_name_are_refused_with_both_named() {
        let mut registry = Registry::default();
        registry.add(TaskEntry::of::<Billing>("billing::Billing")).unwrap();
        let error = registry.add(TaskEntry::of::<Mailing>("mailing::Mailing")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "two task types are registered as `send_invoice`: `billing::Billing` and `mailing::Mailing`"
        );
    }

    #[test]
    fn a_registry_finds_its_types_and_their_declared_attempts() {
        let mut registry = Registry::default();
        registry.register::<Mailing>().unwrap();
        assert_eq!(registry.names(), ["send_invoice"]);
        assert_eq!(registry.get("send_invoice").unwrap().max_attempts(), 3);
        assert!(registry.get("send_invoice").unwrap().rust_type().ends_with("::Mailing"));
        assert!(matches!(registry.get("nope"), Err(Error::UnknownTaskType { .. })));
    }
}
