//! The timer: a thread that sleeps until the earliest task not due yet of the
//! instance's types (enqueued for later, or waiting for its retry) is due, then wakes
//! the producer. It does not poll: its [`Timer`] is armed by a query for the next due
//! time (at start, after every (re)connection of the listener, after each due time,
//! when the instance falls asleep), by a notification whose insert includes a
//! task due later, and by the completer when it records a retry.
//!
//! Due times are taken as delays from the server's clock (`run_at - now()`), so the
//! instance's clock need not agree with the server's.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::db::claim;
use crate::error::Error;
use crate::instance::connections::Connections;
use crate::instance::lanes::Lanes;
use crate::instance::parts::{Part, Stage};
use crate::instance::{backoff, lock};

/// What the timer needs.
pub(crate) struct Input {
    /// Its look for the next due time goes on the claims' connection.
    pub connections: Connections,
    /// The types it looks for: those the instance can run.
    pub task_types: Vec<&'static str>,
    pub timer: Arc<Timer>,
    /// Woken when tasks are due.
    pub lanes: Arc<Lanes>,
    /// The longest it sleeps without looking, as a safety net.
    pub poll_interval: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// When the earliest known task due later is due.
    next: Option<Instant>,
    /// Ask the database for the next due time.
    refresh: bool,
    stopping: bool,
}

/// The due-time timer, set by the listener, the producer and the completer.
#[derive(Debug, Default)]
pub(crate) struct Timer {
    state: Mutex<State>,
    condvar: Condvar,
}

/// Why the timer woke.
#[derive(Debug, PartialEq, Eq)]
enum Alarm {
    /// A known task due later is due.
    Due,
    /// Asked to look (start, reconnection) or the fallback poll.
    Look,
}

impl Timer {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Makes sure the timer wakes by `at`.
    pub(crate) fn arm(&self, at: Instant) {
        let mut state = self.lock();
        if state.next.map_or(true, |next| at < next) {
            state.next = Some(at);
            self.condvar.notify_one();
        }
    }

    /// Makes the timer ask the database for the next due time now.
    pub(crate) fn refresh(&self) {
        self.lock().refresh = true;
        self.condvar.notify_one();
    }

    /// Ends the timer's waits: the instance's waker on its shutdown.
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.condvar.notify_one();
    }

    /// Blocks until the armed time, a refresh request, or `fallback`, whichever comes
    /// first, and says which; `None` when the instance stops.
    fn wait(&self, fallback: Duration) -> Option<Alarm> {
        let mut state = self.lock();
        let start = Instant::now();
        loop {
            if state.stopping {
                return None;
            }
            let now = Instant::now();
            let due = state.next.is_some_and(|next| next <= now);
            if state.refresh || due || now >= start + fallback {
                state.refresh = false;
                state.next = None;
                return Some(if due { Alarm::Due } else { Alarm::Look });
            }
            let until = state.next.map_or(start + fallback, |next| next.min(start + fallback));
            state = self.condvar.wait_timeout(state, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Starts the timer: it runs until the instance stops.
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    Part::spawn("timer", Stage::Others, move || run(input))
}

fn run(input: Input) {
    let mut failures = 0u32;
    while let Some(alarm) = input.timer.wait(input.poll_interval) {
        if alarm == Alarm::Due {
            // The task we armed for is due: the producer can claim it while we count
            // the others (the armed time is never early: delays are measured from
            // before they reached us).
            input.lanes.wake(1);
        }
        match look(&input) {
            Ok(due) => {
                failures = 0;
                if due.now > 0 {
                    input.lanes.wake(usize::try_from(due.now).unwrap_or(usize::MAX));
                }
                if let Some(next_in) = due.next_in {
                    input.timer.arm(Instant::now() + Duration::from_secs_f64(next_in.max(0.0)));
                }
            }
            Err(error) => {
                failures += 1;
                let pause = backoff::pause(failures);
                log::error!("timer: could not read the next due time ({error}); trying again in {pause:?}");
                input.timer.arm(Instant::now() + pause);
            }
        }
    }
    log::debug!("timer stopped");
}

fn look(input: &Input) -> Result<claim::Due, Error> {
    let workers = i64::try_from(input.lanes.capacity()).unwrap_or(i64::MAX);
    let (connections, queues) = (&input.connections, input.lanes.queues());
    connections.claims(|conn| Ok(claim::due(conn, connections.session(), &queues, &input.task_types, workers)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_time_rearms_the_timer_and_a_later_one_does_not() {
        let timer = Arc::new(Timer::default());
        timer.arm(Instant::now() + Duration::from_secs(3600));
        timer.arm(Instant::now() + Duration::from_secs(7200));
        let waiter = {
            let timer = Arc::clone(&timer);
            std::thread::spawn(move || {
                let started = Instant::now();
                assert_eq!(timer.wait(Duration::from_secs(3600)), Some(Alarm::Due));
                started.elapsed()
            })
        };
        timer.arm(Instant::now() + Duration::from_millis(20));
        let waited = waiter.join().unwrap();
        assert!(waited < Duration::from_secs(60), "the earlier time did not re-arm the timer: {waited:?}");
    }

    #[test]
    fn a_refresh_or_a_stop_ends_the_wait() {
        let timer = Timer::default();
        timer.refresh();
        assert_eq!(timer.wait(Duration::from_secs(3600)), Some(Alarm::Look));
        timer.stop();
        assert_eq!(timer.wait(Duration::from_secs(3600)), None);
    }
}
