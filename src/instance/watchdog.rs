//! The watchdog: the deadlines of the attempts that run under a time limit. At an
//! attempt's deadline it asks the task to stop (the flag behind
//! `ctx.stop_requested()`); a grace later, if the attempt has not returned, it gives up
//! on the worker: the attempt's `abandon` records it as timed out and puts a new worker
//! in its place. A Rust thread cannot be killed: the abandoned one runs on until its
//! task returns, and its task waits for that (see `worker`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::instance::lock;
use crate::instance::parts::{Part, Stage};

/// One attempt under a time limit.
pub(crate) struct Watch {
    pub task_id: i64,
    pub deadline: Instant,
    pub grace: Duration,
    /// Set at the deadline: the task is asked to stop.
    pub stop: Arc<AtomicBool>,
    /// Called once the grace has passed, on the watchdog's thread, unless the attempt
    /// was unwatched first.
    pub abandon: Box<dyn FnOnce() + Send>,
}

/// Starts the watchdog's thread; its [`Part`] stops it (once the workers have ended).
pub(crate) fn spawn(watchdog: Arc<Watchdog>) -> Result<Part, Error> {
    let running = Arc::clone(&watchdog);
    Ok(Part::spawn("watchdog", Stage::Others, move || running.run())?.stopped_by(move || watchdog.stop()))
}

#[derive(Default)]
pub(crate) struct Watchdog {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    watches: HashMap<u64, (Watch, bool)>,
    next_token: u64,
    stopped: bool,
}

impl Watchdog {
    /// Watches an attempt until [`Watchdog::unwatch`] with the token returned.
    pub(crate) fn watch(&self, watch: Watch) -> u64 {
        let mut state = lock(&self.state);
        state.next_token += 1;
        let token = state.next_token;
        state.watches.insert(token, (watch, false));
        drop(state);
        self.changed.notify_one();
        token
    }

    /// The attempt returned: no more watching.
    pub(crate) fn unwatch(&self, token: u64) {
        lock(&self.state).watches.remove(&token);
    }

    /// Ends [`Watchdog::run`]: once the workers have all ended or been abandoned.
    pub(crate) fn stop(&self) {
        lock(&self.state).stopped = true;
        self.changed.notify_one();
    }

    /// The watchdog's thread: sleeps until the next deadline or end of a grace.
    fn run(&self) {
        let mut state = lock(&self.state);
        while !state.stopped {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let mut over = Vec::new();
            for (token, (watch, asked)) in state.watches.iter_mut() {
                if !*asked && now >= watch.deadline {
                    *asked = true;
                    watch.stop.store(true, Ordering::Relaxed);
                    log::warn!(
                        "task {}: past its time limit, asked to stop (abandoned in {:?} if it has not returned)",
                        watch.task_id,
                        watch.grace
                    );
                }
                let due = if *asked { watch.deadline + watch.grace } else { watch.deadline };
                if now >= due {
                    over.push(*token);
                } else {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
            if !over.is_empty() {
                let abandoned: Vec<Watch> =
                    over.iter().filter_map(|t| state.watches.remove(t)).map(|(w, _)| w).collect();
                drop(state);
                for watch in abandoned {
                    (watch.abandon)();
                }
                state = lock(&self.state);
                continue;
            }
            state = match next {
                Some(at) => {
                    self.changed
                        .wait_timeout(state, at.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self.changed.wait(state).unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn an_attempt_is_asked_to_stop_at_its_deadline_and_abandoned_after_its_grace_unless_it_returned() {
        let watchdog = Arc::new(Watchdog::default());
        let thread = std::thread::spawn({
            let watchdog = Arc::clone(&watchdog);
            move || watchdog.run()
        });
        let (abandoned, told) = mpsc::channel();
        let watch = |task_id: i64, stop: &Arc<AtomicBool>| {
            let abandoned = abandoned.clone();
            Watch {
                task_id,
                deadline: Instant::now() + Duration::from_millis(20),
                grace: Duration::from_millis(30),
                stop: Arc::clone(stop),
                abandon: Box::new(move || abandoned.send(task_id).unwrap()),
            }
        };
        let (stuck, returned) = (Arc::default(), Arc::default());
        watchdog.watch(watch(1, &stuck));
        let token = watchdog.watch(watch(2, &returned));
        watchdog.unwatch(token);
        assert_eq!(told.recv_timeout(Duration::from_secs(10)), Ok(1));
        assert!(stuck.load(Ordering::Relaxed), "the stuck attempt was not asked to stop");
        assert!(!returned.load(Ordering::Relaxed), "an attempt that returned was asked to stop");
        assert!(told.try_recv().is_err(), "an attempt that returned was abandoned");
        watchdog.stop();
        thread.join().unwrap();
    }
}
