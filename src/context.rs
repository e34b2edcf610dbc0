//! What a running task can see of the engine: its own attempt, whether it should stop,
//! and the instance's connection pool. Nothing else of the engine is reachable from a
//! task. A test builds the same context around a stand-in for the instance
//! (`TestHost`, built by `crate::testing`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::db::connect::{PgPool, PooledConnection};
use crate::db::progress;
use crate::error::Error;

/// The least time between two writes of a task's progress or checkpoint: a task may
/// report as often as it likes, the database sees one write a second at most.
pub(crate) const PROGRESS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// The context of one attempt: which task and attempt it is, whether the engine asks
/// it to stop, and a connection for the task's own database work.
///
/// The engine builds it for each attempt; a test builds one with
/// [`TestContext`](crate::testing::TestContext), without a database (see
/// `docs/testing.md`).
pub struct TaskContext {
    pub(crate) task_id: i64,
    pub(crate) task_type: &'static str,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) worker: usize,
    /// Set when an operator cancels this task.
    pub(crate) cancelled: Arc<AtomicBool>,
    /// Set by the watchdog when the attempt passes its time limit.
    pub(crate) timed_out: Arc<AtomicBool>,
    pub(crate) instance: Host,
    /// What the task said of itself and the database has not seen yet.
    pub(crate) reported: Mutex<Reported>,
}

/// Progress and checkpoint waiting for their write.
#[derive(Debug, Default)]
pub(crate) struct Reported {
    progress: Option<(i16, String)>,
    checkpoint: Option<serde_json::Value>,
    last_write: Option<Instant>,
}

/// What the tasks of one instance share.
pub(crate) struct InstanceHandle {
    pub name: String,
    /// Set when the instance stops.
    pub stopping: Arc<AtomicBool>,
    /// The tasks' own pool.
    pub pool: PgPool,
}

/// Where a context's task runs: one public `TaskContext` for both, so that a task's
/// code and its tests see the same type.
pub(crate) enum Host {
    /// An instance of the engine: what the task reports goes to its row.
    Instance(Arc<InstanceHandle>),
    /// A test: what the task reports is kept in memory, every report, for the test to
    /// read back; the database is the test's, if it gave one.
    Test(Arc<TestHost>),
}

/// A test's stand-in for an instance.
pub(crate) struct TestHost {
    pub name: String,
    /// Set by the test, as a stopping instance sets its own.
    pub stopping: Arc<AtomicBool>,
    pub pool: Option<PgPool>,
    pub reports: Mutex<TestReports>,
}

/// What a task reported in a test, in order.
#[derive(Debug, Default)]
pub(crate) struct TestReports {
    pub progress: Vec<(i16, String)>,
    pub checkpoints: Vec<serde_json::Value>,
    /// What [`TaskContext::last_checkpoint`] returns: the test's seed, then the last
    /// checkpoint saved.
    pub last_checkpoint: Option<serde_json::Value>,
}

impl Host {
    fn name(&self) -> &str {
        match self {
            Self::Instance(instance) => &instance.name,
            Self::Test(test) => &test.name,
        }
    }

    pub(crate) fn stopping(&self) -> &AtomicBool {
        match self {
            Self::Instance(instance) => &instance.stopping,
            Self::Test(test) => &test.stopping,
        }
    }

    fn pool(&self) -> Option<&PgPool> {
        match self {
            Self::Instance(instance) => Some(&instance.pool),
            Self::Test(test) => test.pool.as_ref(),
        }
    }
}

impl TestHost {
    /// What the task reported, a poisoned lock included (its data stays consistent).
    pub(crate) fn reports(&self) -> MutexGuard<'_, TestReports> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a context built by a test without a pool has no connection.
const NO_TEST_POOL: &str =
    "this test's TaskContext has no database: give it a pool (task_engine::testing::TestContext::builder().pool(..))";

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
        self.instance.name()
    }

    /// Returns the index of the worker thread running the task.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Tells whether the task should stop early: its instance is shutting down, an
    /// operator cancelled it (`engine cancel`), or it passed its time limit
    /// ([`crate::Task::TIMEOUT`]). A long task checks it between steps and returns;
    /// tasks that ignore it are waited for (under a time limit, for a grace only). What
    /// it returns then, unless it succeeds, counts by the first reason that holds: a
    /// cancelled task ends `cancelled`; past its time limit, the attempt is timed out
    /// (retried per its policy); otherwise its instance stops, and any error but a
    /// permanent one interrupts the attempt: the task waits again at once, using no
    /// attempt (see `docs/timeouts.md`).
    pub fn stop_requested(&self) -> bool {
        self.instance.stopping().load(Ordering::Relaxed) || self.cancel_requested() || self.timed_out()
    }

    /// Tells whether the attempt has passed its time limit.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Tells whether an operator cancelled this task while it runs.
    pub fn cancel_requested(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Takes a connection from the engine's pool for the task's own queries; it goes
    /// back to the pool when dropped. In a test, from the test's pool; without one, an
    /// error that says so.
    pub fn connection(&self) -> Result<PooledConnection, Error> {
        let pool = self.instance.pool().ok_or_else(|| Error::Config(NO_TEST_POOL.to_owned()))?;
        Ok(pool.get()?)
    }

    /// Returns the engine's connection pool.
    ///
    /// # Panics
    ///
    /// In a test whose context was built without a pool (see `docs/testing.md`).
    pub fn pool(&self) -> &PgPool {
        self.instance.pool().expect(NO_TEST_POOL)
    }

    /// Says how far the attempt got (`percent`, 0 to 100, more is taken as 100) and
    /// what it is doing: written to the task's row (`progress`, `progress_message`;
    /// `engine status --task` shows them) at most once a second, and at the attempt's
    /// end. Call it as often as you like.
    pub fn progress(&self, percent: u8, message: impl Into<String>) -> Result<(), Error> {
        let mut reported = self.reported();
        reported.progress = Some((i16::from(percent.min(100)), message.into()));
        self.write_if_due(&mut reported)
    }

    /// Saves where the task got to, as JSON: written like [`TaskContext::progress`] (at
    /// most once a second, and at the attempt's end), and kept across attempts, so that
    /// the next attempt resumes from it ([`TaskContext::last_checkpoint`]). What was
    /// saved in the last second before a crash of the instance is lost.
    pub fn checkpoint(&self, value: &impl Serialize) -> Result<(), Error> {
        let value = serde_json::to_value(value).map_err(|e| {
            Error::InvalidValue(format!("the checkpoint of task type `{}` is not JSON: {e}", self.task_type))
        })?;
        let mut reported = self.reported();
        reported.checkpoint = Some(value);
        self.write_if_due(&mut reported)
    }

    /// The checkpoint this task saved last, by this attempt or an earlier one: `None`
    /// on a first start, or if none was saved. Reads the task's row (in a test, the
    /// checkpoint the test gave, or the last one saved since).
    pub fn last_checkpoint<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        let mut reported = self.reported();
        self.write(&mut reported)?;
        drop(reported);
        let saved = match &self.instance {
            Host::Instance(_) => progress::checkpoint(&mut *self.connection()?, self.task_id)?,
            Host::Test(test) => test.reports().last_checkpoint.clone(),
        };
        let Some(value) = saved else { return Ok(None) };
        serde_json::from_value(value).map(Some).map_err(|e| {
            Error::InvalidValue(format!("the checkpoint of task type `{}` does not fit: {e}", self.task_type))
        })
    }

    /// What waits for its write (a poisoned lock still holds consistent data).
    pub(crate) fn reported(&self) -> MutexGuard<'_, Reported> {
        self.reported.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what waits, unless the last write was less than a second ago (a test
    /// keeps every report: it writes nothing to a database).
    fn write_if_due(&self, reported: &mut Reported) -> Result<(), Error> {
        let throttled = matches!(self.instance, Host::Instance(_));
        if throttled && reported.last_write.is_some_and(|at| at.elapsed() < PROGRESS_WRITE_INTERVAL) {
            return Ok(());
        }
        self.write(reported)
    }

    /// Writes what waits, if anything (the worker calls it when the attempt ends).
    pub(crate) fn write(&self, reported: &mut Reported) -> Result<(), Error> {
        if reported.progress.is_none() && reported.checkpoint.is_none() {
            return Ok(());
        }
        let progress = reported.progress.take();
        let checkpoint = reported.checkpoint.take();
        reported.last_write = Some(Instant::now());
        if let Host::Test(test) = &self.instance {
            let mut reports = test.reports();
            reports.progress.extend(progress);
            if let Some(checkpoint) = checkpoint {
                reports.last_checkpoint = Some(checkpoint.clone());
                reports.checkpoints.push(checkpoint);
            }
            return Ok(());
        }
        let progress = progress.as_ref().map(|(p, m)| (*p, m.as_str()));
        progress::record_progress(&mut *self.connection()?, self.task_id, self.attempt, progress, checkpoint.as_ref())?;
        Ok(())
    }
}
