//! What a running task can see of the engine.

use std::sync::Arc;

use crate::runner::Shared;
use crate::{Error, PgPool, PooledConnection};

/// The context of one attempt: which task and attempt it is, whether the engine asks
/// it to stop, and a connection for the task's own database work.
pub struct TaskContext {
    pub(crate) task_id: i64,
    pub(crate) task_class: String,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) worker: usize,
    pub(crate) shared: Arc<Shared>,
}

impl TaskContext {
    /// Returns the id of the task (`tasks.id`).
    pub fn task_id(&self) -> i64 {
        self.task_id
    }

    /// Returns the task's type name.
    pub fn task_class(&self) -> &str {
        &self.task_class
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
        &self.shared.instance
    }

    /// Returns the index of the worker thread running the task.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Tells whether the engine asks running tasks to stop early; a long task checks
    /// it between steps and returns. Tasks that ignore it are waited for.
    pub fn stop_requested(&self) -> bool {
        self.shared.wakeup.is_stopping()
    }

    /// Takes a connection from the engine's pool for the task's own queries; it goes
    /// back to the pool when dropped.
    pub fn connection(&self) -> Result<PooledConnection, Error> {
        Ok(self.shared.pool.get()?)
    }

    /// Returns the engine's connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }
}
