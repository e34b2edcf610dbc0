//! Starting and stopping an engine instance: the builder, the state its threads
//! share, and the handle that stops them.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;

use crate::registry::Registry;
use crate::wakeup::WakeupQueue;
use crate::worker::Worker;
use crate::Error;

/// The engine's pool of diesel connections.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// A connection taken from a [`PgPool`].
pub type PooledConnection = diesel::r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// Opens a pool of at most `max_size` connections to `database_url`, and fails at once
/// if the database cannot be reached.
pub fn connection_pool(database_url: &str, max_size: u32) -> Result<PgPool, Error> {
    Ok(Pool::builder()
        .max_size(max_size)
        .min_idle(Some(1))
        // A checkout test costs a round trip per claim; a broken connection shows
        // up as a failed query instead, which every caller already handles.
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(5))
        .build(ConnectionManager::new(database_url))?)
}

/// Returns the instance name used when none is given: host name and process id.
pub fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// What every thread of an instance shares.
pub(crate) struct Shared {
    pub instance: String,
    pub pool: PgPool,
    pub registry: Registry,
    /// The type names this instance claims: only those it can run.
    pub task_classes: Vec<&'static str>,
    pub wakeup: WakeupQueue,
    pub poll_interval: Duration,
}

/// Configures and starts an engine instance.
///
/// ```no_run
/// # fn main() -> Result<(), task_engine::Error> {
/// let pool = task_engine::connection_pool("postgres://localhost/app", 10)?;
/// let registry = task_engine::Registry::from_inventory()?;
/// let engine = task_engine::Runner::new(pool, registry).workers(8).start()?;
/// // ... later, on shutdown:
/// engine.shutdown();
/// # Ok(()) }
/// ```
pub struct Runner {
    pool: PgPool,
    registry: Registry,
    instance: Option<String>,
    workers: usize,
    poll_interval: Duration,
}

impl Runner {
    /// Number of worker threads unless [`Runner::workers`] says otherwise.
    pub const DEFAULT_WORKERS: usize = 4;
    /// How long an idle worker sleeps before it looks for work unprompted.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

    /// Starts configuring an instance that runs the registry's task types on `pool`.
    pub fn new(pool: PgPool, registry: Registry) -> Self {
        Self {
            pool,
            registry,
            instance: None,
            workers: Self::DEFAULT_WORKERS,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
        }
    }

    /// Names the instance (default: [`default_instance_name`]).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// Sets the number of worker threads (at least 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Sets how long an idle worker sleeps before looking for work unprompted.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Starts the worker threads and returns the running instance.
    pub fn start(self) -> Result<RunningEngine, Error> {
        let instance = self.instance.unwrap_or_else(default_instance_name);
        let task_classes = self.registry.names();
        let shared = Arc::new(Shared {
            instance,
            pool: self.pool,
            registry: self.registry,
            task_classes,
            wakeup: WakeupQueue::new(self.workers),
            poll_interval: self.poll_interval,
        });
        log::info!(
            "instance {} starting {} workers; task types: {}",
            shared.instance,
            self.workers,
            shared.task_classes.join(", ")
        );
        let mut workers = Vec::with_capacity(self.workers);
        for index in 0..self.workers {
            let worker = Worker::new(index, Arc::clone(&shared));
            let spawned = std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || worker.run());
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(source) => {
                    // Do not leave the workers already started running unowned.
                    let partial = RunningEngine { shared, workers };
                    partial.shutdown();
                    return Err(Error::Io { context: format!("could not start worker {index}"), source });
                }
            }
        }
        Ok(RunningEngine { shared, workers })
    }
}

/// A running engine instance. Dropping it does not stop it: call
/// [`RunningEngine::shutdown`] (or [`StopHandle::stop`] then [`RunningEngine::join`]).
pub struct RunningEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl RunningEngine {
    /// Returns the instance's name.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// Returns a handle that stops the instance from another thread (a signal handler,
    /// say).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle { shared: Arc::clone(&self.shared) }
    }

    /// Stops claiming and waits until the tasks in flight have finished and been
    /// recorded.
    pub fn shutdown(self) {
        self.stop_handle().stop();
        self.join();
    }

    /// Waits for the worker threads to end (after a stop).
    pub fn join(self) {
        for handle in self.workers {
            let name = handle.thread().name().unwrap_or("worker").to_owned();
            if handle.join().is_err() {
                log::error!("{name} ended by a panic outside any task");
            }
        }
        log::info!("instance {} stopped", self.shared.instance);
    }
}

/// Stops an instance: no new claims; tasks in flight finish and are recorded.
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
}

impl StopHandle {
    /// Asks the instance to stop; returns at once.
    pub fn stop(&self) {
        if !self.shared.wakeup.is_stopping() {
            log::info!("instance {} stopping: finishing the tasks in flight", self.shared.instance);
        }
        self.shared.wakeup.stop();
    }
}
