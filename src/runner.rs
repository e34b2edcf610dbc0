//! Starting and stopping an instance: the [`Runner`] builder checks its settings and
//! hands them to the instance's assembly (`instance/assembly.rs`), which starts the
//! parts; the [`RunningEngine`] reports and stops them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::db::connect::redact_url;
use crate::db::connect::PgPool;
use crate::db::migrate;
use crate::declared::{self, Declarations};
use crate::error::Error;
use crate::instance::assembly::{self, Counters, Instance, Settings};
use crate::instance::completer;
use crate::instance::connections::{Connections, Listen, Plan};
use crate::instance::in_flight::InFlight;
use crate::instance::shutdown::Shutdown;
use crate::registry::Registry;
use crate::schedule::{add_schedule, Schedule};
use crate::task::DEFAULT_QUEUE;

/// Returns the instance name used when none is given: host name and process id.
pub fn default_instance_name() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// This machine's name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
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
    /// Cancel requests the listener heard (any instance's tasks: a cancel is notified
    /// to all), or found running here after it reconnected.
    pub cancels_heard: u64,
    /// Cancel requests a heartbeat found for tasks running here before any
    /// notification reached them (one was lost).
    pub cancels_found: u64,
    /// Times a heartbeat found the settings of this instance's queues changed (paused,
    /// resumed, a limit changed) and woke its producers, as a lost notification would
    /// have.
    pub queue_changes_seen: u64,
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
    /// Attempts recorded as succeeded.
    pub succeeded: u64,
    /// Attempts recorded as failed, to be tried again, or snoozed.
    pub retried: u64,
    /// Attempts its stop interrupted: the tasks wait again, due now, each with one
    /// more attempt allowed.
    pub interrupted: u64,
    /// Attempts recorded as failed for good (a permanent error, the last attempt, a
    /// cancel).
    pub failed: u64,
    /// Whether the instance is marked idle: its session holds the stripes that make
    /// inserts notify, and its lanes have looked for work once more since.
    pub marked_idle: bool,
    /// Tasks claimed.
    pub claimed_tasks: u64,
    /// Times this instance ran `VACUUM tasks`.
    pub vacuums: u64,
    /// Claimed tasks given back to the database unstarted, for having waited longer
    /// than [`Runner::max_queue_wait`] for a worker.
    pub given_back: u64,
    /// Times the producer had a reason to claim and claimed nothing, because the
    /// instance's last sound heartbeat was more than half a lease old.
    pub paused_claims: u64,
    /// Whether the instance's last sound heartbeat is recent enough (less than half a
    /// lease old) for it to claim.
    pub heartbeat_current: bool,
    /// Workers abandoned, each replaced by a new one: their task passed its time limit
    /// and its grace without returning.
    pub abandoned_workers: u64,
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
    /// Where the session connects (LISTEN, the name lock, the stripes).
    listen: Listen,
    pool: Option<PgPool>,
    /// The size of the tasks' own pool; none: one per worker.
    task_connections: Option<usize>,
    registry: Registry,
    instance: Option<String>,
    workers: usize,
    /// The queues and their workers; none: [`DEFAULT_QUEUE`] with `workers`.
    queues: Vec<(String, usize)>,
    poll_interval: Duration,
    max_queue_wait: Duration,
    lease: Duration,
    buffer: Option<usize>,
    flush_delay: Duration,
    max_claim: usize,
    max_completion_batch: usize,
    timeout_grace: Duration,
    schedules: Vec<Schedule>,
    /// None: every `register_schedule!` linked in, collected at the start.
    declarations: Option<Declarations>,
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
    /// hundred tasks are what make a busy instance fast (`docs/benchmarks.md`).
    pub const DEFAULT_BUFFER_PER_WORKER: usize = 32;
    /// How long the completer waits for more outcomes before recording a batch.
    pub const DEFAULT_FLUSH_DELAY: Duration = Duration::from_millis(1);
    /// How long a claimed task may wait in the instance for a worker, unless
    /// [`Runner::max_queue_wait`] says otherwise.
    pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(1);
    /// The most worker threads an instance runs (each has a connection of the pool).
    pub const MAX_WORKERS: usize = 10_000;
    /// The shortest fallback poll: an idle instance claims this often.
    pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(1);
    /// The shortest wait for a worker: the producer looks at the queued tasks about
    /// this often.
    pub const MIN_MAX_QUEUE_WAIT: Duration = Duration::from_millis(10);
    /// The range of leases: heartbeats go six times per lease, and a day is the most a
    /// dead instance's tasks should wait for their rescue.
    pub const LEASES: std::ops::RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(86_400);
    /// How long a task past its time limit has to return, unless
    /// [`Runner::timeout_grace`] says otherwise.
    pub const DEFAULT_TIMEOUT_GRACE: Duration = Duration::from_secs(10);

    /// Starts configuring an instance that runs the registry's task types on the
    /// database at `database_url`.
    pub fn new(database_url: impl Into<String>, registry: Registry) -> Self {
        Self {
            database_url: database_url.into(),
            listen: Listen::Database,
            pool: None,
            task_connections: None,
            registry,
            instance: None,
            workers: Self::DEFAULT_WORKERS,
            queues: Vec::new(),
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            max_queue_wait: Self::DEFAULT_MAX_QUEUE_WAIT,
            lease: Self::DEFAULT_LEASE,
            buffer: None,
            flush_delay: Self::DEFAULT_FLUSH_DELAY,
            max_claim: usize::MAX,
            max_completion_batch: completer::DEFAULT_MAX_BATCH,
            timeout_grace: Self::DEFAULT_TIMEOUT_GRACE,
            schedules: Vec::new(),
            declarations: None,
        }
    }

    /// Declares these schedules instead of every
    /// [`register_schedule!`](crate::register_schedule) linked into the binary (the
    /// default, [`Declarations::from_inventory`]); `Declarations::default()` declares
    /// none. Applied at [`Runner::start`] by the rule of [`Declarations`].
    pub fn declarations(mut self, declarations: Declarations) -> Self {
        self.declarations = Some(declarations);
        self
    }

    /// Registers a recurring task: written to the database at [`Runner::start`] (added,
    /// or changed if a schedule of that name exists), and fired from then on by every
    /// instance, each tick once (see [`Schedule`]). Written as one added by hand: the
    /// last instance to start wins; [`register_schedule!`](crate::register_schedule)
    /// keeps a newer definition from being undone by an older instance.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// How long a task past its time limit ([`crate::Task::TIMEOUT`]) has to return,
    /// once asked to stop, before its worker is abandoned and replaced (default
    /// [`Runner::DEFAULT_TIMEOUT_GRACE`]; at most a day).
    pub fn timeout_grace(mut self, grace: Duration) -> Self {
        self.timeout_grace = grace;
        self
    }

    /// Caps the tasks one claim statement asks for (default: no cap beyond the room
    /// for them). 1, with [`Runner::max_completion_batch`] 1 and a zero
    /// [`Runner::flush_delay`], is the one-task-per-round-trip engine, for comparison.
    pub fn max_claim(mut self, max_claim: usize) -> Self {
        self.max_claim = max_claim;
        self
    }

    /// Caps the outcomes one completion statement records (default 1000, at least 1).
    pub fn max_completion_batch(mut self, max: usize) -> Self {
        self.max_completion_batch = max;
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
    /// (at least every second); at least [`Runner::MIN_MAX_QUEUE_WAIT`].
    pub fn max_queue_wait(mut self, wait: Duration) -> Self {
        self.max_queue_wait = wait;
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
    /// lease). Each instance records its lease in its row and is judged by it, not by
    /// the judge's, so instances sharing a database may use different leases (a rolling
    /// change of it robs no one). Within [`Runner::LEASES`], 1 s to a day.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Uses this pool (of the same database) for the tasks' own queries
    /// ([`TaskContext::connection`](crate::TaskContext::connection)) instead of opening
    /// one of [`Runner::task_connections`]. The engine's own connections are never
    /// taken from it.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Sizes the tasks' own pool (default: one connection per worker): its
    /// connections are opened only when a task asks for one
    /// ([`TaskContext::connection`](crate::TaskContext::connection), and a task's
    /// progress and checkpoint), and closed after a minute unused. Tasks that never
    /// ask cost none. At least 1.
    pub fn task_connections(mut self, connections: usize) -> Self {
        self.task_connections = Some(connections);
        self
    }

    /// Opens the instance's session on `url` instead of the database URL: the
    /// connection that LISTENs for wake-ups and cancels and holds the instance's name
    /// lock and the wake-up stripes, which must reach PostgreSQL itself (or a pooler
    /// in session mode). The database URL may then be a transaction pooler (PgBouncer
    /// in transaction mode): the engine keeps no session state on its connections
    /// there. One session per instance, whatever its workers.
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen = Listen::Url(url.into());
        self
    }

    /// Runs without a session: no notifications (the instance looks for work every
    /// [`Runner::poll_interval`], and hears cancels and queue changes at its
    /// heartbeat), no name lock (the instance's row and lease stand in for it:
    /// docs/operations.md, "Without a listener"), and the database URL may be a
    /// transaction pooler.
    pub fn without_listener(mut self) -> Self {
        self.listen = Listen::None;
        self
    }

    /// Names the instance (default: [`default_instance_name`]): 1 to 200 bytes,
    /// without control characters.
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// Sets the number of worker threads (1 to [`Runner::MAX_WORKERS`]) of the queue
    /// `default`, which the instance runs unless [`Runner::queue`] names others.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Runs `queue` with `workers` worker threads of its own (at least 1): at most that
    /// many of its tasks run here at once. Once called, the instance runs the queues
    /// named this way and no other (name `default` to keep it); [`Runner::workers`]
    /// no longer counts. The queues' workers add up to at most
    /// [`Runner::MAX_WORKERS`].
    pub fn queue(mut self, queue: impl Into<String>, workers: usize) -> Self {
        self.queues.push((queue.into(), workers));
        self
    }

    /// The queues this instance runs, with their workers.
    fn lanes(&self) -> Vec<(String, usize)> {
        if self.queues.is_empty() {
            vec![(DEFAULT_QUEUE.to_owned(), self.workers)]
        } else {
            self.queues.clone()
        }
    }

    /// Sets how long an idle worker sleeps before looking for work unprompted (at
    /// least [`Runner::MIN_POLL_INTERVAL`]).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The settings out of range, named as the builder method that set them.
    fn check(&self) -> Result<(), Error> {
        let refuse = |setting, reason: String| Err(Error::InvalidSetting { setting, reason });
        if !(1..=Self::MAX_WORKERS).contains(&self.workers) {
            return refuse("workers", format!("{} workers: from 1 to {}", self.workers, Self::MAX_WORKERS));
        }
        for (index, (queue, workers)) in self.queues.iter().enumerate() {
            if queue.is_empty() || queue.len() > 200 || queue.chars().any(char::is_control) {
                return refuse("queue", format!("{queue:?}: 1 to 200 bytes, without control characters"));
            }
            if *workers == 0 {
                return refuse("queue", format!("{queue}: 0 workers: at least 1"));
            }
            if self.queues[..index].iter().any(|(q, _)| q == queue) {
                return refuse("queue", format!("{queue}: named twice"));
            }
        }
        let total: usize = self.queues.iter().map(|(_, w)| *w).sum();
        if total > Self::MAX_WORKERS {
            return refuse("queue", format!("{total} workers in all: at most {}", Self::MAX_WORKERS));
        }
        if self.poll_interval < Self::MIN_POLL_INTERVAL {
            return refuse(
                "poll_interval",
                format!("{:?}: at least {:?}", self.poll_interval, Self::MIN_POLL_INTERVAL),
            );
        }
        if self.max_queue_wait < Self::MIN_MAX_QUEUE_WAIT {
            return refuse(
                "max_queue_wait",
                format!("{:?}: at least {:?}", self.max_queue_wait, Self::MIN_MAX_QUEUE_WAIT),
            );
        }
        if !Self::LEASES.contains(&self.lease) {
            return refuse("lease", format!("{:?}: from 1s to 1 day", self.lease));
        }
        if self.max_claim == 0 {
            return refuse("max_claim", "0: at least 1".into());
        }
        if self.timeout_grace > Duration::from_secs(86_400) {
            return refuse("timeout_grace", format!("{:?}: at most 1 day", self.timeout_grace));
        }
        if let Listen::Url(url) = &self.listen {
            if let Err(error) = url.parse::<postgres::Config>() {
                return refuse("listen_url", format!("{}: {error}", redact_url(url)));
            }
        }
        if self.task_connections == Some(0) {
            return refuse("task_connections", "0: at least 1".into());
        }
        if self.max_completion_batch == 0 {
            return refuse("max_completion_batch", "0: at least 1".into());
        }
        if let Some(name) = &self.instance {
            if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                return refuse("instance", format!("{name:?}: 1 to 200 bytes, without control characters"));
            }
        }
        Ok(())
    }

    /// Starts the instance's threads and returns the running instance. Fails, before
    /// it connects, on a setting out of its range ([`Error::InvalidSetting`]), and
    /// then if the database cannot be reached or the instance's name is in use.
    pub fn start(self) -> Result<RunningEngine, Error> {
        self.check()?;
        let declarations = match self.declarations.clone() {
            Some(declarations) => declarations,
            None => Declarations::from_inventory()?,
        };
        if let Some(warning) = unheard_warning(log::max_level()) {
            eprintln!("{warning}");
        }
        let queues = self.lanes();
        let workers: usize = queues.iter().map(|(_, w)| *w).sum();
        let instance = self.instance.clone().unwrap_or_else(default_instance_name);
        let connections = Connections::open(Plan {
            instance: &instance,
            database_url: &self.database_url,
            listen: self.listen.clone(),
            tasks: self.pool,
            task_connections: self.task_connections.unwrap_or(workers),
        })?;
        {
            let mut conn = connections.maintenance()?;
            let missing = migrate::missing_schema(&mut conn)?;
            if !missing.is_empty() {
                return Err(Error::Config(format!(
                    "the database at {} lacks the engine's schema ({} missing): run \
                     task_engine::run_migrations(&mut conn) (or `engine migrate`) first",
                    redact_url(&self.database_url),
                    missing.join(", ")
                )));
            }
            declared::apply_at_start(&mut conn, &declarations)?;
            for schedule in &self.schedules {
                add_schedule(&mut conn, schedule)?;
            }
        }
        let instance = assembly::start(Settings {
            instance,
            host: host_name(),
            registry: self.registry,
            connections,
            queues,
            buffer: self.buffer.unwrap_or(Self::DEFAULT_BUFFER_PER_WORKER.saturating_mul(workers)),
            max_claim: self.max_claim,
            poll_interval: self.poll_interval,
            max_queue_wait: self.max_queue_wait,
            lease: self.lease,
            flush_delay: self.flush_delay,
            max_completion_batch: self.max_completion_batch,
            timeout_grace: self.timeout_grace,
            declarations,
        })?;
        Ok(RunningEngine { instance })
    }
}

/// A running engine instance. Dropping it does not stop it: call
/// [`RunningEngine::shutdown`] (or [`StopHandle::stop`] then [`RunningEngine::join`]).
pub struct RunningEngine {
    instance: Instance,
}

impl RunningEngine {
    /// Returns the instance's name.
    pub fn instance(&self) -> &str {
        &self.instance.name
    }

    /// Returns the instance's counters.
    pub fn stats(&self) -> EngineStats {
        let Instance { counters: Counters { producer, completer, listener, heartbeat, vacuum, stripes }, .. } =
            &self.instance;
        let read = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::SeqCst);
        EngineStats {
            claims: read(&producer.claims),
            wasted_claims: read(&producer.wasted_claims),
            notifications: read(&listener.notifications),
            cancels_heard: read(&listener.cancels),
            cancels_found: read(&heartbeat.cancels_found),
            listener_connections: read(&listener.connections),
            listening: listener.listening.load(Ordering::SeqCst),
            sleeping_workers: self.instance.lanes.sleeping(),
            heartbeats: read(&heartbeat.heartbeats),
            rescue_passes: read(&heartbeat.rescue_passes),
            rescued: read(&heartbeat.rescued),
            queue_changes_seen: read(&heartbeat.queue_changes),
            completions: read(&completer.completions),
            completion_batches: read(&completer.batches),
            completion_failures: read(&completer.failures),
            succeeded: read(&completer.succeeded),
            retried: read(&completer.retried),
            interrupted: read(&completer.interrupted),
            failed: read(&completer.failed),
            marked_idle: stripes.marked_idle(),
            claimed_tasks: read(&producer.claimed_tasks),
            vacuums: read(&vacuum.vacuums),
            given_back: read(&producer.given_back),
            paused_claims: read(&producer.paused_claims),
            heartbeat_current: self.instance.alive.may_claim(std::time::Instant::now()),
            abandoned_workers: self.instance.crew.abandoned.load(Ordering::SeqCst),
        }
    }

    /// Returns a handle that stops the instance from another thread (a signal handler,
    /// say).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            instance: self.instance.name.clone(),
            shutdown: self.instance.shutdown.clone(),
            in_flight: Arc::clone(&self.instance.in_flight),
        }
    }

    /// Stops claiming and waits until the tasks in flight have finished and been
    /// recorded.
    pub fn shutdown(self) {
        self.stop_handle().stop();
        let _ = self.join();
    }

    /// Waits for the instance's threads to end (after a stop), and returns its counters
    /// as they end.
    ///
    /// In the order of the stop (see `instance/parts.rs`): the producers (they give
    /// back the tasks no worker started), the workers (they finish their tasks), the
    /// completer (it records every outcome, and ends with the last worker), the
    /// listener, the timer, the vacuum, cron and the watchdog; last the heartbeat,
    /// which kept the instance alive through all that (its attempts are never taken
    /// for lost while they run) and now removes its row.
    pub fn join(mut self) -> EngineStats {
        self.instance.join();
        let stats = self.stats();
        log::info!("instance {} stopped", self.instance.name);
        stats
    }
}

/// Stops an instance: no new claims; tasks in flight finish and are recorded.
#[derive(Clone)]
pub struct StopHandle {
    instance: String,
    shutdown: Shutdown,
    in_flight: Arc<InFlight>,
}

impl StopHandle {
    /// Asks the instance to stop; returns at once. Says in the log which tasks it
    /// waits for.
    pub fn stop(&self) {
        if self.shutdown.stop() {
            let mut ids = self.in_flight.ids();
            ids.sort_unstable();
            if ids.is_empty() {
                log::info!("instance {} stopping: no task in flight", self.instance);
            } else {
                let shown: Vec<String> = ids.iter().take(20).map(i64::to_string).collect();
                let more = if ids.len() > 20 { format!(" and {} more", ids.len() - 20) } else { String::new() };
                log::info!(
                    "instance {} stopping: waiting for the {} task(s) in flight to finish and be recorded (ids {}{more}; \
                     those no worker has started go back to the queue)",
                    self.instance,
                    ids.len(),
                    shown.join(", ")
                );
            }
        }
    }
}

/// What to say, once, when nothing would hear the engine's log: a task failing for good
/// would otherwise pass in silence. `Off` is the level of a program with no logger.
fn unheard_warning(level: log::LevelFilter) -> Option<&'static str> {
    (level == log::LevelFilter::Off).then_some(
        "task_engine: no logger is installed (log::max_level() is Off), so failed tasks, lost \
         connections and rescues will not be reported; install a `log` backend (env_logger, \
         fern, ...) before Runner::start",
    )
}

#[cfg(test)]
mod tests {
    use super::unheard_warning;
    use log::LevelFilter;

    /// A program may keep its engine in an `Arc` and read its counters from other
    /// threads, and stop it from a signal handler's.
    #[test]
    fn a_running_engine_and_its_stop_handle_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<super::RunningEngine>();
        shared::<super::StopHandle>();
    }

    #[test]
    fn a_program_without_a_logger_is_told_once_at_start() {
        assert!(unheard_warning(LevelFilter::Off).is_some_and(|w| w.contains("no logger is installed")));
        assert_eq!(unheard_warning(LevelFilter::Error), None);
        assert_eq!(unheard_warning(LevelFilter::Trace), None);
    }
}
