//! Whether the instance is idle, as the wake-up stripes say it to inserters: while the
//! session holds the stripes, inserts notify (see `task_engine_notify_insert`). Each
//! lane's producer says when it falls asleep (its last claim found nothing) and when
//! it is busy again; the listener, which owns the session, holds the stripes while any
//! lane sleeps, takes them at once when the first falls asleep (that producer wakes
//! it), and then has every lane look once more, for what was inserted without a
//! notification before they were held. It lets them go, lazily, once no lane sleeps.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The lanes asleep, and whether the session holds the stripes for them.
#[derive(Debug, Default)]
pub(crate) struct Stripes {
    asleep: AtomicUsize,
    held: AtomicBool,
    /// Whether the lanes' look after the stripes were taken is still to come.
    look_pending: AtomicBool,
    /// Whether the instance has a session to hold them (without a listener it polls).
    session: AtomicBool,
}

impl Stripes {
    /// Says whether the instance has a session (at its start).
    pub(crate) fn set_session(&self, session: bool) {
        self.session.store(session, Ordering::SeqCst);
    }

    /// A lane falls asleep; returns whether the listener must be woken to take the
    /// stripes (they are not held yet).
    pub(crate) fn asleep(&self) -> bool {
        self.asleep.fetch_add(1, Ordering::SeqCst);
        self.session.load(Ordering::SeqCst) && !self.held.load(Ordering::SeqCst)
    }

    /// A lane that had fallen asleep is busy again.
    pub(crate) fn busy(&self) {
        let _ = self.asleep.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Whether some lane sleeps: the session should hold the stripes.
    pub(crate) fn wanted(&self) -> bool {
        self.asleep.load(Ordering::SeqCst) > 0
    }

    /// The session now holds them (or not: taken, released, or lost with it); once
    /// taken, the lanes are to look once more.
    pub(crate) fn set_held(&self, held: bool) {
        self.look_pending.store(held, Ordering::SeqCst);
        self.held.store(held, Ordering::SeqCst);
    }

    /// A lane has claimed since (its look).
    pub(crate) fn looked(&self) {
        self.look_pending.store(false, Ordering::SeqCst);
    }

    /// Whether the instance is marked idle: inserts notify it, and its lanes have
    /// looked once more since (what `EngineStats::marked_idle` says).
    pub(crate) fn marked_idle(&self) -> bool {
        self.held.load(Ordering::SeqCst) && !self.look_pending.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stripes_are_wanted_while_any_lane_sleeps_and_the_first_to_sleep_wakes_the_listener() {
        let stripes = Stripes::default();
        stripes.set_session(true);
        assert!(!stripes.wanted());
        assert!(stripes.asleep(), "not held: wake the listener");
        assert!(stripes.asleep(), "still not held");
        stripes.set_held(true);
        stripes.busy();
        assert!(stripes.wanted(), "one lane still sleeps");
        stripes.busy();
        assert!(!stripes.wanted());
        stripes.busy();
        assert!(!stripes.wanted(), "a busy lane never counts below zero");
        assert!(!stripes.asleep(), "held already: nothing to wake");
        assert!(!Stripes::default().asleep(), "no session: nobody to wake");
    }
}
