//! The scheduler: one thread per instance that sleeps until the earliest scheduled
//! task (a task enqueued to run later, or a failed one waiting for its retry) is due,
//! then wakes as many idle workers as there are due tasks. No polling: it is armed
//!
//! - at start, after every (re)connection of the listener and after each due time, by a
//!   query for the next due time among the waiting tasks of the types this instance
//!   runs (it walks `tasks_scheduled_idx`, which holds scheduled tasks only);
//! - by a notification whose inserted tasks include scheduled ones (the trigger sends
//!   how far ahead the earliest is), so that a task scheduled earlier than everything
//!   already waiting re-arms it;
//! - by a worker that has just scheduled a retry.
//!
//! Times from the database are taken as delays (`run_at - now()` on the server), so the
//! instance's clock need not agree with the server's.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Text};

use crate::runner::Shared;

/// The longest pause after the database failed to answer.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct State {
    /// When the earliest known scheduled task is due.
    next: Option<Instant>,
    /// Ask the database for the next due time.
    refresh: bool,
    stopping: bool,
}

/// The scheduler's alarm clock, shared with the listener and the workers.
#[derive(Debug, Default)]
pub(crate) struct Timer {
    state: Mutex<State>,
    condvar: Condvar,
}

impl Timer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes sure the scheduler wakes by `at`.
    pub(crate) fn arm(&self, at: Instant) {
        let mut state = self.lock();
        if state.next.map_or(true, |next| at < next) {
            state.next = Some(at);
            self.condvar.notify_one();
        }
    }

    /// Makes the scheduler ask the database for the next due time now.
    pub(crate) fn refresh(&self) {
        self.lock().refresh = true;
        self.condvar.notify_one();
    }

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
            state = self.condvar.wait_timeout(state, until - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Why the scheduler woke.
#[derive(Debug, PartialEq, Eq)]
enum Alarm {
    /// A known scheduled task is due.
    Due,
    /// Asked to look (start, reconnection) or the fallback poll.
    Look,
}

#[derive(QueryableByName)]
struct Due {
    /// Waiting tasks due now (counted up to the number of workers).
    #[diesel(sql_type = BigInt)]
    due: i64,
    /// Seconds until the next scheduled task is due.
    #[diesel(sql_type = Nullable<Double>)]
    next_in: Option<f64>,
}

/// Runs the scheduler until the instance stops.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut failures = 0u32;
    // The fallback poll bounds every sleep, as a safety net.
    while let Some(alarm) = shared.timer.wait(shared.poll_interval) {
        if alarm == Alarm::Due {
            // The task we armed for is due: the producer can claim it while we count
            // the others (the armed time is never early: delays are measured from
            // before they reached us).
            shared.wakeup.wake(1);
        }
        match look(&shared) {
            Ok(due) => {
                failures = 0;
                if due.due > 0 {
                    shared.wakeup.wake(usize::try_from(due.due).unwrap_or(usize::MAX));
                }
                if let Some(next_in) = due.next_in {
                    shared.timer.arm(Instant::now() + Duration::from_secs_f64(next_in.max(0.0)));
                }
            }
            Err(error) => {
                failures += 1;
                let pause = (Duration::from_millis(100) * 2u32.pow(failures.min(7) - 1)).min(MAX_BACKOFF);
                log::error!("scheduler: could not read the next due time ({error}); trying again in {pause:?}");
                shared.timer.arm(Instant::now() + pause);
            }
        }
    }
    log::debug!("scheduler stopped");
}

fn look(shared: &Shared) -> Result<Due, crate::Error> {
    let mut conn = shared.pool.get()?;
    let workers = i64::try_from(shared.wakeup.capacity()).unwrap_or(i64::MAX);
    Ok(diesel::sql_query(
        "SELECT
             (SELECT count(*) FROM (
                 SELECT 1 FROM tasks
                 WHERE status = 'waiting' AND run_at <= now() AND task_class = ANY($1)
                 LIMIT $2) d) AS due,
             (SELECT extract(epoch FROM min(run_at) - now())::float8 FROM tasks
              WHERE status = 'waiting' AND run_at > created_at AND run_at > now()
                AND task_class = ANY($1)) AS next_in",
    )
    .bind::<Array<Text>, _>(&shared.task_classes)
    .bind::<BigInt, _>(workers)
    .get_result(&mut conn)?)
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
