//! The SQL layer: every statement the engine runs, each in a small function that says
//! what it locks and changes. Nothing outside this module writes SQL, and the names
//! that SQL and Rust must agree on (the channel, the stripes, the lock keys) are spelled
//! once, here or in the migrations.
//!
//! - [`claim`]: the claim, and the look for due tasks that shares its walk;
//! - [`completion`]: the end of an attempt: completion, release, timed-out records;
//! - [`insert`]: the insert of tasks; [`unique`]: of tasks with a unique key;
//! - [`rescue`]: lost attempts recorded, their tasks back to waiting;
//! - [`progress`]: what a running attempt says of itself;
//! - [`maintenance`]: the vacuum and the prune;
//! - [`operator`]: what an operator does to tasks: retry, cancel, one or many;
//! - [`queues`]: a queue's settings: pause, limits;
//! - [`schedules`]: recurring tasks' schedules and their last tick;
//! - [`instances`]: the instances' rows and name locks;
//! - [`channel`]: the LISTEN connection, the stripes, the engine's own notifications;
//! - [`transitions`]: the rules of the state transitions, each written once, that the
//!   statements above use;
//! - [`report`]: read-only monitoring queries;
//! - [`connect`]: the pool and the engine's own connections, with passwords kept out
//!   of messages; [`migrate`], [`schema`], [`models`]: diesel's side.

pub(crate) mod channel;
pub(crate) mod claim;
pub(crate) mod completion;
pub(crate) mod connect;
pub(crate) mod insert;
pub(crate) mod instances;
pub(crate) mod maintenance;
pub(crate) mod migrate;
pub mod models;
pub(crate) mod operator;
mod prepared;
pub(crate) mod progress;
pub(crate) mod queues;
pub mod report;
pub(crate) mod rescue;
pub(crate) mod schedules;
pub mod schema;
pub(crate) mod transitions;
pub(crate) mod unique;

/// A duration in whole microseconds, as the statements take them.
pub(crate) fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
