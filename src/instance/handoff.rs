//! The hand-off: the instance's in-process queue of claimed tasks, between the
//! producer that claims them and the workers that run them.
//!
//! One mutex guards the tasks claimed and not yet started, how many workers are busy,
//! and whether there is a reason to claim (`want`: a notification, the timer, a
//! (re)connection, the fallback poll, a claim that came back full). The producer waits
//! on one condvar until there is both a reason and room; workers wait on the other
//! until a task is queued. The room is the idle workers plus a buffer that follows the
//! tasks' pace: what the workers get through in two claims' time, none for tasks
//! slower than that, so that a busy instance does not hoard what an idle one could run.
//!
//! No wake-up is lost: each bumps a sequence number under the mutex, and a claim that
//! comes back short makes the instance idle only if no wake-up came while it ran. No
//! herd: however many workers are idle, a wake-up costs one claim.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::attempt::ClaimedTask;
use crate::instance::lock;

#[derive(Debug, Default)]
struct State {
    /// Claimed, not yet taken by a worker, with when they were queued.
    tasks: VecDeque<(ClaimedTask, Instant)>,
    /// Workers running a task.
    busy: usize,
    /// Workers blocked waiting for a task.
    waiting: usize,
    /// There may be runnable tasks in the database.
    want: bool,
    /// Bumped by every wake-up.
    wake_seq: u64,
    /// The producer is blocked waiting for a reason or room.
    producer_parked: bool,
    stopping: bool,
    /// The producer has ended: nothing more will be queued.
    producer_done: bool,
    /// Recent average of how long a task runs (unknown before the first ends).
    task_time: Option<Duration>,
    /// Recent average of a claim's round trip (unknown before the first claim).
    claim_time: Option<Duration>,
}

/// A running average that follows the last eight or so values.
fn average(old: Option<Duration>, new: Duration) -> Duration {
    old.map_or(new, |old| (old * 7 + new) / 8)
}

#[derive(Debug)]
pub(crate) struct Handoff {
    state: Mutex<State>,
    producer: Condvar,
    workers: Condvar,
    capacity: usize,
    /// The most tasks claimed ahead of the idle workers.
    max_buffer: usize,
    /// The most tasks one claim asks for.
    max_claim: usize,
}

/// What the producer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Claim(Demand),
    /// Nothing to claim for a while.
    Tick,
    Stop,
}

/// When a claim shows the queue drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// When it brings fewer tasks than asked.
    IfShort,
    /// When it brings none: tasks are streaming in and inserters no longer notify, so
    /// a short claim is followed by another.
    IfEmpty,
    /// Never: other claims held tasks it might have taken.
    No,
}

/// What the producer should claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Demand {
    /// How many tasks there is room for.
    pub count: usize,
    /// The wake-up sequence number when the claim starts.
    pub seq: u64,
}

impl Handoff {
    /// The queue of an instance with `workers` workers and room for up to
    /// `max_buffer` claimed tasks beyond the idle workers.
    pub(crate) fn new(workers: usize, max_buffer: usize) -> Self {
        Self {
            state: Mutex::new(State { want: true, ..State::default() }),
            producer: Condvar::new(),
            workers: Condvar::new(),
            capacity: workers.max(1),
            max_buffer,
            max_claim: usize::MAX,
        }
    }

    /// Caps the tasks one claim asks for (1: one task per round trip).
    pub(crate) fn with_max_claim(mut self, max_claim: usize) -> Self {
        self.max_claim = max_claim.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn room(&self, state: &State) -> usize {
        (self.capacity + self.buffer(state)).saturating_sub(state.busy + state.tasks.len())
    }

    /// The tasks to claim ahead of the idle workers: what they get through in two
    /// claims' time at the recent pace, at most `max_buffer`; none until a task has
    /// ended and a claim has come back.
    fn buffer(&self, state: &State) -> usize {
        let (Some(task), Some(claim)) = (state.task_time, state.claim_time) else { return 0 };
        let per_worker = 2.0 * claim.as_secs_f64() / task.as_secs_f64().max(1e-6);
        // Truncated: tasks that take longer than two claims get no buffer at all.
        ((per_worker * self.capacity as f64) as usize).min(self.max_buffer)
    }

    /// There may be runnable tasks (`count` says how many, when known: only the fact
    /// matters, the claim asks for as many as there is room for).
    pub(crate) fn wake(&self, count: usize) {
        if count == 0 {
            return;
        }
        let mut state = self.lock();
        state.want = true;
        state.wake_seq += 1;
        drop(state);
        self.producer.notify_one();
    }

    /// After a (re)connection, when notifications may have been missed.
    pub(crate) fn wake_all(&self) {
        self.wake(self.capacity);
    }

    /// The number of workers.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// For the producer: blocks until there is a reason to claim and room for at
    /// least one task, or `poll` passes with room (the fallback poll). `None` when
    /// the instance stops.
    #[cfg(test)]
    pub(crate) fn demand(&self, poll: Duration) -> Option<Demand> {
        loop {
            match self.next(poll) {
                Next::Claim(demand) => return Some(demand),
                Next::Stop => return None,
                Next::Tick => self.wake(1),
            }
        }
    }

    /// For the producer: blocks until there is a reason to claim and room for at
    /// least one task ([`Next::Claim`]), or `tick` passes ([`Next::Tick`]), or the
    /// instance stops.
    pub(crate) fn next(&self, tick: Duration) -> Next {
        let mut state = self.lock();
        loop {
            if state.stopping {
                return Next::Stop;
            }
            let room = self.room(&state);
            if state.want && room > 0 {
                return Next::Claim(Demand { count: room.min(self.max_claim), seq: state.wake_seq });
            }
            state.producer_parked = true;
            let (next, timeout) = self.producer.wait_timeout(state, tick).unwrap_or_else(PoisonError::into_inner);
            state = next;
            state.producer_parked = false;
            if timeout.timed_out() {
                return Next::Tick;
            }
        }
    }

    /// [`Handoff::deliver_claimed_at`] for tasks claimed now, not streaming.
    #[cfg(test)]
    pub(crate) fn deliver(&self, tasks: Vec<ClaimedTask>, demand: Demand) -> bool {
        self.deliver_claimed_at(tasks, demand, Instant::now(), Drained::IfShort)
    }

    /// For the producer: hands claimed tasks to the workers. A claim that `drained`
    /// the queue makes the instance idle until the next wake-up, unless a wake-up
    /// arrived while it ran, and then this returns true. The tasks' time in the queue counts from `claimed_at`,
    /// when the claim statement was sent, as their executions' `started_at` is the
    /// claim's time on the server.
    pub(crate) fn deliver_claimed_at(
        &self,
        tasks: Vec<ClaimedTask>,
        demand: Demand,
        claimed_at: Instant,
        drained: Drained,
    ) -> bool {
        let mut state = self.lock();
        state.claim_time = Some(average(state.claim_time, claimed_at.elapsed()));
        let drained = match drained {
            Drained::IfShort => tasks.len() < demand.count,
            Drained::IfEmpty => tasks.is_empty(),
            Drained::No => false,
        };
        let idle = drained && state.wake_seq == demand.seq;
        if idle {
            state.want = false;
        }
        // Only waiting workers need a call; the others look at the queue before they wait.
        let n = tasks.len().min(state.waiting);
        state.tasks.extend(tasks.into_iter().map(|t| (t, claimed_at)));
        drop(state);
        for _ in 0..n {
            self.workers.notify_one();
        }
        idle
    }

    /// For the producer: takes back the queued tasks that have waited longer than
    /// `max_wait` for a worker (the oldest come first), to give them back to the
    /// database. Their wait says the workers are slower than the buffer assumed: the
    /// buffer counts tasks as lasting at least that long, so that the instance does
    /// not claim them again ahead of its idle workers.
    pub(crate) fn take_stale(&self, max_wait: Duration) -> Vec<ClaimedTask> {
        let mut state = self.lock();
        let mut stale = Vec::new();
        while state.tasks.front().is_some_and(|(_, queued_at)| queued_at.elapsed() > max_wait) {
            let (task, queued_at) = state.tasks.pop_front().expect("just seen");
            let waited = queued_at.elapsed();
            state.task_time = Some(state.task_time.map_or(waited, |t| t.max(waited)));
            stale.push(task);
        }
        stale
    }

    /// For the producer, when it ends: takes back the tasks no worker has started.
    pub(crate) fn finish(&self) -> Vec<ClaimedTask> {
        let mut state = self.lock();
        state.producer_done = true;
        let left = state.tasks.drain(..).map(|(t, _)| t).collect();
        drop(state);
        self.workers.notify_all();
        left
    }

    /// For a worker: blocks until a task is queued (and takes it, with how long it
    /// waited in the queue, the worker being busy from then on) or the instance stops
    /// (`None`).
    pub(crate) fn next_task(&self) -> Option<(ClaimedTask, Duration)> {
        let mut state = self.lock();
        loop {
            if state.stopping {
                // Queued tasks are not started after a stop: the producer releases them.
                return None;
            }
            if let Some((task, queued_at)) = state.tasks.pop_front() {
                state.busy += 1;
                return Some((task, queued_at.elapsed()));
            }
            state.waiting += 1;
            state = self.workers.wait(state).unwrap_or_else(PoisonError::into_inner);
            state.waiting -= 1;
        }
    }

    /// For a worker: its task has ended after running for `ran` (its outcome is with
    /// the completer).
    pub(crate) fn task_done(&self, ran: Duration) {
        let mut state = self.lock();
        state.busy = state.busy.saturating_sub(1);
        state.task_time = Some(average(state.task_time, ran));
        let parked = state.producer_parked;
        drop(state);
        if parked {
            self.producer.notify_one();
        }
    }

    /// Workers waiting for a task while the producer has nothing to claim: the
    /// instance is idle when this equals the number of workers.
    pub(crate) fn sleeping(&self) -> usize {
        let state = self.lock();
        if state.producer_parked && (!state.want || self.room(&state) == 0) && state.tasks.is_empty() {
            state.waiting
        } else {
            0
        }
    }

    /// Ends every current and future wait: the instance's waker on its shutdown.
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.producer.notify_all();
        self.workers.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn task(id: i64) -> ClaimedTask {
        ClaimedTask {
            id,
            task_type: "noop".into(),
            task_parameters: "null".into(),
            attempt: 1,
            max_attempts: 1,
            execution_id: id,
            claimed_at: chrono::Utc::now(),
            limited: false,
            timeout: None,
        }
    }

    // Long enough never to pass in a green run; short enough that a regression fails
    // instead of hanging.
    const HOUR: Duration = Duration::from_secs(20);

    #[test]
    fn a_wake_up_during_a_short_claim_is_not_lost() {
        let queue = Handoff::new(2, 0);
        let demand = queue.demand(HOUR).unwrap(); // the start-up look
        assert_eq!(demand.count, 2);
        queue.wake(1); // an insert commits while the claim runs
        queue.deliver(vec![], demand);
        let again = queue.next(Duration::ZERO);
        assert!(matches!(again, Next::Claim(d) if d.count == 2), "the wake-up during the claim was lost: {again:?}");
    }

    #[test]
    fn a_short_claim_without_wake_ups_stops_claiming_until_the_next_one() {
        let queue = Handoff::new(2, 0);
        let demand = queue.demand(HOUR).unwrap();
        queue.deliver(vec![task(1)], demand);
        assert!(queue.next_task().is_some());
        let parked = {
            let state = queue.lock();
            !state.want
        };
        assert!(parked, "claimed again after a short claim with no wake-up");
        queue.wake(1);
        assert_eq!(queue.demand(HOUR).unwrap().count, 1, "room is what idle workers leave");
    }

    #[test]
    fn while_tasks_stream_in_only_an_empty_claim_stops_claiming() {
        let queue = Handoff::new(2, 2);
        let demand = queue.demand(HOUR).unwrap();
        assert!(
            !queue.deliver_claimed_at(vec![task(1)], demand, Instant::now(), Drained::IfEmpty),
            "a short claim made it idle"
        );
        let again = queue.next(Duration::ZERO);
        let Next::Claim(demand) = again else { panic!("no claim after a short one while streaming: {again:?}") };
        assert!(
            queue.deliver_claimed_at(vec![], demand, Instant::now(), Drained::IfEmpty),
            "an empty claim left it looking"
        );
        assert_eq!(queue.next(Duration::ZERO), Next::Tick);
    }

    #[test]
    fn an_empty_claim_among_tasks_others_hold_is_followed_by_another() {
        let queue = Handoff::new(2, 2);
        let demand = queue.demand(HOUR).unwrap();
        assert!(
            !queue.deliver_claimed_at(vec![], demand, Instant::now(), Drained::No),
            "it took the queue for drained"
        );
        let again = queue.next(Duration::ZERO);
        assert!(matches!(again, Next::Claim(_)), "no claim after one that others' claims kept empty: {again:?}");
    }

    #[test]
    fn room_is_idle_workers_plus_the_buffer() {
        let queue = Handoff::new(3, 2);
        short_tasks_seen(&queue);
        let demand = queue.demand(HOUR).unwrap();
        assert_eq!(demand.count, 5);
        queue.deliver((1..=5).map(task).collect(), demand);
        assert!(queue.next_task().is_some());
        assert!(queue.next_task().is_some());
        // 2 busy, 3 queued: no room until a task ends.
        assert_eq!(queue_room(&queue), None);
        queue.task_done(Duration::from_micros(1));
        assert_eq!(queue_room(&queue), Some(1));
    }

    /// One task that ran for a microsecond, one claim that took a millisecond: the
    /// workers get through tasks far faster than claims come back.
    fn short_tasks_seen(queue: &Handoff) {
        let demand = queue.demand(HOUR).unwrap();
        queue.deliver_claimed_at(vec![task(0)], demand, Instant::now() - Duration::from_millis(1), Drained::IfShort);
        queue.next_task().unwrap();
        queue.task_done(Duration::from_micros(1));
        queue.wake(1);
    }

    #[test]
    fn the_buffer_follows_the_pace_of_tasks_and_claims() {
        let queue = Handoff::new(4, 100);
        // Nothing known yet: claim for the idle workers only.
        assert_eq!(queue_room(&queue), Some(4));
        // Tasks far shorter than a claim: the whole buffer.
        short_tasks_seen(&queue);
        assert_eq!(queue_room(&queue), Some(104));
        // Tasks of a second, claims of a millisecond: none, whatever the maximum.
        for _ in 0..64 {
            let demand = queue.demand(HOUR).unwrap();
            queue.deliver_claimed_at(
                vec![task(1)],
                demand,
                Instant::now() - Duration::from_millis(1),
                Drained::IfShort,
            );
            queue.next_task().unwrap();
            queue.task_done(Duration::from_secs(1));
            queue.wake(1);
        }
        assert_eq!(queue_room(&queue), Some(4));
        // Tasks as long as half a claim: four per worker fit in two claims' time.
        let (claim, ran) = (Duration::from_millis(10), Duration::from_millis(5));
        let mut state = queue.lock();
        state.task_time = Some(ran);
        state.claim_time = Some(claim);
        assert_eq!(queue.buffer(&state), 16);
    }

    #[test]
    fn tasks_given_back_for_waiting_too_long_are_not_claimed_again_ahead_of_idle_workers() {
        let queue = Handoff::new(1, 10);
        short_tasks_seen(&queue);
        let demand = queue.demand(HOUR).unwrap();
        assert_eq!(demand.count, 11);
        queue.deliver((1..=3).map(task).collect(), demand);
        queue.next_task().unwrap(); // the only worker is busy from now on
        thread::sleep(Duration::from_millis(2));
        let stale: Vec<i64> = queue.take_stale(Duration::from_millis(1)).iter().map(|t| t.id).collect();
        assert_eq!(stale, [2, 3]);
        // They waited 2 ms for one worker: no more buffer for tasks that slow.
        assert_eq!(queue_room(&queue), None);
        queue.task_done(Duration::from_millis(2));
        assert_eq!(queue_room(&queue), Some(1));
    }

    fn queue_room(queue: &Handoff) -> Option<usize> {
        let state = queue.lock();
        Some(queue.room(&state)).filter(|r| *r > 0)
    }

    #[test]
    fn a_stop_ends_every_wait_and_queued_tasks_go_back_to_the_producer() {
        let queue = Arc::new(Handoff::new(2, 0));
        let demand = queue.demand(HOUR).unwrap();
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let queue = Arc::clone(&queue);
                thread::spawn(move || queue.next_task().map(|(t, _)| t.id))
            })
            .collect();
        while queue.lock().waiting < 2 {
            thread::yield_now();
        }
        queue.stop();
        for worker in workers {
            assert_eq!(worker.join().unwrap(), None);
        }
        queue.deliver(vec![task(7)], demand);
        assert_eq!(queue.finish().len(), 1);
        assert!(queue.demand(HOUR).is_none());
    }

    #[test]
    fn one_queued_task_is_taken_by_one_worker() {
        let queue = Arc::new(Handoff::new(3, 0));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..3 {
            let (queue, tx) = (Arc::clone(&queue), tx.clone());
            thread::spawn(move || tx.send(queue.next_task().map(|(t, _)| t.id)).unwrap());
        }
        while queue.lock().waiting < 3 {
            thread::yield_now();
        }
        let demand = queue.demand(HOUR).unwrap();
        queue.deliver(vec![task(9)], demand);
        assert_eq!(rx.recv().unwrap(), Some(9));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "a second worker woke for one task");
        queue.stop();
        assert_eq!(rx.recv().unwrap(), None);
        assert_eq!(rx.recv().unwrap(), None);
    }
}
