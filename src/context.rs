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

    /// Tells whether the task should stop early: its instance is shutting down, or an
    /// operator cancelled it (`engine cancel`). A long task checks it between steps
    /// and returns; tasks that ignore it are waited for. A task that returns an error
    /// because of a shutdown is retried later; a cancelled task ends `cancelled`
    /// whatever it returns.
    pub fn stop_requested(&self) -> bool {
        self.shared.wakeup.is_stopping() || self.cancel_requested()
    }

    /// Tells whether an operator cancelled this task while it runs.
    pub fn cancel_requested(&self) -> bool {
        self.shared.cancels.is_cancelled(self.task_id)
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

/// The running tasks of this instance that an operator cancelled (`engine cancel`
/// notifies the instances; the listener records it here for [`TaskContext`]).
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    /// The tasks running here, and whether each was cancelled.
    running: std::sync::Mutex<std::collections::HashMap<i64, bool>>,
}

impl Cancels {
    fn running(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i64, bool>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A task starts running here.
    pub(crate) fn started(&self, task_id: i64) {
        self.running().insert(task_id, false);
    }

    /// Marks a task cancelled, if it runs here.
    pub(crate) fn cancel(&self, task_id: i64) {
        if let Some(cancelled) = self.running().get_mut(&task_id) {
            *cancelled = true;
        }
    }

    /// The tasks running here now.
    pub(crate) fn running_ids(&self) -> Vec<i64> {
        self.running().keys().copied().collect()
    }

    pub(crate) fn is_cancelled(&self, task_id: i64) -> bool {
        self.running().get(&task_id).copied().unwrap_or(false)
    }

    /// Forgets a task whose attempt has ended.
    pub(crate) fn forget(&self, task_id: i64) {
        self.running().remove(&task_id);
    }
}
