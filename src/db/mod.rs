//! The SQL layer: every statement the engine runs, each in a small function that says
//! what it locks and changes. Nothing outside this module writes SQL, and the names
//! that SQL and Rust must agree on (the channel, the stripes, the lock keys) are spelled
//! once, here or in the migrations.
//!
//! - [`tasks`]: the life of a task: insert, claim, complete, release, rescue; the
//!   scheduler's look-ahead and the vacuum;
//! - [`unique`]: the insert of tasks with a unique key;
//! - [`operator`]: what an operator does to one task: retry, cancel, prune;
//! - [`queues`]: a queue's settings: pause, limits;
//! - [`schedules`]: recurring tasks' schedules and their last tick;
//! - [`instances`]: the instances' rows and name locks;
//! - [`channel`]: the LISTEN connection, the stripes, the engine's own notifications;
//! - [`report`]: read-only monitoring queries;
//! - [`connect`]: the pool and the engine's own connections, with passwords kept out
//!   of messages; [`migrate`], [`schema`], [`models`]: diesel's side.

pub(crate) mod channel;
pub(crate) mod connect;
pub(crate) mod instances;
pub(crate) mod migrate;
pub mod models;
pub(crate) mod operator;
mod prepared;
pub(crate) mod queues;
pub mod report;
pub(crate) mod schedules;
pub mod schema;
pub(crate) mod tasks;
pub(crate) mod unique;

/// A duration in whole microseconds, as the statements take them.
pub(crate) fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
