//! The wake-up queue: where idle workers sleep, and what wakes them.
//!
//! The mutex guards a count of pending wake-ups, the number of sleepers and the stop
//! flag. Whoever learns of new work (a worker that found some, a notification, the
//! timer of a scheduled task) adds pending wake-ups and signals the condvar; a worker
//! that found nothing waits until a wake-up is pending, the engine stops, or its
//! timeout (the fallback poll) runs out.
//!
//! No wake-up is lost: a wake-up that arrives while a worker is between "found
//! nothing" and "asleep" stays counted under the mutex, and the wait's predicate sees
//! it before blocking. The predicate also makes spurious condvar wake-ups harmless,
//! and the timeout bounds every wait, so a stop is always noticed promptly.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Why [`WakeupQueue::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A wake-up was pending: there may be work.
    Work,
    /// The timeout ran out with nothing pending.
    Timeout,
    /// The engine is stopping.
    Stop,
}

#[derive(Debug, Default)]
struct State {
    /// Wake-ups not yet taken by a worker. Capped at the number of idle workers (not
    /// running a task): a busy worker looks for work anyway when its task ends, after
    /// whatever commit the wake-up announced, so a wake-up kept for it could only
    /// produce a claim that finds nothing.
    pending: usize,
    /// Workers blocked in `wait`.
    sleeping: usize,
    /// Workers running a task.
    busy: usize,
    stopping: bool,
}

impl State {
    fn clamp(&mut self, capacity: usize) {
        self.pending = self.pending.min(capacity - self.busy);
    }
}

#[derive(Debug)]
pub(crate) struct WakeupQueue {
    state: Mutex<State>,
    condvar: Condvar,
    capacity: usize,
}

impl WakeupQueue {
    /// Creates the queue of an instance with `workers` workers.
    pub(crate) fn new(workers: usize) -> Self {
        Self { state: Mutex::new(State::default()), condvar: Condvar::new(), capacity: workers.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding this lock, and its state stays consistent if
        // something ever did: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until a wake-up is pending, the engine stops, or `timeout` passes, and
    /// takes one pending wake-up if it returns [`Wake::Work`].
    pub(crate) fn wait(&self, timeout: Duration) -> Wake {
        let mut state = self.lock();
        state.sleeping += 1;
        let (mut state, _) = self
            .condvar
            .wait_timeout_while(state, timeout, |s| s.pending == 0 && !s.stopping)
            .unwrap_or_else(PoisonError::into_inner);
        state.sleeping -= 1;
        if state.stopping {
            Wake::Stop
        } else if state.pending > 0 {
            state.pending -= 1;
            Wake::Work
        } else {
            Wake::Timeout
        }
    }

    /// Adds `count` pending wake-ups (at most one per idle worker in all) and wakes as
    /// many sleepers.
    pub(crate) fn wake(&self, count: usize) {
        let mut state = self.lock();
        let before = state.pending;
        state.pending = state.pending.saturating_add(count);
        state.clamp(self.capacity);
        let added = state.pending - before.min(state.pending);
        drop(state);
        for _ in 0..added {
            self.condvar.notify_one();
        }
    }

    /// Returns the number of workers.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Wakes every idle worker: after a (re)connection, when notifications may have
    /// been missed.
    pub(crate) fn wake_all(&self) {
        self.wake(self.capacity);
    }

    /// A worker starts running a task.
    pub(crate) fn task_started(&self) {
        let mut state = self.lock();
        state.busy = (state.busy + 1).min(self.capacity);
        state.clamp(self.capacity);
    }

    /// A worker has finished its task (and looks for the next before any wait).
    pub(crate) fn task_finished(&self) {
        let mut state = self.lock();
        state.busy = state.busy.saturating_sub(1);
    }

    /// Returns how many workers are asleep with no wake-up on its way to them.
    pub(crate) fn sleeping(&self) -> usize {
        let state = self.lock();
        state.sleeping.saturating_sub(state.pending)
    }

    /// Makes every current and future `wait` return [`Wake::Stop`].
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.condvar.notify_all();
    }

    /// Tells whether [`WakeupQueue::stop`] was called.
    pub(crate) fn is_stopping(&self) -> bool {
        self.lock().stopping
    }
}

/// The stop flag of the threads that do not sleep in the [`WakeupQueue`] (the
/// listener, the timers): they wait on their own condvar, so that a stop reaches them
/// at once and a worker's wake-up is never taken by one of them.
#[derive(Debug, Default)]
pub(crate) struct StopSignal {
    stopped: Mutex<bool>,
    condvar: Condvar,
}

impl StopSignal {
    pub(crate) fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.condvar.notify_all();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `timeout`; returns true if the stop came.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) =
            self.condvar.wait_timeout_while(stopped, timeout, |s| !*s).unwrap_or_else(PoisonError::into_inner);
        *stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn a_wake_up_sent_before_the_wait_is_not_lost() {
        let queue = WakeupQueue::new(2);
        queue.wake(1);
        assert_eq!(queue.wait(Duration::from_secs(3600)), Wake::Work);
    }

    #[test]
    fn wake_ups_are_not_kept_for_busy_workers() {
        let queue = WakeupQueue::new(3);
        queue.task_started();
        queue.task_started();
        queue.wake(3);
        assert_eq!(queue.wait(Duration::ZERO), Wake::Work);
        assert_eq!(queue.wait(Duration::ZERO), Wake::Timeout, "a wake-up was kept for a busy worker");
        // A wake-up pending when a worker takes a task is dropped for it too.
        queue.task_finished();
        queue.wake(2);
        queue.task_started();
        assert_eq!(queue.wait(Duration::ZERO), Wake::Work);
        assert_eq!(queue.wait(Duration::ZERO), Wake::Timeout);
    }

    #[test]
    fn pending_wake_ups_are_capped_at_the_number_of_workers() {
        let queue = WakeupQueue::new(2);
        queue.wake(10);
        assert_eq!(queue.wait(Duration::ZERO), Wake::Work);
        assert_eq!(queue.wait(Duration::ZERO), Wake::Work);
        assert_eq!(queue.wait(Duration::ZERO), Wake::Timeout);
    }

    #[test]
    fn a_stop_wakes_every_sleeper() {
        let queue = Arc::new(WakeupQueue::new(4));
        let sleepers: Vec<_> = (0..4)
            .map(|_| {
                let queue = Arc::clone(&queue);
                thread::spawn(move || queue.wait(Duration::from_secs(3600)))
            })
            .collect();
        while queue.sleeping() < 4 {
            thread::yield_now();
        }
        queue.stop();
        for sleeper in sleepers {
            assert_eq!(sleeper.join().unwrap(), Wake::Stop);
        }
    }

    #[test]
    fn one_wake_up_wakes_one_of_several_sleepers() {
        let queue = Arc::new(WakeupQueue::new(3));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..3 {
            let (queue, tx) = (Arc::clone(&queue), tx.clone());
            thread::spawn(move || tx.send(queue.wait(Duration::from_secs(3600))).unwrap());
        }
        while queue.sleeping() < 3 {
            thread::yield_now();
        }
        queue.wake(1);
        assert_eq!(rx.recv().unwrap(), Wake::Work);
        // The other two stay asleep until the stop.
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        assert_eq!(queue.sleeping(), 2);
        queue.stop();
        assert_eq!(rx.recv().unwrap(), Wake::Stop);
        assert_eq!(rx.recv().unwrap(), Wake::Stop);
    }
}
