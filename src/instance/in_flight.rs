//! The tasks this instance has claimed and not yet recorded, and which of them an
//! operator cancelled: the producer adds them, the listener marks cancellations, each
//! task's context reads its own flag, the completer forgets them once recorded, and
//! the rescue spares them (they are no ghosts).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::instance::lock;

/// Claimed tasks by id, each with its cancel flag.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    tasks: Mutex<HashMap<i64, Arc<AtomicBool>>>,
}

impl InFlight {
    /// Tasks claimed by this instance.
    pub(crate) fn claimed(&self, task_ids: impl IntoIterator<Item = i64>) {
        let mut tasks = lock(&self.tasks);
        for id in task_ids {
            tasks.insert(id, Arc::default());
        }
    }

    /// Marks a task cancelled, if it is in flight here.
    pub(crate) fn cancel(&self, task_id: i64) {
        if let Some(flag) = lock(&self.tasks).get(&task_id) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// The cancel flag of a task in flight (a fresh, unset one for any other).
    pub(crate) fn cancel_flag(&self, task_id: i64) -> Arc<AtomicBool> {
        lock(&self.tasks).get(&task_id).cloned().unwrap_or_default()
    }

    /// The tasks in flight now.
    pub(crate) fn ids(&self) -> Vec<i64> {
        lock(&self.tasks).keys().copied().collect()
    }

    /// Forgets tasks whose attempt has been recorded (or given back).
    pub(crate) fn forget(&self, task_ids: impl IntoIterator<Item = i64>) {
        let mut tasks = lock(&self.tasks);
        for id in task_ids {
            tasks.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_reaches_the_flag_of_a_task_in_flight_and_nothing_else() {
        let in_flight = InFlight::default();
        in_flight.claimed([1, 2]);
        let flag = in_flight.cancel_flag(1);
        in_flight.cancel(1);
        in_flight.cancel(3);
        assert!(flag.load(Ordering::Relaxed));
        assert!(!in_flight.cancel_flag(2).load(Ordering::Relaxed));
        assert!(!in_flight.cancel_flag(3).load(Ordering::Relaxed), "a task not in flight was cancelled");
        in_flight.forget([1]);
        assert_eq!(in_flight.ids(), [2]);
    }
}
