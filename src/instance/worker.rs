//! A worker thread: takes a claimed task from the hand-off, runs it with panics
//! contained, leaves its outcome with the completer, takes the next. Under a time
//! limit, the watchdog may abandon it: its slot (and outbox) goes to a new worker, and
//! when its task returns at last, it moves the task on itself and ends.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::attempt::{ClaimedTask, Completion, Outcome};
use crate::context::{Host, InstanceHandle, TaskContext};
use crate::db::completion;
use crate::error::Error;
use crate::instance::completer::Outbox;
use crate::instance::connections::Connections;
use crate::instance::handoff::Handoff;
use crate::instance::in_flight::InFlight;
use crate::instance::lock;
use crate::instance::server_clock::ServerClock;
use crate::instance::watchdog::{Watch, Watchdog};
use crate::registry::{Registry, RunFailure, TaskEntry};
use crate::task::TaskError;

/// The longest wait before a retry: a type's `retry_delay` beyond it (up to
/// `Duration::MAX`) would put the task past what the database and the clock can hold.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What a worker needs.
pub(crate) struct Input {
    /// Its number in the instance (recorded on executions; a worker put in the place
    /// of an abandoned one takes its number).
    pub index: usize,
    pub handoff: Arc<Handoff>,
    pub registry: Registry,
    /// Its place in the instance, with its way to the completer.
    pub slot: Arc<Slot>,
    /// What its tasks may see of the instance.
    pub instance: Arc<InstanceHandle>,
    /// Where its tasks' cancel flags are.
    pub in_flight: Arc<InFlight>,
    /// What its attempts are dated by.
    pub clock: Arc<ServerClock>,
    pub watchdog: Arc<Watchdog>,
    /// Where an abandoned attempt is recorded, on a maintenance connection.
    pub connections: Connections,
    /// How long a task past its time limit has to return before it is abandoned.
    pub grace: Duration,
    /// Starts a worker in this one's place, with its outbox (called by the watchdog).
    pub replace: Arc<dyn Fn(Outbox) + Send + Sync>,
}

/// A worker's place: its outbox while it holds the place, and the attempt it runs.
pub(crate) struct Slot(Mutex<SlotState>);

struct SlotState {
    /// Taken when the worker is abandoned, for the worker put in its place.
    outbox: Option<Outbox>,
    /// The execution id of the attempt running.
    running: Option<i64>,
}

impl Slot {
    pub(crate) fn new(outbox: Outbox) -> Self {
        Self(Mutex::new(SlotState { outbox: Some(outbox), running: None }))
    }

    /// Whether the worker was abandoned (its place given to another).
    pub(crate) fn abandoned(&self) -> bool {
        lock(&self.0).outbox.is_none()
    }

    fn start(&self, execution_id: i64) {
        lock(&self.0).running = Some(execution_id);
    }

    /// The attempt returned: hands its outcome to the completer, unless the worker was
    /// abandoned meanwhile (then gives it back).
    fn finish(&self, execution_id: i64, completion: Completion) -> Result<(), Completion> {
        let mut state = lock(&self.0);
        if state.running != Some(execution_id) {
            return Err(completion);
        }
        state.running = None;
        match &state.outbox {
            Some(outbox) => {
                outbox.submit(completion);
                Ok(())
            }
            None => Err(completion),
        }
    }

    /// Gives up on the attempt, if it still runs: returns the outbox for a new worker.
    fn abandon(&self, execution_id: i64) -> Option<Outbox> {
        let mut state = lock(&self.0);
        if state.running != Some(execution_id) {
            return None;
        }
        state.running = None;
        state.outbox.take()
    }
}

/// Runs tasks until the instance stops, or until it is abandoned and its task returns.
pub(crate) fn run(input: Input) {
    // The end of this worker's last attempt, as recorded: the next starts no earlier
    // in the record, whatever step the server's clock took between the two.
    let mut last_stopped = None;
    while let Some((task, _queued)) = input.handoff.next_task() {
        let (id, execution_id, attempt, max) = (task.id, task.execution_id, task.attempt, task.max_attempts);
        input.slot.start(execution_id);
        let (completion, entry) = execute(&input, task, last_stopped);
        let ran = completion.elapsed;
        last_stopped = Some(completion.stopped_at);
        if let Err(completion) = input.slot.finish(execution_id, completion) {
            // Timed out: retried per its policy, whatever it returned.
            let retry = (attempt < max).then(|| retry_delay(entry.as_ref(), attempt));
            release_abandoned(&input, &completion, retry);
            input.in_flight.forget([(id, execution_id)]);
            log::warn!("worker {} (abandoned) ended: task {id} returned at last", input.index);
            return;
        }
        input.handoff.task_done(ran);
    }
    log::debug!("worker {} stopped", input.index);
}

/// The task of an abandoned worker returned: its attempt was recorded as timed out;
/// the task is moved on as a timed-out attempt is, whatever it returned.
fn release_abandoned(input: &Input, completion: &Completion, retry: Option<Duration>) {
    let released = input.connections.maintenance().and_then(|mut conn| {
        completion::release_abandoned(&mut conn, &input.instance.name, completion, retry).map_err(Error::from)
    });
    if let Err(error) = released {
        log::error!(
            "task {}: its abandoned attempt returned, but the task could not be moved on ({error}); the rescue will \
             take it back once this instance has stopped",
            completion.task_id
        );
    }
}

/// The outcome of an attempt that passed its time limit and its grace: a failure,
/// retried per its policy.
fn timed_out_message(timeout: Duration, grace: Duration) -> String {
    format!("timed out after {timeout:?} (and a grace of {grace:?}): its worker was abandoned, its thread still ran")
}

/// Runs one attempt of `task`, dated on the server's clock and, in the record, not
/// before `not_before` (this worker's last attempt's end).
fn execute(input: &Input, task: ClaimedTask, not_before: Option<DateTime<Utc>>) -> (Completion, Option<TaskEntry>) {
    log::debug!("task {} ({}) attempt {} starting", task.id, task.task_type, task.attempt);
    let mut started = Instant::now();
    let (ran, stop, entry, started_at, finished) = match input.registry.get(&task.task_type) {
        Ok(entry) => {
            let timed_out = Arc::new(AtomicBool::new(false));
            let ctx = TaskContext {
                task_id: task.id,
                task_type: entry.name(),
                attempt: task.attempt,
                max_attempts: task.max_attempts,
                worker: input.index,
                cancelled: input.in_flight.cancel_flag(task.id),
                timed_out: Arc::clone(&timed_out),
                instance: Host::Instance(Arc::clone(&input.instance)),
                reported: Default::default(),
            };
            started = Instant::now();
            let timeout = task.timeout.or(entry.timeout());
            let started_at = input.clock.at(started).max(not_before.unwrap_or_default());
            let watch = timeout.map(|timeout| watch(input, &task, started_at, timeout, started, &timed_out));
            let ran = if ctx.cancel_requested() {
                // Cancelled while it waited for a worker: it never starts.
                Err(RunFailure::Task(TaskError::permanent("cancelled before it started")))
            } else {
                catch_unwind(AssertUnwindSafe(|| entry.run(&task.task_parameters, &ctx)))
                    .unwrap_or_else(|panic| Err(RunFailure::Panic(panic_message(&*panic))))
            };
            let finished = Instant::now();
            if let Some(token) = watch {
                input.watchdog.unwatch(token);
            }
            let ran = match (ran, timeout) {
                (Err(failure), Some(timeout)) if ctx.timed_out() => Err(RunFailure::Task(TaskError::new(format!(
                    "timed out after {timeout:?}: {}",
                    failure.into_message()
                )))),
                (ran, _) => ran,
            };
            // What the task reported in its last second, before its outcome.
            if let Err(error) = ctx.write(&mut ctx.reported()) {
                log::warn!(
                    "task {} ({}): its last progress or checkpoint was not saved: {error}",
                    task.id,
                    entry.name()
                );
            }
            (ran, Stop::of(&ctx), Some(*entry), started_at, finished)
        }
        // Claims ask only for registered types; this is a registry changed under us.
        Err(error) => {
            let started_at = input.clock.at(started).max(not_before.unwrap_or_default());
            (Err(RunFailure::Parameters(error.to_string())), Stop::NotAsked, None, started_at, Instant::now())
        }
    };
    let elapsed = finished.duration_since(started);
    let outcome = outcome(&task, entry.as_ref(), ran, stop, elapsed);
    // Dated once, before the run (the watchdog's record has the same start).
    let stopped_at = input.clock.at(finished).max(started_at);
    (attempt_ended(input, &task, started_at, stopped_at, elapsed, outcome), entry)
}

/// The record of an attempt of `task` by this worker.
fn attempt_ended(
    input: &Input,
    task: &ClaimedTask,
    started_at: DateTime<Utc>,
    stopped_at: DateTime<Utc>,
    elapsed: Duration,
    outcome: Outcome,
) -> Completion {
    Completion {
        execution_id: task.execution_id,
        task_id: task.id,
        attempt: task.attempt,
        worker: i32::try_from(input.index).unwrap_or(i32::MAX),
        started_at,
        stopped_at,
        elapsed,
        outcome,
        frees_a_place: task.limited,
    }
}

/// Puts an attempt under the watchdog: asked to stop at `timeout`, abandoned a grace
/// later. Abandoning records the attempt as timed out, frees the worker's place in
/// the hand-off, and starts a worker in its place with its outbox.
fn watch(
    input: &Input,
    task: &ClaimedTask,
    started_at: DateTime<Utc>,
    timeout: Duration,
    started: Instant,
    timed_out: &Arc<AtomicBool>,
) -> u64 {
    let (slot, handoff, replace, instance) =
        (Arc::clone(&input.slot), Arc::clone(&input.handoff), Arc::clone(&input.replace), Arc::clone(&input.instance));
    let connections = input.connections.clone();
    let grace = input.grace;
    let stopped_at = input.clock.at(started + timeout + grace).max(started_at);
    let failed = Outcome::Failed(timed_out_message(timeout, grace));
    let record = attempt_ended(input, task, started_at, stopped_at, timeout + grace, failed);
    let (id, index) = (task.id, input.index);
    input.watchdog.watch(Watch {
        task_id: task.id,
        deadline: started + timeout,
        grace,
        stop: Arc::clone(timed_out),
        abandon: Box::new(move || {
            let Some(outbox) = slot.abandon(record.execution_id) else { return };
            log::error!(
                "task {id}: did not return within its time limit of {timeout:?} and a grace of {grace:?}; worker \
                 {index} is abandoned (a thread cannot be killed) and another takes its place; the task runs again \
                 only once this attempt returns, or its instance is gone"
            );
            // The place first: a record that waits for the database must not cost it.
            handoff.task_done(timeout + grace);
            replace(outbox);
            // A connection that cannot be opened is not waited for long (its connect
            // timeout): the watchdog has other deadlines.
            let recorded = connections.maintenance().and_then(|mut conn| {
                completion::record_timed_out(&mut conn, &instance.name, &record).map_err(Error::from)
            });
            if let Err(error) = recorded {
                log::error!(
                    "task {id}: its timed-out attempt could not be recorded yet ({error}): it will be when it returns, \
                     or by the rescue if its instance dies first"
                );
            }
        }),
    })
}

/// Why the engine asked a task to stop, if it did, in the order the reasons win: an
/// operator's cancel, then the time limit, then the instance's stop.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    NotAsked,
    Cancelled,
    TimedOut,
    /// Its instance stops (a deploy, Ctrl-C): what the task returns unless it succeeds
    /// is an interrupt, not a failure.
    InstanceStops,
}

impl Stop {
    /// Read once the attempt has returned.
    fn of(ctx: &TaskContext) -> Self {
        if ctx.cancel_requested() {
            Self::Cancelled
        } else if ctx.timed_out() {
            Self::TimedOut
        } else if ctx.instance.stopping().load(std::sync::atomic::Ordering::Relaxed) {
            Self::InstanceStops
        } else {
            Self::NotAsked
        }
    }
}

/// What an attempt's result means for its task: a success, a snooze, a failure for
/// good (a permanent error, the last attempt, a cancelled task), an interrupt (any
/// other error once its instance stops: the task waits again at once, using no
/// attempt), or a retry after the type's delay.
fn outcome(
    task: &ClaimedTask,
    entry: Option<&TaskEntry>,
    ran: Result<serde_json::Value, RunFailure>,
    stop: Stop,
    elapsed: Duration,
) -> Outcome {
    let cancelled = stop == Stop::Cancelled;
    let (id, task_type, attempt, max) = (task.id, &task.task_type, task.attempt, task.max_attempts);
    let failure = match ran {
        Ok(result) => {
            log::debug!("task {id} ({task_type}) succeeded in {elapsed:?}");
            return Outcome::Succeeded(result);
        }
        Err(failure) => failure,
    };
    let permanent = failure.is_permanent();
    let snoozed = failure.snoozed_for();
    let message = failure.into_message();
    if let (Some(delay), false) = (snoozed, cancelled) {
        let delay = delay.min(MAX_RETRY_DELAY);
        log::debug!("task {id} ({task_type}) attempt {attempt} snoozed for {delay:?}");
        return Outcome::Snoozed { delay };
    }
    if cancelled {
        log::warn!("task {id} ({task_type}) attempt {attempt}/{max} failed after its cancellation: {message}");
        Outcome::Failed(message)
    } else if !permanent && stop == Stop::InstanceStops {
        log::info!("task {id} ({task_type}) attempt {attempt} interrupted by its instance's stop: {message}");
        Outcome::Interrupted(message)
    } else if permanent || attempt >= max {
        let why = if permanent { "permanently" } else { "on its last attempt" };
        log::error!("task {id} ({task_type}) attempt {attempt}/{max} failed {why}: {message}");
        Outcome::Failed(message)
    } else {
        let delay = retry_delay(entry, attempt);
        log::warn!("task {id} ({task_type}) attempt {attempt}/{max} failed: {message}; retry in {delay:.1?}");
        Outcome::Retry { error: message, delay }
    }
}

/// The wait before the attempt after failed attempt `attempt`: the type's
/// `retry_delay`, which is its own code, contained like its run.
fn retry_delay(entry: Option<&TaskEntry>, attempt: i32) -> Duration {
    catch_unwind(AssertUnwindSafe(|| entry.map(|e| e.retry_delay(attempt)).unwrap_or_default()))
        .unwrap_or_else(|_| crate::retry::default_retry_delay(attempt))
        .min(MAX_RETRY_DELAY)
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic with a payload that is not a string".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        let a = catch_unwind(|| panic!("plain")).unwrap_err();
        let b = catch_unwind(|| std::panic::panic_any(format!("formatted {}", 42))).unwrap_err();
        assert!(b.downcast_ref::<String>().is_some(), "the payload is meant to be a String");
        assert_eq!(panic_message(&*a), "plain");
        assert_eq!(panic_message(&*b), "formatted 42");
    }

    fn attempt(attempt: i32, max_attempts: i32) -> ClaimedTask {
        ClaimedTask {
            id: 1,
            task_type: "t".into(),
            task_parameters: "null".into(),
            attempt,
            max_attempts,
            execution_id: 1,
            claimed_at: chrono::Utc::now(),
            limited: false,
            timeout: None,
        }
    }

    fn failed(message: &str) -> Result<serde_json::Value, RunFailure> {
        Err(RunFailure::Task(TaskError::new(message)))
    }

    #[test]
    fn a_failure_is_retried_until_the_last_attempt_unless_permanent_or_cancelled() {
        let none = Duration::ZERO;
        let retried = outcome(&attempt(1, 3), None, failed("busy"), Stop::NotAsked, none);
        assert_eq!(retried, Outcome::Retry { error: "busy".into(), delay: Duration::ZERO });
        assert!(matches!(outcome(&attempt(2, 3), None, failed("busy"), Stop::NotAsked, none), Outcome::Retry { .. }));
        assert_eq!(outcome(&attempt(3, 3), None, failed("busy"), Stop::NotAsked, none), Outcome::Failed("busy".into()));
        let permanent = Err(RunFailure::Task(TaskError::permanent("no such customer")));
        assert_eq!(
            outcome(&attempt(1, 3), None, permanent, Stop::NotAsked, none),
            Outcome::Failed("no such customer".into())
        );
        assert_eq!(
            outcome(&attempt(1, 3), None, failed("stopped"), Stop::Cancelled, none),
            Outcome::Failed("stopped".into())
        );
        let panicked = Err(RunFailure::Panic("oops".into()));
        assert!(matches!(outcome(&attempt(1, 3), None, panicked, Stop::NotAsked, none), Outcome::Retry { .. }));
        assert_eq!(
            outcome(&attempt(1, 3), None, Ok(serde_json::json!(5)), Stop::Cancelled, none),
            Outcome::Succeeded(serde_json::json!(5)),
            "a cancelled task that succeeds has succeeded"
        );
    }

    #[test]
    fn a_cancel_wins_then_the_time_limit_then_the_instance_s_stop_interrupts() {
        let none = Duration::ZERO;
        // On its last attempt: an interrupt uses none.
        let stopped = outcome(&attempt(3, 3), None, failed("stopping"), Stop::InstanceStops, none);
        assert_eq!(stopped, Outcome::Interrupted("stopping".into()));
        let panicked = Err(RunFailure::Panic("oops".into()));
        assert_eq!(
            outcome(&attempt(1, 3), None, panicked, Stop::InstanceStops, none),
            Outcome::Interrupted("panicked: oops".into())
        );
        assert_eq!(
            outcome(&attempt(1, 3), None, failed("stopping"), Stop::Cancelled, none),
            Outcome::Failed("stopping".into()),
            "a cancel requested wins"
        );
        assert!(
            matches!(outcome(&attempt(1, 3), None, failed("timed out"), Stop::TimedOut, none), Outcome::Retry { .. }),
            "past its time limit, a task is timed out: an attempt used"
        );
        let permanent = Err(RunFailure::Task(TaskError::permanent("no such customer")));
        assert_eq!(
            outcome(&attempt(1, 3), None, permanent, Stop::InstanceStops, none),
            Outcome::Failed("no such customer".into()),
            "a permanent error stands"
        );
        assert_eq!(
            outcome(&attempt(1, 3), None, Ok(serde_json::json!(5)), Stop::InstanceStops, none),
            Outcome::Succeeded(serde_json::json!(5))
        );
        let snoozed = Err(RunFailure::Task(TaskError::snooze(Duration::from_secs(5))));
        assert!(matches!(outcome(&attempt(1, 3), None, snoozed, Stop::InstanceStops, none), Outcome::Snoozed { .. }));
    }
}
