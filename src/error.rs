//! The library's public errors.

use std::error::Error as StdError;

/// What can go wrong in the engine's own work (not in a task: see [`crate::TaskError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A query failed or its transaction was rolled back.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),

    /// A connection to PostgreSQL could not be opened.
    #[error("could not connect to {server}: {source}")]
    Connection {
        /// The connection string, without its password.
        server: String,
        /// What the driver said.
        #[source]
        source: diesel::ConnectionError,
    },

    /// The listener's own connection (LISTEN) failed.
    #[error("listener: {context}: {source}")]
    Listener {
        /// What the listener was doing.
        context: String,
        /// What the driver said.
        #[source]
        source: postgres::Error,
    },

    /// The connection pool gave no connection in time (database away or pool exhausted).
    #[error("no database connection available: {0}")]
    Pool(#[from] diesel::r2d2::PoolError),

    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migration(Box<dyn StdError + Send + Sync>),

    /// A task type name that no linked task crate registers.
    #[error("unknown task type `{name}` (registered types: {})", known.join(", "))]
    UnknownTaskType {
        /// The name asked for.
        name: String,
        /// The names this registry knows, sorted.
        known: Vec<&'static str>,
    },

    /// Parameters that do not deserialise into the task type's parameters.
    #[error("parameters do not fit task type `{task_type}`: {source}")]
    InvalidParameters {
        /// The task type.
        task_type: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },

    /// A task value that could not be serialised to JSON.
    #[error("could not serialise the parameters of task type `{task_type}`: {source}")]
    Serialization {
        /// The task type.
        task_type: &'static str,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },

    /// Two linked task crates register task types under one name.
    #[error("two task types are registered as `{name}`: `{first}` and `{second}`")]
    DuplicateTaskType {
        /// The shared name.
        name: &'static str,
        /// One Rust type registered under it.
        first: &'static str,
        /// The other.
        second: &'static str,
    },

    /// An operating-system call of the engine failed (spawning a thread, say).
    #[error("{context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A value the database would refuse to store: a NUL character (which neither `text`
    /// nor `jsonb` can hold), a time outside PostgreSQL's range.
    #[error("{0}")]
    InvalidValue(String),

    /// A setting the engine cannot use (a malformed database URL, say).
    #[error("{0}")]
    Config(String),

    /// A [`crate::Runner`] setting outside what the engine can work with: refused by
    /// [`crate::Runner::start`] before it connects, never adjusted silently.
    #[error("{setting}: {reason}")]
    InvalidSetting {
        /// The builder method (and `engine run` option) that set it.
        setting: &'static str,
        /// What it must be.
        reason: String,
    },

    /// Every try of an insert found the holder of a unique key changed (it started or
    /// ended) before it could settle: nothing of the insert's batch was inserted. Try again.
    #[error("the holder of the unique key {0:?} kept changing during the insert; nothing was inserted")]
    UniqueKeyContended(String),

    /// No task has this id.
    #[error("there is no task {0}")]
    TaskNotFound(i64),

    /// The task's state does not allow what was asked.
    #[error("cannot {action} task {task_id}: it is {status}{}", match (*action, status.as_str()) {
        ("retry", "waiting" | "running") => " (it will run anyway)",
        ("retry", _) => " (only failed or cancelled tasks can be retried)",
        (_, "cancelled") => " already",
        _ => " (only waiting or running tasks can be cancelled)",
    })]
    InvalidTransition {
        /// The task.
        task_id: i64,
        /// Its status.
        status: String,
        /// What was asked: `retry` or `cancel`.
        action: &'static str,
    },
}
