//! Starting and stopping an engine instance: the builder, the state its threads
//! share, and the handle that stops them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;

use crate::completer::{self, Completer};
use crate::context::Cancels;
use crate::listener::Listener;
use crate::liveness::{self, Heartbeat};
use crate::maintenance;
use crate::producer;
use crate::registry::Registry;
use crate::scheduler::{self, Timer};
use crate::wakeup::{StopSignal, WakeupQueue};
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
        // A connection that died with the server (restart, failover) should be
        // marked broken by diesel and dropped by r2d2; the test at checkout makes
        // sure of it, for a round trip per checkout. Checkouts are rare: the
        // producer and the completer keep their connections between batches.
        .test_on_check_out(true)
        .connection_timeout(Duration::from_secs(5))
        .build(ConnectionManager::new(database_url))?)
}

/// Returns the instance name used when none is given: host name and process id.
pub fn default_instance_name() -> String {
    format!("{}-{}", crate::liveness::host_name(), std::process::id())
}

/// What every thread of an instance shares.
pub(crate) struct Shared {
    pub instance: String,
    /// For the connections of the instance's own (outside the pool).
    pub database_url: String,
    pub pool: PgPool,
    pub registry: Registry,
    /// The type names this instance claims: only those it can run.
    pub task_classes: Vec<&'static str>,
    /// Where idle workers sleep.
    pub wakeup: WakeupQueue,
    /// The stop flag of the threads that do not sleep in `wakeup`.
    pub stop: StopSignal,
    /// How long an idle worker sleeps before it looks for work unprompted.
    pub poll_interval: Duration,
    /// How long a claimed task may wait for a worker before it is given back.
    pub max_queue_wait: Duration,
    pub counters: Counters,
    /// When the next scheduled task is due.
    pub timer: Timer,
    /// The tasks claimed or running here, and which were cancelled.
    pub cancels: Cancels,
    /// Where workers leave their outcomes.
    pub completer: Completer,
}

/// What the instance counts, for [`RunningEngine::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub claims: AtomicU64,
    pub empty_claims: AtomicU64,
    pub notifications: AtomicU64,
    pub listener_connections: AtomicU64,
    pub listening: AtomicBool,
    pub heartbeats: AtomicU64,
    pub rescue_passes: AtomicU64,
    pub rescued: AtomicU64,
    pub completions: AtomicU64,
    pub completion_batches: AtomicU64,
    pub completion_failures: AtomicU64,
    pub marked_idle: AtomicBool,
    pub claimed_tasks: AtomicU64,
    pub vacuums: AtomicU64,
    pub given_back: AtomicU64,
}

/// A snapshot of an instance's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Claim statements run by the producer (each for up to all idle workers).
    pub claims: u64,
    /// Claims that found nothing: the cost of wake-ups without work for the waker
    /// (another worker or instance took the task) and of fallback polls.
    pub wasted_claims: u64,
    /// Notifications received by the listener.
    pub notifications: u64,
    /// Times the listener has connected and started listening.
    pub listener_connections: u64,
    /// Whether the listener is connected and listening now.
    pub listening: bool,
    /// Workers asleep in the wake-up queue now, with no wake-up on its way to them.
    pub sleeping_workers: usize,
    /// Heartbeats recorded.
    pub heartbeats: u64,
    /// Times this instance looked for the tasks of dead instances.
    pub rescue_passes: u64,
    /// Lost attempts this instance recorded (tasks put back to waiting).
    pub rescued: u64,
    /// Outcomes recorded by the completer.
    pub completions: u64,
    /// Statements the completer used for them.
    pub completion_batches: u64,
    /// Times the completer failed to record a batch (and tried again).
    pub completion_failures: u64,
    /// Whether the instance holds the stripes that make inserts notify (it is idle).
    pub marked_idle: bool,
    /// Tasks claimed.
    pub claimed_tasks: u64,
    /// Times this instance ran `VACUUM tasks`.
    pub vacuums: u64,
    /// Claimed tasks given back to the database unstarted, for having waited longer
    /// than [`Runner::max_queue_wait`] for a worker.
    pub given_back: u64,
}

/// Configures and starts an engine instance.
///
/// ```no_run
/// # fn main() -> Result<(), task_engine::Error> {
/// let registry = task_engine::Registry::from_inventory()?;
/// let engine = task_engine::Runner::new("postgres://localhost/app", registry).workers(8).start()?;
/// // ... later, on shutdown:
/// engine.shutdown();
/// # Ok(()) }
/// ```
pub struct Runner {
    database_url: String,
    pool: Option<PgPool>,
    registry: Registry,
    instance: Option<String>,
    workers: usize,
    poll_interval: Duration,
    max_queue_wait: Duration,
    lease: Duration,
    buffer: Option<usize>,
    flush_delay: Duration,
    max_claim: usize,
    max_completion_batch: usize,
}

impl Runner {
    /// Number of worker threads unless [`Runner::workers`] says otherwise.
    pub const DEFAULT_WORKERS: usize = 4;
    /// How long an idle worker sleeps before it looks for work unprompted: a safety
    /// net only, since notifications wake workers as soon as tasks are inserted.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);
    /// How long an instance may go without a heartbeat before its running tasks are
    /// rescued by another.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// The most tasks the producer may claim ahead, per worker, unless
    /// [`Runner::claim_buffer`] says otherwise. The buffer in use follows the tasks
    /// (what the workers get through in two claims' time): all of it for tasks much
    /// shorter than a claim's round trip, none for tasks of a second. Claims of a few
    /// hundred tasks are what make a busy instance fast (measured with 8 workers and
    /// no-op tasks, 12 paired runs: 39,100 tasks/s with a buffer of 128, 45,000 with
    /// 256; 512 did no better than 256).
    pub const DEFAULT_BUFFER_PER_WORKER: usize = 32;
    /// How long the completer waits for more outcomes before recording a batch.
    pub const DEFAULT_FLUSH_DELAY: Duration = Duration::from_millis(1);
    /// How long a claimed task may wait in the instance for a worker, unless
    /// [`Runner::max_queue_wait`] says otherwise.
    pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(1);

    /// Starts configuring an instance that runs the registry's task types on the
    /// database at `database_url`.
    pub fn new(database_url: impl Into<String>, registry: Registry) -> Self {
        Self {
            database_url: database_url.into(),
            pool: None,
            registry,
            instance: None,
            workers: Self::DEFAULT_WORKERS,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            max_queue_wait: Self::DEFAULT_MAX_QUEUE_WAIT,
            lease: Self::DEFAULT_LEASE,
            buffer: None,
            flush_delay: Self::DEFAULT_FLUSH_DELAY,
            max_claim: usize::MAX,
            max_completion_batch: completer::DEFAULT_MAX_BATCH,
        }
    }

    /// Caps the tasks one claim statement asks for (default: no cap beyond the room
    /// for them). 1, with [`Runner::max_completion_batch`] 1 and a zero
    /// [`Runner::flush_delay`], is the one-task-per-round-trip engine, for comparison.
    pub fn max_claim(mut self, max_claim: usize) -> Self {
        self.max_claim = max_claim.max(1);
        self
    }

    /// Caps the outcomes one completion statement records (default 1000).
    pub fn max_completion_batch(mut self, max: usize) -> Self {
        self.max_completion_batch = max.max(1);
        self
    }

    /// The most tasks the producer may claim beyond the idle workers, so that a
    /// worker finishing a short task finds the next one waiting, and claims and
    /// completions go by hundreds (default: [`Runner::DEFAULT_BUFFER_PER_WORKER`] per
    /// worker). The buffer in use adapts to the tasks' run times and the claims'
    /// round trips, so that slow tasks are not hoarded by one instance. Claimed tasks
    /// wait in the instance, in claim order: a task of higher priority inserted
    /// meanwhile waits behind them. 0 claims only for idle workers.
    pub fn claim_buffer(mut self, buffer: usize) -> Self {
        self.buffer = Some(buffer);
        self
    }

    /// How long a claimed task may wait in the instance for a worker (default 1 s):
    /// then the producer gives it back to the database, where another instance can
    /// claim it (it notifies them). The claim-ahead buffer follows the tasks' pace,
    /// but a claim can still take slow tasks along with fast ones; this bounds what
    /// that costs the slow tasks' neighbours. Checked about as often as this wait
    /// (at least every second).
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_queue_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// How long the completer waits for more outcomes before it records a batch
    /// (default 1 ms).
    pub fn flush_delay(mut self, delay: Duration) -> Self {
        self.flush_delay = delay;
        self
    }

    /// Sets the lease: an instance silent for this long is taken for dead and its
    /// running tasks are put back to waiting by another (heartbeats go six times per
    /// lease). Every instance sharing a database should use the same lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(60));
        self
    }

    /// Uses this pool (of the same database) for the workers instead of opening one
    /// of `workers + 2` connections. The listener always has a connection of its own.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
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

    /// Starts the listener and the worker threads and returns the running instance.
    pub fn start(self) -> Result<RunningEngine, Error> {
        let instance = self.instance.unwrap_or_else(default_instance_name);
        let task_classes = self.registry.names();
        let pool = match self.pool {
            Some(pool) => pool,
            // The completer, the scheduler, and the tasks' own queries.
            None => connection_pool(&self.database_url, u32::try_from(self.workers + 2).unwrap_or(u32::MAX))?,
        };
        let shared = Arc::new(Shared {
            instance,
            database_url: self.database_url.clone(),
            pool,
            registry: self.registry,
            task_classes,
            wakeup: WakeupQueue::new(
                self.workers,
                self.buffer.unwrap_or(Self::DEFAULT_BUFFER_PER_WORKER * self.workers),
            )
            .with_max_claim(self.max_claim),
            stop: StopSignal::default(),
            poll_interval: self.poll_interval,
            max_queue_wait: self.max_queue_wait,
            counters: Counters::default(),
            timer: Timer::default(),
            cancels: Cancels::default(),
            completer: Completer::new(self.flush_delay, self.max_completion_batch),
        });
        // The scheduler's first look: tasks already scheduled.
        shared.timer.refresh();
        let listener = Listener::new(Arc::clone(&shared), &self.database_url)?;
        // Takes the instance's name (or fails here) and recovers what a previous run
        // of it left running, before the producer claims.
        let heartbeat = Heartbeat::start(Arc::clone(&shared), &self.database_url, self.lease)?;
        log::info!(
            "instance {} starting {} workers; task types: {}",
            shared.instance,
            self.workers,
            shared.task_classes.join(", ")
        );
        let mut engine = RunningEngine { shared, threads: Threads::default() };
        let spawned = std::thread::Builder::new().name("listener".into()).spawn(move || listener.run());
        engine.adopt(spawned, "the listener", Role::Other)?;
        let for_scheduler = Arc::clone(&engine.shared);
        let spawned = std::thread::Builder::new().name("scheduler".into()).spawn(move || scheduler::run(for_scheduler));
        engine.adopt(spawned, "the scheduler", Role::Other)?;
        let spawned = std::thread::Builder::new().name("heartbeat".into()).spawn(move || heartbeat.run());
        engine.adopt(spawned, "the heartbeat", Role::Other)?;
        let for_maintenance = Arc::clone(&engine.shared);
        let spawned =
            std::thread::Builder::new().name("maintenance".into()).spawn(move || maintenance::run(for_maintenance));
        engine.adopt(spawned, "the maintenance thread", Role::Other)?;
        let for_completer = Arc::clone(&engine.shared);
        let spawned = std::thread::Builder::new().name("completer".into()).spawn(move || completer::run(for_completer));
        engine.adopt(spawned, "the completer", Role::Completer)?;
        for index in 0..self.workers {
            let worker = Worker::new(index, Arc::clone(&engine.shared));
            let spawned = std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || worker.run());
            engine.adopt(spawned, &format!("worker {index}"), Role::Worker)?;
        }
        let for_producer = Arc::clone(&engine.shared);
        let spawned = std::thread::Builder::new().name("producer".into()).spawn(move || producer::run(for_producer));
        engine.adopt(spawned, "the producer", Role::Producer)?;
        Ok(engine)
    }
}

/// A running engine instance. Dropping it does not stop it: call
/// [`RunningEngine::shutdown`] (or [`StopHandle::stop`] then [`RunningEngine::join`]).
pub struct RunningEngine {
    shared: Arc<Shared>,
    threads: Threads,
}

/// An instance's threads, by the order they end in.
#[derive(Default)]
struct Threads {
    producer: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    completer: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

enum Role {
    Producer,
    Worker,
    Completer,
    Other,
}

impl RunningEngine {
    /// Keeps a spawned thread, or stops the ones already started if it failed.
    fn adopt(&mut self, spawned: std::io::Result<JoinHandle<()>>, what: &str, role: Role) -> Result<(), Error> {
        match spawned {
            Ok(handle) => {
                let threads = &mut self.threads;
                match role {
                    Role::Producer => threads.producer.push(handle),
                    Role::Worker => threads.workers.push(handle),
                    Role::Completer => threads.completer.push(handle),
                    Role::Other => threads.others.push(handle),
                }
                Ok(())
            }
            Err(source) => {
                let partial =
                    RunningEngine { shared: Arc::clone(&self.shared), threads: std::mem::take(&mut self.threads) };
                partial.shutdown();
                Err(Error::Io { context: format!("could not start {what}"), source })
            }
        }
    }

    /// Returns the instance's name.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// Returns the instance's counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            claims: c.claims.load(Ordering::SeqCst),
            wasted_claims: c.empty_claims.load(Ordering::SeqCst),
            notifications: c.notifications.load(Ordering::SeqCst),
            listener_connections: c.listener_connections.load(Ordering::SeqCst),
            listening: c.listening.load(Ordering::SeqCst),
            sleeping_workers: self.shared.wakeup.sleeping(),
            heartbeats: c.heartbeats.load(Ordering::SeqCst),
            rescue_passes: c.rescue_passes.load(Ordering::SeqCst),
            rescued: c.rescued.load(Ordering::SeqCst),
            completions: c.completions.load(Ordering::SeqCst),
            completion_batches: c.completion_batches.load(Ordering::SeqCst),
            completion_failures: c.completion_failures.load(Ordering::SeqCst),
            marked_idle: c.marked_idle.load(Ordering::SeqCst),
            claimed_tasks: c.claimed_tasks.load(Ordering::SeqCst),
            vacuums: c.vacuums.load(Ordering::SeqCst),
            given_back: c.given_back.load(Ordering::SeqCst),
        }
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

    /// Waits for the instance's threads to end (after a stop).
    ///
    /// In order: the producer (it gives back the tasks no worker started), the
    /// workers (they finish their tasks), the completer (it records every outcome),
    /// the listener, the scheduler and the heartbeat.
    pub fn join(self) {
        let Threads { producer, workers, completer, others } = self.threads;
        join_all(producer);
        join_all(workers);
        self.shared.completer.stop();
        join_all(completer);
        join_all(others);
        // Every attempt is recorded: the instance can go.
        liveness::deregister(&self.shared);
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
        self.shared.stop.stop();
        self.shared.timer.stop();
    }
}

fn join_all(handles: Vec<JoinHandle<()>>) {
    for handle in handles {
        let name = handle.thread().name().unwrap_or("thread").to_owned();
        if handle.join().is_err() {
            log::error!("{name} ended by a panic outside any task");
        }
    }
}
