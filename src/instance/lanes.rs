//! The instance's queues, a lane each: the queue's hand-off, between its producer and
//! its workers. The listener and the timer wake every lane: a notification or a
//! due time does not say which queue it is for, and a lane with nothing to claim
//! claims once for nothing.

use std::sync::Arc;

use crate::instance::handoff::Handoff;

/// One queue this instance runs, and its hand-off.
pub(crate) struct Lane {
    pub queue: String,
    pub handoff: Arc<Handoff>,
}

/// Every lane of the instance.
pub(crate) struct Lanes(Vec<Lane>);

impl Lanes {
    pub(crate) fn new(lanes: Vec<Lane>) -> Self {
        Self(lanes)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Lane> {
        self.0.iter()
    }

    /// The queues, in the order given.
    pub(crate) fn queues(&self) -> Vec<&str> {
        self.0.iter().map(|lane| lane.queue.as_str()).collect()
    }

    /// There may be `count` runnable tasks, in any of the queues.
    pub(crate) fn wake(&self, count: usize) {
        self.0.iter().for_each(|lane| lane.handoff.wake(count));
    }

    /// After a (re)connection, when notifications may have been missed.
    pub(crate) fn wake_all(&self) {
        self.0.iter().for_each(|lane| lane.handoff.wake_all());
    }

    /// The workers of every lane.
    pub(crate) fn capacity(&self) -> usize {
        self.0.iter().map(|lane| lane.handoff.capacity()).sum()
    }

    /// The workers asleep in every lane.
    pub(crate) fn sleeping(&self) -> usize {
        self.0.iter().map(|lane| lane.handoff.sleeping()).sum()
    }

    pub(crate) fn stop(&self) {
        self.0.iter().for_each(|lane| lane.handoff.stop());
    }
}
