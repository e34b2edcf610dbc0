//! What a running task can see of the engine: its own attempt, whether it should stop,
//! and the instance's connection pool. Nothing else of the engine is reachable from a
//! task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::db::connect::{PgPool, PooledConnection};
use crate::error::Error;

/// The context of one attempt: which task and attempt it is, whether the engine asks
/// it to stop, and a connection for the task's own database work.
pub struct TaskContext {
    pub(crate) task_id: i64,
    pub(crate) task_type: &'static str,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) worker: usize,
    /// Set when an operator cancels this task.
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) instance: Arc<InstanceHandle>,
}

/// What the tasks of one instance share.
pub(crate) struct InstanceHandle {
    pub name: String,
    /// Set when the instance stops.
    pub stopping: Arc<AtomicBool>,
    pub pool: PgPool,
}

impl TaskContext {
    /// Returns the id of the task (`tasks.id`).
    pub fn task_id(&self) -> i64 {
        self.task_id
    }

    /// Returns the task's type name (`tasks.task_class`).
    pub fn task_type(&self) -> &str {
        self.task_type
    }

    /// Returns the attempt number, 1 for the first.
    pub fn attempt(&self) -> i32 {
        self.attempt
    }

    /// Returns how many attempts the task gets in all.
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }

    /// Returns the name of the engine instance running the task.
    pub fn instance(&self) -> &str {
        &self.instance.name
    }

    /// Returns the index of the worker thread running the task.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Tells whether the task should stop early: its instance is shutting down, or an
    /// operator cancelled it (`engine cancel`). A long task checks it between steps and
    /// returns; tasks that ignore it are waited for. A task that returns an error
    /// because of a shutdown is retried later; a cancelled task ends `cancelled`
    /// whatever it returns.
    pub fn stop_requested(&self) -> bool {
        self.instance.stopping.load(Ordering::Relaxed) || self.cancel_requested()
    }

    /// Tells whether an operator cancelled this task while it runs.
    pub fn cancel_requested(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Takes a connection from the engine's pool for the task's own queries; it goes
    /// back to the pool when dropped.
    pub fn connection(&self) -> Result<PooledConnection, Error> {
        Ok(self.instance.pool.get()?)
    }

    /// Returns the engine's connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.instance.pool
    }
}
