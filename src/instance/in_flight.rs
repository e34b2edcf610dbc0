//! The tasks this instance has claimed and not yet recorded, and which of them an
//! operator cancelled: the producer adds them, the listener marks cancellations (and
//! the heartbeat those whose notification was lost), each
//! task's context reads its own flag, the completer forgets them once recorded, and
//! the rescue spares them (they are no ghosts). A cancel heard for a task not (yet)
//! in flight here is kept a little while: its claim may have committed and not yet
//! come back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::instance::lock;

/// How long a cancel heard for a task not in flight here is kept for its claim.
const EARLY_CANCEL: Duration = Duration::from_secs(10);

/// Claimed tasks by id, each with the execution of its attempt here and its cancel
/// flag.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    tasks: Mutex<Tasks>,
}

#[derive(Debug, Default)]
struct Tasks {
    claimed: HashMap<i64, Entry>,
    /// Cancels heard for tasks not in flight here, and when.
    early: HashMap<i64, Instant>,
}

#[derive(Debug)]
struct Entry {
    execution_id: i64,
    cancelled: Arc<AtomicBool>,
}

impl InFlight {
    /// Tasks claimed by this instance, as `(task, execution)`.
    pub(crate) fn claimed(&self, claimed: impl IntoIterator<Item = (i64, i64)>) {
        self.claimed_at(claimed, Instant::now());
    }

    fn claimed_at(&self, claimed: impl IntoIterator<Item = (i64, i64)>, now: Instant) {
        // Allocated before the lock, which workers wait for.
        let entries: Vec<(i64, Entry)> = claimed
            .into_iter()
            .map(|(task_id, execution_id)| (task_id, Entry { execution_id, cancelled: Arc::default() }))
            .collect();
        let mut tasks = lock(&self.tasks);
        if !tasks.early.is_empty() {
            tasks.early.retain(|_, heard| now.saturating_duration_since(*heard) < EARLY_CANCEL);
        }
        for (task_id, entry) in entries {
            if tasks.early.remove(&task_id).is_some() {
                entry.cancelled.store(true, Ordering::Relaxed);
            }
            tasks.claimed.insert(task_id, entry);
        }
    }

    /// Marks a task cancelled: at once if it is in flight here, at its claim if that
    /// comes within a few seconds.
    pub(crate) fn cancel(&self, task_id: i64) {
        self.cancel_at(task_id, Instant::now());
    }

    fn cancel_at(&self, task_id: i64, now: Instant) {
        let mut tasks = lock(&self.tasks);
        if let Some(entry) = tasks.claimed.get(&task_id) {
            entry.cancelled.store(true, Ordering::Relaxed);
            return;
        }
        tasks.early.retain(|_, heard| now.saturating_duration_since(*heard) < EARLY_CANCEL);
        tasks.early.insert(task_id, now);
    }

    /// Marks a task in flight here cancelled, if it is and its flag is not set yet
    /// (a cancel found by the heartbeat, not heard); returns whether it did.
    pub(crate) fn cancel_if_running(&self, task_id: i64) -> bool {
        lock(&self.tasks).claimed.get(&task_id).is_some_and(|entry| !entry.cancelled.swap(true, Ordering::Relaxed))
    }

    /// The cancel flag of a task in flight (a fresh, unset one for any other).
    pub(crate) fn cancel_flag(&self, task_id: i64) -> Arc<AtomicBool> {
        lock(&self.tasks).claimed.get(&task_id).map(|entry| Arc::clone(&entry.cancelled)).unwrap_or_default()
    }

    /// The tasks in flight now.
    pub(crate) fn ids(&self) -> Vec<i64> {
        lock(&self.tasks).claimed.keys().copied().collect()
    }

    /// Forgets attempts that have been recorded (or given back), as `(task,
    /// execution)`. A task claimed again meanwhile (a retry due at once) keeps its new
    /// entry.
    pub(crate) fn forget(&self, attempts: impl IntoIterator<Item = (i64, i64)>) {
        let mut gone = Vec::new();
        let mut tasks = lock(&self.tasks);
        for (task_id, execution_id) in attempts {
            if tasks.claimed.get(&task_id).is_some_and(|entry| entry.execution_id == execution_id) {
                gone.extend(tasks.claimed.remove(&task_id));
            }
        }
        drop(tasks);
        // Freed after the lock.
        drop(gone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_reaches_the_flag_of_a_task_in_flight_and_nothing_else() {
        let in_flight = InFlight::default();
        in_flight.claimed([(1, 10), (2, 20)]);
        let flag = in_flight.cancel_flag(1);
        in_flight.cancel(1);
        in_flight.cancel(3);
        assert!(flag.load(Ordering::Relaxed));
        assert!(!in_flight.cancel_flag(2).load(Ordering::Relaxed));
        assert!(!in_flight.cancel_flag(3).load(Ordering::Relaxed), "a task not in flight was cancelled");
        in_flight.forget([(1, 10)]);
        assert_eq!(in_flight.ids(), [2]);
    }

    #[test]
    fn a_cancel_found_by_the_heartbeat_sets_a_flag_once_and_only_of_a_task_in_flight() {
        let in_flight = InFlight::default();
        in_flight.claimed([(1, 10)]);
        assert!(in_flight.cancel_if_running(1));
        assert!(in_flight.cancel_flag(1).load(Ordering::Relaxed));
        assert!(!in_flight.cancel_if_running(1), "found again at the next heartbeat: not news");
        assert!(!in_flight.cancel_if_running(2), "a task not in flight here");
        in_flight.claimed([(2, 20)]);
        assert!(!in_flight.cancel_flag(2).load(Ordering::Relaxed), "a look kept a cancel for a later claim");
    }

    #[test]
    fn a_cancel_heard_before_the_claim_comes_back_reaches_the_task_at_its_claim() {
        let in_flight = InFlight::default();
        in_flight.cancel(7); // the claim of task 7 has committed, its answer is on its way
        in_flight.claimed([(7, 70), (8, 80)]);
        assert!(in_flight.cancel_flag(7).load(Ordering::Relaxed), "the early cancel was lost");
        assert!(!in_flight.cancel_flag(8).load(Ordering::Relaxed));
        in_flight.forget([(7, 70)]);
        in_flight.claimed([(7, 71)]);
        assert!(!in_flight.cancel_flag(7).load(Ordering::Relaxed), "an early cancel was used twice");
    }

    #[test]
    fn an_old_cancel_heard_for_a_task_elsewhere_does_not_cancel_its_claim_a_day_later() {
        let in_flight = InFlight::default();
        let heard = Instant::now();
        in_flight.cancel_at(7, heard); // task 7 ran on another instance, and was cancelled
                                       // An operator retries it much later, and this instance claims it.
        in_flight.claimed_at([(7, 71)], heard + EARLY_CANCEL);
        assert!(!in_flight.cancel_flag(7).load(Ordering::Relaxed), "an old cancel stopped a retried task");
    }

    #[test]
    fn a_retry_claimed_again_before_its_last_attempt_is_recorded_stays_in_flight() {
        let in_flight = InFlight::default();
        in_flight.claimed([(1, 10)]);
        // The completer has recorded attempt 10 as a retry due at once, and the
        // producer has claimed the task again before the completer forgets attempt 10.
        in_flight.claimed([(1, 11)]);
        in_flight.forget([(1, 10)]);
        assert_eq!(in_flight.ids(), [1], "the new attempt was forgotten: the rescue would take it for a ghost");
        in_flight.cancel(1);
        assert!(in_flight.cancel_flag(1).load(Ordering::Relaxed), "a cancel no longer reaches the new attempt");
    }
}
