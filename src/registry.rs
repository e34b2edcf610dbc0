//! Task types: the [`Task`] trait a task crate implements, the [`register_task!`]
//! macro that registers an implementation through `inventory`, and the [`Registry`]
//! the engine builds once at start-up from every registration linked into the binary.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::context::TaskContext;
use crate::Error;

/// A typed task: the value is the task's parameters, stored as JSON in
/// `tasks.task_parameters`; what [`Task::run`] returns is stored as JSON in the
/// execution's `result`.
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// The name stored in `tasks.task_class`; unique among registered types.
    const NAME: &'static str;

    /// How many attempts a task of this type gets unless its enqueue says otherwise.
    const MAX_ATTEMPTS: i32 = 25;

    /// What a successful run returns.
    type Output: Serialize;

    /// Runs one attempt. An `Err` is recorded on the execution as the attempt's error,
    /// and the task is tried again later unless the error is permanent or this was
    /// its last attempt.
    fn run(&self, ctx: &TaskContext) -> Result<Self::Output, TaskError>;

    /// How long to wait before the attempt after failed attempt number `attempt`
    /// (1 for the first). Default: [`default_retry_delay`].
    fn retry_delay(attempt: i32) -> Duration {
        default_retry_delay(attempt)
    }
}

/// The default wait before a retry: `attempt^4 + 3` seconds, give or take 10% at
/// random so that tasks that failed together do not retry together: about 4 s, 19 s,
/// 84 s, 4.3 min, 10.5 min, ... 3.8 days before the 25th attempt; 25 attempts span
/// about three weeks.
pub fn default_retry_delay(attempt: i32) -> Duration {
    let attempt = f64::from(attempt.clamp(1, 100));
    let base = attempt.powi(4) + 3.0;
    Duration::from_secs_f64(base * (0.9 + 0.2 * unit_random()))
}

/// A number in [0, 1) good enough for jitter, without a random-number crate: the
/// standard library's randomly keyed hasher over the time and a counter.
fn unit_random() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Why an attempt failed, as a task reports it: a message, and whether trying again
/// could help.
///
/// Any `std::error::Error` converts into it, so `?` works inside [`Task::run`].
pub struct TaskError {
    message: String,
    permanent: bool,
}

impl TaskError {
    /// Builds an error that a later attempt might not meet.
    pub fn new(message: impl fmt::Display) -> Self {
        Self { message: message.to_string(), permanent: false }
    }

    /// Builds an error that no later attempt can fix: the task is not retried.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self { message: message.to_string(), permanent: true }
    }

    /// Returns the message recorded on the execution.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Tells whether the remaining attempts are skipped.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> Self {
        // Keep the whole chain of causes: the outermost message alone often says
        // too little ("request failed").
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::new(message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError").field("message", &self.message).field("permanent", &self.permanent).finish()
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// How an erased run failed.
pub(crate) enum RunFailure {
    /// The stored parameters no longer deserialise into the type: never retried.
    Parameters(String),
    /// The task returned an error.
    Task(TaskError),
    /// The task's output could not be serialised: never retried, rerunning the
    /// task would produce the same unserialisable output.
    Output(String),
    /// The task panicked, with this message.
    Panic(String),
}

impl RunFailure {
    /// Tells whether no later attempt can succeed.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            Self::Parameters(_) | Self::Output(_) => true,
            Self::Task(error) => error.permanent,
            Self::Panic(_) => false,
        }
    }

    /// Returns the message recorded as the attempt's error.
    pub(crate) fn into_message(self) -> String {
        match self {
            Self::Parameters(message) | Self::Output(message) => message,
            Self::Task(error) => error.message,
            Self::Panic(message) => format!("panicked: {message}"),
        }
    }
}

/// One registered task type, type-erased: what `inventory` collects.
pub struct TaskEntry {
    name: &'static str,
    rust_type: &'static str,
    max_attempts: i32,
    retry_delay: fn(i32) -> Duration,
    check: fn(&serde_json::Value) -> Result<(), serde_json::Error>,
    run: fn(&serde_json::Value, &TaskContext) -> Result<serde_json::Value, RunFailure>,
}

inventory::collect!(TaskEntry);

impl TaskEntry {
    /// Describes `T` for the registry; [`register_task!`] calls it.
    #[doc(hidden)]
    pub const fn of<T: Task>(rust_type: &'static str) -> Self {
        Self {
            name: T::NAME,
            rust_type,
            max_attempts: T::MAX_ATTEMPTS,
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

    /// Returns the wait before the attempt after failed attempt `attempt`.
    pub fn retry_delay(&self, attempt: i32) -> Duration {
        (self.retry_delay)(attempt)
    }

    pub(crate) fn run(
        &self,
        parameters: &serde_json::Value,
        ctx: &TaskContext,
    ) -> Result<serde_json::Value, RunFailure> {
        (self.run)(parameters, ctx)
    }
}

fn check_parameters<T: Task>(parameters: &serde_json::Value) -> Result<(), serde_json::Error> {
    T::deserialize(parameters).map(drop)
}

fn run_erased<T: Task>(parameters: &serde_json::Value, ctx: &TaskContext) -> Result<serde_json::Value, RunFailure> {
    let task = T::deserialize(parameters)
        .map_err(|e| RunFailure::Parameters(format!("parameters do not fit task type `{}`: {e}", T::NAME)))?;
    let output = task.run(ctx).map_err(RunFailure::Task)?;
    serde_json::to_value(output)
        .map_err(|e| RunFailure::Output(format!("could not serialise the result of `{}`: {e}", T::NAME)))
}

/// Registers a [`Task`] implementation so that every engine linking this crate can
/// run it: `task_engine::register_task!(SendEmail);` next to the type.
#[macro_export]
macro_rules! register_task {
    ($task:ty) => {
        $crate::__inventory::submit! {
            $crate::TaskEntry::of::<$task>(concat!(module_path!(), "::", stringify!($task)))
        }
    };
}

/// The task types an instance can run, by name.
#[derive(Clone)]
pub struct Registry {
    entries: BTreeMap<&'static str, &'static TaskEntry>,
}

impl Registry {
    /// Builds the registry from every [`register_task!`] linked into the binary, and
    /// refuses two types registered under one name.
    pub fn from_inventory() -> Result<Self, Error> {
        Self::from_entries(inventory::iter::<TaskEntry>)
    }

    fn from_entries(all: impl IntoIterator<Item = &'static TaskEntry>) -> Result<Self, Error> {
        let mut entries: BTreeMap<&'static str, &'static TaskEntry> = BTreeMap::new();
        for entry in all {
            if let Some(first) = entries.insert(entry.name, entry) {
                let (a, b) = ordered(first.rust_type, entry.rust_type);
                return Err(Error::DuplicateTaskType { name: entry.name, first: a, second: b });
            }
        }
        Ok(Self { entries })
    }

    /// Keeps only the named types: an instance that should run part of the types.
    /// Unknown names are an error.
    pub fn only(&self, names: &[&str]) -> Result<Self, Error> {
        let mut entries = BTreeMap::new();
        for name in names {
            let entry = self.get(name)?;
            entries.insert(entry.name, entry);
        }
        Ok(Self { entries })
    }

    /// Returns the registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    /// Returns every entry, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = &'static TaskEntry> + '_ {
        self.entries.values().copied()
    }

    /// Finds a type by name.
    pub fn get(&self, name: &str) -> Result<&'static TaskEntry, Error> {
        self.entries
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownTaskType { name: name.to_owned(), known: self.names() })
    }

    /// Checks that `parameters` deserialise into the named type, without running it.
    pub fn check(&self, name: &str, parameters: &serde_json::Value) -> Result<&'static TaskEntry, Error> {
        let entry = self.get(name)?;
        (entry.check)(parameters).map_err(|source| Error::InvalidParameters { task_class: name.to_owned(), source })?;
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
    use super::*;
    use serde::Deserialize;

    #[test]
    fn the_default_retry_delay_grows_as_the_fourth_power_with_ten_percent_jitter() {
        for (attempt, base) in [(1, 4.0), (2, 19.0), (3, 84.0), (10, 10_003.0)] {
            let delays: Vec<f64> = (0..50).map(|_| default_retry_delay(attempt).as_secs_f64()).collect();
            assert!(delays.iter().all(|d| *d >= base * 0.9 && *d <= base * 1.1), "attempt {attempt}: {delays:?}");
            let spread =
                delays.iter().cloned().fold(f64::MIN, f64::max) - delays.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread > base * 0.02, "attempt {attempt}: no jitter in {delays:?}");
        }
    }

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

    static BILLING: TaskEntry = TaskEntry::of::<Billing>("billing::Billing");
    static MAILING: TaskEntry = TaskEntry::of::<Mailing>("mailing::Mailing");

    #[test]
    fn two_types_under_one_name_are_refused_with_both_named() {
        let error = Registry::from_entries([&BILLING, &MAILING]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "two task types are registered as `send_invoice`: `billing::Billing` and `mailing::Mailing`"
        );
    }

    #[test]
    fn a_registry_finds_its_types_and_their_declared_attempts() {
        let registry = Registry::from_entries([&MAILING]).unwrap();
        assert_eq!(registry.names(), ["send_invoice"]);
        assert_eq!(registry.get("send_invoice").unwrap().max_attempts(), 3);
        assert!(matches!(registry.get("nope"), Err(Error::UnknownTaskType { .. })));
    }

    #[test]
    fn errors_converted_from_std_errors_keep_their_causes() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("request failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = TaskError::from(Outer(std::io::Error::other("connection reset")));
        assert_eq!(error.message(), "request failed: connection reset");
        assert!(!error.is_permanent());
        assert!(TaskError::permanent("bad address").is_permanent());
    }
}
