#![doc = include_str!("../README.md")]

// The map. What a task crate writes: `task` (the trait, its errors, the macro),
// `context` (what a running task sees), `retry` (the default retry delay), and in its
// tests `testing` (a context without a database, one attempt run inline). What a
// program calls: `registry` (the types it runs), `enqueue`, `admin` (retry, cancel,
// prune), `queue` (pause, limits), `schedule` (recurring tasks), `declared` (schedules
// declared with the code), `runner` (start and stop an instance). Inside: `instance` (the parts of a running instance, one a file),
// `db` (every SQL statement, and diesel's schema and models), `attempt` (an attempt
// between the two); `error` for all. docs/design.md draws the house.

mod admin;
mod attempt;
mod context;
mod db;
mod declared;
mod enqueue;
mod error;
mod instance;
mod queue;
mod registry;
mod retry;
mod runner;
mod schedule;
mod task;
pub mod testing;

pub use admin::{cancel, cancel_many, prune, retry, retry_many, Cancelled, TaskFilter};
pub use context::TaskContext;
pub use db::connect::{connect, connection_pool, redact_url, PgPool, PooledConnection};
pub use db::migrate::{pending_migrations, run_migrations};
pub use db::{models, report, schema};
pub use declared::{Declarations, ScheduleDeclaration};
pub use enqueue::{enqueue, enqueue_many, NewTask, OnConflict, Upserted};
pub use error::Error;
pub use queue::{
    pause_queue, remove_queue, resume_queue, set_queue_concurrency, set_queue_key_limit, set_queue_rate_limit,
};
pub use registry::{Registry, TaskEntry};
pub use retry::default_retry_delay;
pub use runner::{default_instance_name, EngineStats, Runner, RunningEngine, StopHandle};
pub use schedule::{add_schedule, fire_due, list_schedules, remove_schedule, Schedule, ScheduleState};
pub use task::{Task, TaskError, DEFAULT_QUEUE};

#[doc(hidden)]
pub use inventory as __inventory;

/// The guides' examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/tasks.md")]
    struct Tasks;
    #[doc = include_str!("../docs/queues.md")]
    struct Queues;
    #[doc = include_str!("../docs/unique-tasks.md")]
    struct UniqueTasks;
    #[doc = include_str!("../docs/recurring-tasks.md")]
    struct RecurringTasks;
    #[doc = include_str!("../docs/timeouts.md")]
    struct Timeouts;
    #[doc = include_str!("../docs/testing.md")]
    struct Testing;
}
