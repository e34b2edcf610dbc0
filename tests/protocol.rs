//! A model of the engine's protocol, checked exhaustively with stateright for two
//! instances and one or two tasks: claims, the hand-off to workers, runs, completions,
//! heartbeats that stall and recover, leases that expire, rescues (of dead instances,
//! of ghosts, of a previous self), crashes, restarts under the same name, graceful
//! stops, rows deleted by hand, claims whose answer is lost, workers abandoned past a
//! task's time limit (their thread runs on until the task returns).
//!
//! The model is of the protocol, not of the code: each action is one statement or one
//! decision of the engine (`db/`, `instance/`), named after it. It checks:
//!
//! - never two attempts of a task running at once, by the runs themselves (not by the
//!   executions table);
//! - a live instance is never robbed: while it runs an attempt, that attempt stays open;
//! - every claimed task ends recorded, once no crash or stall is left to happen;
//! - each attempt's execution is written once (by its completion, or by the rescue
//!   that finds it lost), never twice, and every attempt a task used has one;
//! - a name passes to a newcomer only from a dead instance.
//!
//! "While every instance follows the protocol": a live instance renews its lease in
//! time. Its heartbeat may stall (it then stops claiming), but only a dead instance's
//! lease runs out; a partition longer than the lease is outside the promise
//! (docs/operations.md, "Partitions", says what it costs).
//!
//! Each instance runs with a listener, whose session holds the instance's name lock, or
//! with `--listen-url none`: no session of its own, so no name lock, and its row with
//! its lease stands in for it. A newcomer under a name (a restart, or a second process
//! given the same name, which the model lets start whether or not the previous one still
//! runs) takes it only once the previous holder is dead by what the database shows: with
//! a listener, once it holds the lock and the row, if fresh, is not of an instance
//! without a listener; without, once the previous holder is dead by the rescue's rule
//! (its row stale by its lease, or gone while nobody holds the lock), checked in the
//! statement that registers it. Until then it waits, and refuses to start if the row
//! keeps being renewed. Nobody ever holds the name of an instance without a listener, so
//! its row, once gone, makes it dead at once: rows of live instances without a listener
//! must not be deleted by hand (outside the promise; the model deletes only dead ones'),
//! while a live instance with a listener survives that. The model holds with every
//! instance without a listener, and in mixed fleets (one of each, or a restart that
//! changes `--listen-url`). Wake-ups are not modelled: polling instead of LISTEN changes
//! only how soon a step happens.
//!
//! The same model with one of the engine's rules undone must fail, and does (the
//! last tests): the heartbeat stopping at a graceful stop instead of outliving the
//! drain, an instance without a row taken for dead while it holds its name, a
//! timed-out task retried while its abandoned thread still runs it, an instance
//! retiring before its abandoned workers return, a newcomer taking its name under a
//! fresh row of an instance without a listener, two newcomers without a listener that
//! saw the row stale registering without checking it again, and an instance without a
//! listener taking a row-less instance for dead without reading the name locks. Outside
//! the promise it fails too: in a partition, and when a live row of an instance without
//! a listener is deleted by hand.

use std::fmt::Debug;
use std::hash::Hash;

use stateright::{Checker, Model, Property};

const INSTANCES: usize = 2;
/// The instance that may crash, stall, stop or lose its row; the other (1) only
/// stalls, so that someone is left to rescue.
const FRAGILE: usize = 0;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Status {
    Waiting,
    /// Claimed by an instance for an attempt.
    Running {
        instance: usize,
        attempt: u8,
    },
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Task {
    status: Status,
    attempts: u8,
    /// The attempt the task row shows running (its execution is written when it ends).
    open: Option<u8>,
    /// The attempts whose execution is written.
    recorded: Vec<u8>,
    /// Attempts really running now, and where: the tasks' own record.
    runs: Vec<(usize, u8)>,
    /// The attempt whose outcome ended the task.
    ended_by: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lease {
    /// Heartbeats succeed: the instance may claim.
    Live,
    /// Its heartbeat fails or is stuck: it claims nothing (half a lease gone).
    Late,
    /// A whole lease without a heartbeat: others may take it for dead.
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Instance {
    /// Run with a listener (its row says so).
    listener: bool,
    alive: bool,
    stopping: bool,
    has_row: bool,
    holds_name: bool,
    lease: Lease,
    /// Claimed and waiting for a worker (the hand-off).
    queued: Vec<(usize, u8)>,
    /// Running on a worker.
    running: Vec<(usize, u8)>,
    /// Ended, the outcome with the completer.
    ended: Vec<(usize, u8)>,
    /// Running on a worker the watchdog abandoned (recorded as timed out): the thread
    /// runs on until the task returns.
    abandoned: Vec<(usize, u8)>,
    /// What is left of the environment's budget for this instance.
    crashes: u8,
    stalls: u8,
    row_deletions: u8,
    lost_answers: u8,
    timeouts: u8,
}

impl Instance {
    /// A new instance, registered; with a listener, its session holds its name lock
    /// (without one, nobody ever holds it).
    fn new(fragile: bool, listener: bool) -> Self {
        Instance {
            listener,
            alive: true,
            stopping: false,
            has_row: true,
            holds_name: listener,
            lease: Lease::Live,
            queued: Vec::new(),
            running: Vec::new(),
            ended: Vec::new(),
            abandoned: Vec::new(),
            crashes: u8::from(fragile),
            stalls: 1,
            row_deletions: u8::from(fragile),
            lost_answers: u8::from(fragile),
            timeouts: 1,
        }
    }

    /// Whether the attempt is in flight here (the rescue of ghosts spares these).
    fn in_flight(&self, attempt: (usize, u8)) -> bool {
        self.queued.contains(&attempt)
            || self.running.contains(&attempt)
            || self.ended.contains(&attempt)
            || self.abandoned.contains(&attempt)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    tasks: Vec<Task>,
    instances: Vec<Instance>,
    /// Restarts left for the fragile instance, and graceful stops.
    restarts: u8,
    stops: u8,
    /// Newcomers without a listener that saw their name's row stale and have not
    /// registered yet (only when they register without checking it again).
    newcomers: u8,
    /// A newcomer took its name while the previous holder was alive.
    name_taken_from_the_living: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// The producer's claim statement (lease current, not stopping).
    Claim(usize, usize),
    /// A claim that committed while its answer was lost with the connection.
    ClaimAnswerLost(usize, usize),
    /// A worker takes a claimed task from the hand-off.
    Start(usize, usize, u8),
    /// The task's run ends; its outcome goes to the completer.
    End(usize, usize, u8),
    /// The completion statement: only if the task is still on that attempt, open.
    Record(usize, usize, u8),
    /// The producer's release of a claimed task no worker started (at a stop).
    GiveBack(usize, usize, u8),
    HeartbeatFails(usize),
    HeartbeatSucceeds(usize),
    /// The process dies (kill -9): its runs end without outcome, its session goes.
    Crash(usize),
    /// A dead instance's lease runs out.
    LeaseExpires(usize),
    /// An operator deletes the instance's row.
    DeleteRow(usize),
    /// A rescue pass of `rescuer` over the tasks of dead instances.
    RescueDead(usize),
    /// A rescue pass of an instance over its own ghosts.
    RescueGhosts(usize),
    /// A new process starts under the instance's name, takes the name (with a listener,
    /// its lock; without, its row), registers and recovers its previous self.
    Restart(usize),
    /// A newcomer without a listener sees its name's row stale and will register later
    /// (only when it registers without checking the row again).
    SeesTheNameFree(usize),
    /// A graceful stop (SIGTERM): no more claims, tasks in flight finish.
    Stop(usize),
    /// The instance has recorded its last attempt: it removes its row and name.
    Retire(usize),
    /// The watchdog gives up on a running attempt past its time limit and grace: it
    /// records the attempt as timed out; its thread runs on.
    Abandon(usize, usize, u8),
    /// An abandoned attempt's task returns at last: its task moves on (retried, or
    /// ended), no second execution written.
    Return(usize, usize, u8),
}

/// The protocol in a fleet with or without listeners, with switches to undo its rules,
/// and two to step outside it.
#[derive(Clone)]
struct Protocol {
    tasks: usize,
    max_attempts: u8,
    /// Which instances run with a listener, whose session holds the instance's name
    /// lock; the others run with `--listen-url none`: no session of their own, their row
    /// and its lease stand in for the lock.
    listeners: [bool; INSTANCES],
    /// The fragile instance restarts with the other choice (a deploy that changes
    /// `--listen-url`).
    switches_mode_at_restart: bool,
    /// The heartbeat goes on through a graceful stop until the last attempt is recorded.
    heartbeat_outlives_the_drain: bool,
    /// An instance without a row is dead only if it does not hold its name lock.
    rowless_needs_a_free_name: bool,
    /// An outcome changes its task only if the task is still on that attempt, open.
    outcomes_name_their_attempt: bool,
    /// The heartbeat takes back the tasks marked running here that no worker here has.
    rescues_own_ghosts: bool,
    /// Outside the protocol: a live instance's heartbeat stalls for a whole lease (a
    /// partition), and others take it for dead while its attempts run.
    partitions: bool,
    /// A timed-out task stays held by its instance until its abandoned thread returns.
    abandoned_tasks_stay_held: bool,
    /// A stopped instance stays registered until its abandoned workers return.
    retire_waits_for_the_abandoned: bool,
    /// A newcomer without a listener takes its name only once the previous holder is
    /// dead by the rescue's rule (its row stale by its lease: a live instance renews in
    /// time); one with a listener, once it holds the lock and the row, if fresh, is not
    /// of an instance without a listener.
    newcomer_waits_for_a_stale_row: bool,
    /// Without a listener, an instance still reads the name locks (`pg_locks`) before it
    /// takes a row-less instance for dead: instances with a listener hold theirs.
    name_locks_read_without_a_listener: bool,
    /// Without a listener, a newcomer checks the row in the statement that registers it
    /// (a second newcomer then finds the row fresh).
    newcomer_registers_as_it_checks: bool,
    /// Outside the promise without a listener: an operator deletes a live instance's row.
    deletes_live_rows_without_a_listener: bool,
}

impl Protocol {
    fn new(tasks: usize) -> Self {
        Protocol {
            tasks,
            max_attempts: 3,
            heartbeat_outlives_the_drain: true,
            rowless_needs_a_free_name: true,
            outcomes_name_their_attempt: true,
            rescues_own_ghosts: true,
            partitions: false,
            abandoned_tasks_stay_held: true,
            retire_waits_for_the_abandoned: true,
            listeners: [true; INSTANCES],
            switches_mode_at_restart: false,
            newcomer_waits_for_a_stale_row: true,
            name_locks_read_without_a_listener: true,
            newcomer_registers_as_it_checks: true,
            deletes_live_rows_without_a_listener: false,
        }
    }

    /// The protocol with `--listen-url none` on every instance.
    fn without_listeners(tasks: usize) -> Self {
        Protocol { listeners: [false; INSTANCES], ..Protocol::new(tasks) }
    }

    /// Whether any step of the engine (not of its environment: crashes, stalls,
    /// deleted rows, lost answers, stops and restarts) can still happen; time passing
    /// (a lease running out) and a stalled heartbeat coming back are steps too.
    fn can_progress(&self, s: &State) -> bool {
        let mut actions = Vec::new();
        self.actions(s, &mut actions);
        actions.iter().any(|action| match action {
            Action::ClaimAnswerLost(..)
            | Action::HeartbeatFails(_)
            | Action::Crash(_)
            | Action::DeleteRow(_)
            | Action::Restart(_)
            | Action::SeesTheNameFree(_)
            | Action::Stop(_) => false,
            Action::LeaseExpires(i) => !s.instances[*i].alive || !self.partitions,
            _ => true,
        })
    }

    /// Whether an instance (with a listener or not) may take `instance` for dead
    /// (RESCUE_DEAD's condition).
    fn dead(&self, judge_has_listener: bool, instance: &Instance) -> bool {
        if instance.has_row {
            instance.lease == Lease::Expired
        } else {
            !self.rowless_needs_a_free_name
                || !instance.holds_name
                || (!judge_has_listener && !self.name_locks_read_without_a_listener)
        }
    }

    /// Whether a newcomer (with a listener or not) may take the name `inst` had. With a
    /// listener, once it holds the name lock (the previous holder's session is gone) and
    /// the row, if fresh, was written by an instance with a listener; without, once the
    /// previous holder is dead by the rescue's rule: its row stale by its lease, or gone
    /// while nobody holds the lock. Neither asks whether the previous holder is alive:
    /// only what the database shows.
    fn name_free(&self, newcomer_has_listener: bool, inst: &Instance) -> bool {
        if newcomer_has_listener {
            !inst.holds_name
                && (!self.newcomer_waits_for_a_stale_row
                    || inst.listener
                    || !inst.has_row
                    || inst.lease == Lease::Expired)
        } else {
            !self.newcomer_waits_for_a_stale_row || self.dead(false, inst)
        }
    }

    /// Whether the fragile instance's newcomer runs with a listener.
    fn newcomer_has_listener(&self) -> bool {
        self.listeners[FRAGILE] != self.switches_mode_at_restart
    }

    /// Whether an operator may delete the instance's row: with a listener, while it runs
    /// (its name lock keeps it from being taken for dead); without, once it is dead (a
    /// live one's row is outside the promise, unless that is what is checked).
    fn row_deletable(&self, inst: &Instance) -> bool {
        if inst.listener {
            inst.alive
        } else {
            !inst.alive || self.deletes_live_rows_without_a_listener
        }
    }
}

/// Closes a task's attempt as lost and puts it back to waiting (or ends it after its
/// last attempt).
fn lose(task: &mut Task, max_attempts: u8) {
    // An attempt recorded as timed out is not recorded again.
    if !task.recorded.contains(&task.attempts) {
        task.recorded.push(task.attempts);
    }
    task.open = None;
    task.status = if task.attempts >= max_attempts { Status::Done } else { Status::Waiting };
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let task = Task {
            status: Status::Waiting,
            attempts: 0,
            open: None,
            recorded: Vec::new(),
            runs: Vec::new(),
            ended_by: None,
        };
        vec![State {
            tasks: vec![task; self.tasks],
            instances: (0..INSTANCES).map(|i| Instance::new(i == FRAGILE, self.listeners[i])).collect(),
            // Two newcomers at once, where registering without checking again lets both in.
            restarts: if self.newcomer_registers_as_it_checks { 1 } else { 2 },
            stops: 1,
            newcomers: 0,
            name_taken_from_the_living: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (i, inst) in s.instances.iter().enumerate() {
            if inst.alive {
                if !inst.stopping && inst.lease == Lease::Live {
                    for (t, task) in s.tasks.iter().enumerate() {
                        if task.status == Status::Waiting && task.attempts < self.max_attempts {
                            actions.push(Action::Claim(i, t));
                            if inst.lost_answers > 0 {
                                actions.push(Action::ClaimAnswerLost(i, t));
                            }
                        }
                    }
                }
                // After a stop, queued tasks are given back, not started.
                for &(t, a) in &inst.queued {
                    actions.push(if inst.stopping { Action::GiveBack(i, t, a) } else { Action::Start(i, t, a) });
                }
                actions.extend(inst.running.iter().map(|&(t, a)| Action::End(i, t, a)));
                if inst.timeouts > 0 {
                    actions.extend(inst.running.iter().map(|&(t, a)| Action::Abandon(i, t, a)));
                }
                actions.extend(inst.ended.iter().map(|&(t, a)| Action::Record(i, t, a)));
                if inst.lease == Lease::Live && inst.stalls > 0 {
                    actions.push(Action::HeartbeatFails(i));
                }
                if inst.lease == Lease::Late || (self.partitions && inst.lease == Lease::Expired) {
                    actions.push(Action::HeartbeatSucceeds(i));
                }
                if inst.crashes > 0 {
                    actions.push(Action::Crash(i));
                }
                // Rescue passes, when they would take something.
                let dead: Vec<bool> = s.instances.iter().map(|other| self.dead(inst.listener, other)).collect();
                let lost_elsewhere = s.tasks.iter().any(
                    |task| matches!(task.status, Status::Running { instance, .. } if instance != i && dead[instance]),
                );
                if inst.lease == Lease::Live && lost_elsewhere {
                    actions.push(Action::RescueDead(i));
                }
                let ghost = s.tasks.iter().enumerate().any(|(t, task)| {
                    matches!(task.status, Status::Running { instance, attempt }
                        if instance == i && !inst.in_flight((t, attempt)))
                });
                if ghost && self.rescues_own_ghosts {
                    actions.push(Action::RescueGhosts(i));
                }
                if !inst.stopping && i == FRAGILE && s.stops > 0 {
                    actions.push(Action::Stop(i));
                }
                let drained = inst.queued.is_empty() && inst.running.is_empty() && inst.ended.is_empty();
                if inst.stopping && drained && (inst.abandoned.is_empty() || !self.retire_waits_for_the_abandoned) {
                    actions.push(Action::Retire(i));
                }
            }
            // An abandoned thread returns whenever its task does, even after its instance
            // retired (in a program that goes on after the stop).
            actions.extend(inst.abandoned.iter().map(|&(t, a)| Action::Return(i, t, a)));
            // A dead instance's lease runs out; a stopping one's too, if its heartbeat
            // ended with the stop; a stalled one's, in a partition.
            let silent = !inst.alive
                || (inst.stopping && !self.heartbeat_outlives_the_drain)
                || (self.partitions && inst.lease == Lease::Late);
            if silent && inst.lease != Lease::Expired {
                actions.push(Action::LeaseExpires(i));
            }
            if inst.has_row && inst.row_deletions > 0 && self.row_deletable(inst) {
                actions.push(Action::DeleteRow(i));
            }
            // A new process under the fragile instance's name, whether or not the previous
            // one still runs: the database's view decides.
            if i == FRAGILE {
                let listener = self.newcomer_has_listener();
                let checks_again = listener || self.newcomer_registers_as_it_checks;
                if s.restarts > 0 && self.name_free(listener, inst) {
                    actions.push(if checks_again { Action::Restart(i) } else { Action::SeesTheNameFree(i) });
                }
                if s.newcomers > 0 {
                    actions.push(Action::Restart(i));
                }
            }
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut s = s.clone();
        match action {
            Action::Claim(i, t) | Action::ClaimAnswerLost(i, t) => {
                let task = &mut s.tasks[t];
                task.attempts += 1;
                task.status = Status::Running { instance: i, attempt: task.attempts };
                task.open = Some(task.attempts);
                if let Action::Claim(..) = action {
                    s.instances[i].queued.push((t, task.attempts));
                } else {
                    s.instances[i].lost_answers -= 1;
                }
            }
            Action::Start(i, t, a) => {
                s.instances[i].queued.retain(|&x| x != (t, a));
                s.instances[i].running.push((t, a));
                s.tasks[t].runs.push((i, a));
            }
            Action::End(i, t, a) => {
                s.instances[i].running.retain(|&x| x != (t, a));
                s.instances[i].ended.push((t, a));
                s.tasks[t].runs.retain(|&x| x != (i, a));
            }
            Action::Record(i, t, a) => {
                s.instances[i].ended.retain(|&x| x != (t, a));
                let task = &mut s.tasks[t];
                // The completion changes nothing unless the task is still running
                // this attempt with its execution open.
                let current =
                    matches!(task.status, Status::Running { attempt, .. } if attempt == a) && task.open == Some(a);
                if current || !self.outcomes_name_their_attempt {
                    task.recorded.push(a);
                    task.open = None;
                    task.status = Status::Done;
                    task.ended_by = Some(a);
                }
            }
            Action::GiveBack(i, t, a) => {
                s.instances[i].queued.retain(|&x| x != (t, a));
                let task = &mut s.tasks[t];
                if matches!(task.status, Status::Running { attempt, .. } if attempt == a) && task.open == Some(a) {
                    task.open = None;
                    task.attempts -= 1;
                    task.status = Status::Waiting;
                }
            }
            Action::HeartbeatFails(i) => {
                s.instances[i].lease = Lease::Late;
                s.instances[i].stalls -= 1;
            }
            Action::HeartbeatSucceeds(i) => {
                let inst = &mut s.instances[i];
                inst.lease = Lease::Live;
                inst.has_row = true; // registered again if it was gone
            }
            Action::LeaseExpires(i) if s.instances[i].alive => {
                // A partition: the instance's heartbeat never came back in time.
                s.instances[i].lease = Lease::Expired;
                s.instances[i].stalls = 0;
            }
            Action::Crash(i) => {
                let inst = &mut s.instances[i];
                for &(t, a) in &inst.running {
                    s.tasks[t].runs.retain(|&x| x != (i, a));
                }
                inst.alive = false;
                inst.holds_name = false;
                inst.crashes -= 1;
                for &(t, a) in &inst.abandoned {
                    s.tasks[t].runs.retain(|&x| x != (i, a));
                }
                inst.queued.clear();
                inst.running.clear();
                inst.ended.clear();
                inst.abandoned.clear();
            }
            Action::LeaseExpires(i) => s.instances[i].lease = Lease::Expired,
            Action::DeleteRow(i) => {
                s.instances[i].has_row = false;
                s.instances[i].row_deletions -= 1;
            }
            Action::RescueDead(rescuer) => {
                let judge = s.instances[rescuer].listener;
                let dead: Vec<bool> = s.instances.iter().map(|inst| self.dead(judge, inst)).collect();
                for task in &mut s.tasks {
                    if let Status::Running { instance, .. } = task.status {
                        if instance != rescuer && dead[instance] {
                            lose(task, self.max_attempts);
                        }
                    }
                }
            }
            Action::RescueGhosts(i) => {
                for t in 0..s.tasks.len() {
                    if let Status::Running { instance, attempt } = s.tasks[t].status {
                        if instance == i && !s.instances[i].in_flight((t, attempt)) {
                            lose(&mut s.tasks[t], self.max_attempts);
                        }
                    }
                }
            }
            Action::SeesTheNameFree(_) => {
                s.restarts -= 1;
                s.newcomers += 1;
            }
            Action::Restart(i) => {
                let old = &s.instances[i];
                let listener = self.newcomer_has_listener();
                s.name_taken_from_the_living |= old.alive;
                s.instances[i] = if old.alive {
                    // Only with a rule undone or the promise broken: a namesake takes the
                    // name beside a live instance. The model keeps one slot per name: the
                    // live one's work stays in it, the newcomer's claims join it, and the
                    // newcomer's rescue of its "previous self" below takes that work.
                    Instance {
                        listener,
                        has_row: true,
                        holds_name: old.holds_name || listener,
                        lease: Lease::Live,
                        ..old.clone()
                    }
                } else {
                    Instance { stalls: old.stalls, ..Instance::new(false, listener) }
                };
                if s.newcomers > 0 {
                    s.newcomers -= 1;
                } else {
                    s.restarts -= 1;
                }
                // The previous self's tasks, at once: the name was free, so it is dead.
                for task in &mut s.tasks {
                    if matches!(task.status, Status::Running { instance, .. } if instance == i) {
                        lose(task, self.max_attempts);
                    }
                }
            }
            Action::Stop(i) => {
                s.instances[i].stopping = true;
                s.stops -= 1;
            }
            Action::Abandon(i, t, a) => {
                let inst = &mut s.instances[i];
                inst.running.retain(|&x| x != (t, a));
                inst.abandoned.push((t, a));
                inst.timeouts -= 1;
                let task = &mut s.tasks[t];
                if matches!(task.status, Status::Running { instance, attempt } if instance == i && attempt == a)
                    && task.open == Some(a)
                {
                    task.recorded.push(a);
                    task.open = None;
                    if !self.abandoned_tasks_stay_held {
                        task.status = if a >= self.max_attempts { Status::Done } else { Status::Waiting };
                    }
                }
            }
            Action::Return(i, t, a) => {
                s.instances[i].abandoned.retain(|&x| x != (t, a));
                let task = &mut s.tasks[t];
                task.runs.retain(|&x| x != (i, a));
                // Only if the task is still held for that attempt (no rescue took it).
                if matches!(task.status, Status::Running { instance, attempt } if instance == i && attempt == a) {
                    task.status = if a >= self.max_attempts { Status::Done } else { Status::Waiting };
                }
            }
            Action::Retire(i) => {
                let inst = &mut s.instances[i];
                inst.alive = false;
                inst.has_row = false;
                inst.holds_name = false;
                inst.lease = Lease::Expired;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("never two attempts of a task at once", |_, s: &State| {
                s.tasks.iter().all(|task| task.runs.len() <= 1)
            }),
            Property::always("a live instance is never robbed", |_, s: &State| {
                s.instances.iter().enumerate().all(|(i, inst)| {
                    !inst.alive
                        || inst.running.iter().chain(&inst.queued).all(|&(t, a)| {
                            let task = &s.tasks[t];
                            task.open == Some(a) && task.status == Status::Running { instance: i, attempt: a }
                        })
                })
            }),
            Property::always("a name passes only from a dead instance", |_, s: &State| !s.name_taken_from_the_living),
            Property::always("every claimed task ends recorded", |model: &Protocol, s: &State| {
                // Once the engine has nothing left to do, no task is left claimed or open.
                model.can_progress(s)
                    || s.tasks.iter().all(|t| t.open.is_none() && !matches!(t.status, Status::Running { .. }))
            }),
            Property::always("each attempt is recorded once", |model: &Protocol, s: &State| {
                s.tasks.iter().all(|t| {
                    let mut seen = t.recorded.clone();
                    seen.sort_unstable();
                    seen.dedup();
                    let once = seen.len() == t.recorded.len();
                    // Once the engine has nothing left to do, every attempt used is.
                    once && (model.can_progress(s)
                        || matches!(t.status, Status::Running { .. })
                        || seen == (1..=t.attempts).collect::<Vec<_>>())
                })
            }),
            Property::always("an outcome changes only its own attempt", |_, s: &State| {
                // No outcome of a superseded attempt ended a task a later attempt holds.
                s.tasks.iter().all(|t| t.ended_by.map_or(true, |a| a == t.attempts))
            }),
            Property::sometimes("a task runs to completion", |_, s: &State| {
                s.tasks.iter().any(|t| t.status == Status::Done && t.attempts == 1)
            }),
            Property::sometimes("a rescued task runs to completion", |_, s: &State| {
                s.tasks.iter().any(|t| t.status == Status::Done && t.attempts >= 2)
            }),
        ]
    }
}

/// Checks every reachable state; returns the names of the properties that failed.
fn failed_properties(protocol: Protocol) -> Vec<&'static str> {
    let checker = protocol.clone().checker().threads(2).spawn_bfs().join();
    let mut failed = Vec::new();
    for property in protocol.properties() {
        let discovery = checker.discovery(property.name);
        let fails = match property.expectation {
            stateright::Expectation::Sometimes => discovery.is_none(),
            _ => discovery.is_some(),
        };
        if fails {
            if let Some(path) = discovery {
                eprintln!("{}: {:#?}", property.name, path.into_actions());
            }
            failed.push(property.name);
        }
    }
    eprintln!("{} states", checker.unique_state_count());
    failed
}

#[test]
fn the_protocol_holds_for_two_instances_and_one_task() {
    assert_eq!(failed_properties(Protocol::new(1)), Vec::<&str>::new());
}

#[test]
fn the_protocol_holds_for_two_instances_and_two_tasks() {
    assert_eq!(failed_properties(Protocol::new(2)), Vec::<&str>::new());
}

#[test]
fn a_heartbeat_that_stopped_at_a_graceful_stop_would_let_an_attempt_run_twice() {
    let protocol = Protocol { heartbeat_outlives_the_drain: false, ..Protocol::new(1) };
    let failed = failed_properties(protocol);
    assert!(failed.contains(&"never two attempts of a task at once"), "{failed:?}");
    assert!(failed.contains(&"a live instance is never robbed"), "{failed:?}");
}

#[test]
fn in_a_partition_an_attempt_may_run_twice_but_a_superseded_outcome_changes_nothing() {
    // Outside the promise (a live instance cut off for a whole lease), the cost is a
    // second run at once, as docs/operations.md says; the outcome of the first never counts.
    let failed = failed_properties(Protocol { partitions: true, ..Protocol::new(1) });
    assert_eq!(failed, ["never two attempts of a task at once", "a live instance is never robbed"]);
    let careless = Protocol { partitions: true, outcomes_name_their_attempt: false, ..Protocol::new(1) };
    assert!(failed_properties(careless).contains(&"an outcome changes only its own attempt"));
}

#[test]
fn without_the_rescue_of_its_own_ghosts_a_lost_claim_answer_would_leave_a_task_claimed_forever() {
    let failed = failed_properties(Protocol { rescues_own_ghosts: false, ..Protocol::new(1) });
    assert!(failed.contains(&"every claimed task ends recorded"), "{failed:?}");
}

#[test]
fn retrying_a_timed_out_task_while_its_abandoned_thread_still_runs_it_would_run_it_twice() {
    let failed = failed_properties(Protocol { abandoned_tasks_stay_held: false, ..Protocol::new(1) });
    assert!(failed.contains(&"never two attempts of a task at once"), "{failed:?}");
}

#[test]
fn retiring_before_the_abandoned_workers_return_would_let_a_rescue_run_their_task_twice() {
    let failed = failed_properties(Protocol { retire_waits_for_the_abandoned: false, ..Protocol::new(1) });
    assert!(failed.contains(&"never two attempts of a task at once"), "{failed:?}");
}

#[test]
fn taking_an_instance_without_a_row_for_dead_while_it_holds_its_name_would_rob_it() {
    let protocol = Protocol { rowless_needs_a_free_name: false, ..Protocol::new(1) };
    let failed = failed_properties(protocol);
    assert!(failed.contains(&"a live instance is never robbed"), "{failed:?}");
}

#[test]
fn without_a_listener_the_protocol_holds_for_two_instances_and_one_task() {
    assert_eq!(failed_properties(Protocol::without_listeners(1)), Vec::<&str>::new());
}

#[test]
fn without_a_listener_the_protocol_holds_for_two_instances_and_two_tasks() {
    assert_eq!(failed_properties(Protocol::without_listeners(2)), Vec::<&str>::new());
}

/// The fleets with instances of both kinds, at once or one after the other: one with a
/// listener and one without, either of them the fragile one (which crashes, restarts,
/// stops, loses its row) and restarting in the same mode or in the other (a deploy that
/// changes `--listen-url`); and fleets of one kind whose fragile instance switches.
fn mixed_fleets(protocol: &Protocol) -> impl Iterator<Item = Protocol> + '_ {
    let mixed =
        [[false, true], [true, false]].into_iter().flat_map(|listeners| [(listeners, false), (listeners, true)]);
    let switching = [([true, true], true), ([false, false], true)];
    mixed.chain(switching).map(move |(listeners, switches_mode_at_restart)| Protocol {
        listeners,
        switches_mode_at_restart,
        ..protocol.clone()
    })
}

#[test]
fn the_protocol_holds_in_fleets_of_instances_with_and_without_a_listener() {
    for protocol in mixed_fleets(&Protocol::new(1)) {
        let (listeners, switches) = (protocol.listeners, protocol.switches_mode_at_restart);
        assert_eq!(failed_properties(protocol), Vec::<&str>::new(), "{listeners:?}, switches: {switches}");
    }
}

#[test]
fn an_instance_without_a_listener_that_read_no_name_locks_would_rob_one_with_a_listener_whose_row_is_gone() {
    // The instance with a listener whose row an operator deleted is taken for dead by an
    // instance without one, or by its own newcomer without one (after a switch).
    let careless = Protocol { name_locks_read_without_a_listener: false, ..Protocol::new(1) };
    for protocol in mixed_fleets(&careless) {
        let (listeners, switches) = (protocol.listeners, protocol.switches_mode_at_restart);
        let robbed = failed_properties(protocol).contains(&"a live instance is never robbed");
        assert_eq!(robbed, listeners[FRAGILE], "{listeners:?}, switches: {switches}");
    }
}

#[test]
fn without_a_listener_deleting_a_live_instances_row_by_hand_would_rob_it() {
    // Nobody holds the name of an instance without a listener: once its row is gone,
    // others take it for dead at once. Outside the promise: do not delete live rows.
    let protocol = Protocol { deletes_live_rows_without_a_listener: true, ..Protocol::without_listeners(1) };
    let failed = failed_properties(protocol);
    assert!(failed.contains(&"a live instance is never robbed"), "{failed:?}");
}

#[test]
fn a_newcomer_that_took_its_name_under_a_fresh_row_of_an_instance_without_a_listener_would_rob_it() {
    // A newcomer without a listener, and one with (whose lock proves nothing here).
    let hasty = Protocol { newcomer_waits_for_a_stale_row: false, ..Protocol::without_listeners(1) };
    let switching = Protocol { listeners: [false, true], switches_mode_at_restart: true, ..hasty.clone() };
    for protocol in [hasty, switching] {
        let failed = failed_properties(protocol);
        assert!(failed.contains(&"a name passes only from a dead instance"), "{failed:?}");
        assert!(failed.contains(&"a live instance is never robbed"), "{failed:?}");
    }
}

#[test]
fn without_a_listener_a_second_newcomer_that_registered_without_checking_the_row_again_would_rob_the_first() {
    let protocol = Protocol { newcomer_registers_as_it_checks: false, ..Protocol::without_listeners(1) };
    let failed = failed_properties(protocol);
    assert!(failed.contains(&"a name passes only from a dead instance"), "{failed:?}");
    assert!(failed.contains(&"a live instance is never robbed"), "{failed:?}");
}
