#![doc = include_str!("../README.md")]

mod admin;
pub mod cluster;
mod completer;
mod context;
mod enqueue;
mod errors;
mod listener;
mod liveness;
mod maintenance;
mod migrate;
pub mod models;
mod producer;
mod registry;
pub mod report;
mod runner;
mod scheduler;
pub mod schema;
mod storage;
mod wakeup;
mod worker;

pub use admin::{cancel, prune, retry, Cancelled};
pub use context::TaskContext;
pub use enqueue::{enqueue, enqueue_many, NewTask};
pub use errors::Error;
pub use listener::channel_name;
pub use migrate::{pending_migrations, run_migrations};
pub use registry::{default_retry_delay, Registry, Task, TaskEntry, TaskError};
pub use runner::{
    connection_pool, default_instance_name, EngineStats, PgPool, PooledConnection, Runner, RunningEngine, StopHandle,
};

#[doc(hidden)]
pub use inventory as __inventory;
