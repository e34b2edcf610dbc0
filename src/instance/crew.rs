//! The workers' threads: hired when the instance starts, one hired in the place of
//! each worker the watchdog abandons (its task ignored its time limit and its grace),
//! and waited for at the stop, all but the abandoned ones: a Rust thread cannot be
//! killed, and an instance that waited for one would never stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::context::InstanceHandle;
use crate::error::Error;
use crate::instance::completer::Outbox;
use crate::instance::connections::Connections;
use crate::instance::handoff::Handoff;
use crate::instance::in_flight::InFlight;
use crate::instance::lock;
use crate::instance::server_clock::ServerClock;
use crate::instance::watchdog::Watchdog;
use crate::instance::worker::{self, Slot};
use crate::registry::Registry;

/// What the workers of one lane are made of.
pub(crate) struct Recipe {
    pub handoff: Arc<Handoff>,
    pub registry: Registry,
    pub instance: Arc<InstanceHandle>,
    pub in_flight: Arc<InFlight>,
    pub clock: Arc<ServerClock>,
    pub watchdog: Arc<Watchdog>,
    /// Where an abandoned attempt is recorded.
    pub connections: Connections,
    pub grace: Duration,
}

/// One worker to start: worker `index` of the lane of `recipe`, with its outbox.
pub(crate) struct Hire {
    pub recipe: Arc<Recipe>,
    pub index: usize,
    pub outbox: Outbox,
}

#[derive(Default)]
pub(crate) struct Crew {
    members: Mutex<Vec<Member>>,
    changed: Condvar,
    /// Workers abandoned so far.
    pub abandoned: AtomicU64,
}

struct Member {
    handle: JoinHandle<()>,
    slot: Arc<Slot>,
    /// Its thread has run to its end (set under the members' lock).
    ended: Arc<AtomicBool>,
}

/// Tells the crew that a worker's thread ended, however it ended.
struct Leaving(Arc<Crew>, Arc<AtomicBool>);

impl Drop for Leaving {
    fn drop(&mut self) {
        let _members = lock(&self.0.members);
        self.1.store(true, Ordering::SeqCst);
        self.0.changed.notify_all();
    }
}

impl Crew {
    /// Starts the instance's workers (its [`Stage::Workers`](super::parts::Stage)); joined
    /// by [`Crew::join`]. Stops at the first that cannot start.
    pub(crate) fn hire_all(self: &Arc<Self>, hires: Vec<Hire>) -> Result<(), Error> {
        for Hire { recipe, index, outbox } in hires {
            self.hire(&recipe, index, outbox)
                .map_err(|source| Error::Io { context: format!("could not start thread worker-{index}"), source })?;
        }
        Ok(())
    }

    /// Starts worker `index` of a lane, with its outbox.
    fn hire(self: &Arc<Self>, recipe: &Arc<Recipe>, index: usize, outbox: Outbox) -> std::io::Result<()> {
        let slot = Arc::new(Slot::new(outbox));
        let replace: Arc<dyn Fn(Outbox) + Send + Sync> = {
            let (crew, recipe) = (Arc::clone(self), Arc::clone(recipe));
            Arc::new(move |outbox| {
                crew.abandoned.fetch_add(1, Ordering::SeqCst);
                if let Err(error) = crew.hire(&recipe, index, outbox) {
                    log::error!("no worker could be started in the place of abandoned worker {index}: {error}");
                }
            })
        };
        let input = worker::Input {
            index,
            handoff: Arc::clone(&recipe.handoff),
            registry: recipe.registry.clone(),
            slot: Arc::clone(&slot),
            instance: Arc::clone(&recipe.instance),
            in_flight: Arc::clone(&recipe.in_flight),
            clock: Arc::clone(&recipe.clock),
            watchdog: Arc::clone(&recipe.watchdog),
            connections: recipe.connections.clone(),
            grace: recipe.grace,
            replace,
        };
        let ended = Arc::new(AtomicBool::new(false));
        let leaving = Leaving(Arc::clone(self), Arc::clone(&ended));
        let handle = std::thread::Builder::new().name(format!("worker-{index}")).spawn(move || {
            let _leaving = leaving;
            worker::run(input);
        })?;
        lock(&self.members).push(Member { handle, slot, ended });
        self.changed.notify_all();
        Ok(())
    }

    /// Waits until every worker has ended or been abandoned (after a stop), and joins
    /// those that ended; the abandoned ones are left to run their task to its end.
    /// Returns how many abandoned workers still run.
    pub(crate) fn join(&self) -> usize {
        self.join_while(|m| !m.slot.abandoned())
    }

    /// Waits until the abandoned workers have ended too (their tasks returned).
    pub(crate) fn join_abandoned(&self) {
        self.join_while(|_| true);
    }

    /// Joins the workers as they end, until none that `awaited` is left; returns how
    /// many others still run.
    fn join_while(&self, awaited: impl Fn(&Member) -> bool) -> usize {
        let mut members = lock(&self.members);
        loop {
            let (ended, running): (Vec<Member>, Vec<Member>) =
                members.drain(..).partition(|m| m.ended.load(Ordering::SeqCst));
            *members = running;
            if ended.is_empty() {
                if !members.iter().any(&awaited) {
                    return members.len();
                }
                // Every end and abandonment notifies under this lock; the timeout is a
                // safety net.
                members = self
                    .changed
                    .wait_timeout(members, Duration::from_secs(1))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            drop(members);
            for member in ended {
                let name = member.handle.thread().name().unwrap_or("worker").to_owned();
                if member.handle.join().is_err() {
                    log::error!("{name} ended by a panic outside any task");
                }
            }
            members = lock(&self.members);
        }
    }
}
