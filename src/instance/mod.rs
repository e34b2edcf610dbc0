//! One running instance: a thread per part, each given the inputs it needs and
//! nothing more (its `Input`). Every part has one lifecycle ([`parts`]: it spawns from
//! its input and is stopped and joined through its `Part`, in the order of one table);
//! the [`assembly`] builds the inputs and starts and stops the parts in that order; every
//! part gets its connections from [`connections`].
//!
//! A task's way through the parts: its queue's [`producer`] claims it (for the idle
//! workers of that queue and a buffer) and puts it in the queue's [`handoff`] (a lane
//! each, [`lanes`]); a [`worker`] of that queue takes it, runs it and leaves its
//! outcome with the [`completer`], which records outcomes in batches; the [`crew`]
//! starts the workers, and the [`watchdog`] abandons one whose task ignores its time
//! limit, for a new one in its place. The [`listener`] (notifications) and the
//! [`timer`] (due times) tell the lanes when there is work; the [`heartbeat`] keeps
//! the instance alive in the database and runs the [`rescue`] of lost attempts; the
//! [`vacuum`] keeps claims fast; [`cron`] fires the schedules of recurring tasks.
//! Shared between them: the [`in_flight`] tasks and their cancellations, the one
//! [`shutdown`], the one [`backoff`], the [`server_clock`] that dates attempts.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub(crate) mod assembly;
pub(crate) mod backoff;
pub(crate) mod completer;
pub(crate) mod connections;
pub(crate) mod crew;
pub(crate) mod cron;
pub(crate) mod handoff;
pub(crate) mod heartbeat;
pub(crate) mod in_flight;
pub(crate) mod lanes;
pub(crate) mod listener;
pub(crate) mod parts;
pub(crate) mod producer;
pub(crate) mod rescue;
pub(crate) mod server_clock;
pub(crate) mod shutdown;
pub(crate) mod stripes;
pub(crate) mod timer;
pub(crate) mod vacuum;
pub(crate) mod watchdog;
pub(crate) mod worker;

/// Locks a mutex of the instance. None of them is held across a task or a query, and
/// their data stays consistent if a holder ever panicked, so a poisoned lock is still
/// used rather than passed on as a panic to every other thread.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
