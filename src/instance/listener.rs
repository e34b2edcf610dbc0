//! The listener: one raw `postgres` connection per instance, outside the pool, that
//! listens on the engine's channel and turns each notification into a wake-up.
//!
//! The insert trigger notifies once per inserting statement, inside the inserting
//! transaction (PostgreSQL delivers at commit, drops on rollback), whoever inserts; its
//! payload says how many inserted tasks are runnable now and how far ahead the earliest
//! of the others is due. `engine cancel` notifies the task it cancels. Notifications
//! sent while the connection is down are lost for us, so after every (re)connection
//! the listener wakes the producer and the timer to look as if notified; it
//! reconnects at once after a first loss, then with backoff. A cancel or a queue's
//! change whose notification is lost all the same reaches the instance at its next
//! heartbeat (see [`heartbeat`](crate::instance::heartbeat)).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::db::channel::Listening;
use crate::error::Error;
use crate::instance::backoff;
use crate::instance::connections::Connections;
use crate::instance::in_flight::InFlight;
use crate::instance::lanes::Lanes;
use crate::instance::parts::{Part, Stage};
use crate::instance::shutdown::Shutdown;
use crate::instance::timer::Timer;

/// How often the listener, while waiting for notifications, looks at the shutdown.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// What the listener needs.
pub(crate) struct Input {
    /// Named in its `application_name`.
    pub instance: String,
    /// Where it gets its connection.
    pub connections: Connections,
    /// Woken for inserted tasks.
    pub lanes: Arc<Lanes>,
    /// Armed for inserted tasks due later.
    pub timer: Arc<Timer>,
    /// Told of cancellations.
    pub in_flight: Arc<InFlight>,
    pub shutdown: Shutdown,
    pub stats: Arc<Stats>,
}

/// What the listener counts.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub notifications: AtomicU64,
    /// Cancel requests heard (by notification, or found after a reconnection).
    pub cancels: AtomicU64,
    pub connections: AtomicU64,
    pub listening: AtomicBool,
}

/// The payload of a notification: tasks inserted (see the trigger function), or a
/// running task cancelled (`engine cancel`).
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
struct Payload {
    /// Inserted tasks that are runnable now.
    ready: u64,
    /// Seconds until the earliest inserted task not due yet is due.
    next_in: Option<f64>,
    /// A task to cancel.
    cancel: Option<i64>,
}

impl Payload {
    /// Reads a notification; one that is not ours is taken as "look, to be safe".
    fn read(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or(Self { ready: 1, ..Self::default() })
    }

    /// When the earliest inserted task not due yet is due, if the payload says so sensibly.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        let next_in = self.next_in.filter(|s| s.is_finite())?;
        Some(now + Duration::from_secs_f64(next_in.clamp(0.0, 1e9)))
    }
}

/// Starts the listener, once its connection settings are checked (it fails here if it
/// could never connect with them); it listens until the instance stops.
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    let config = input.connections.listener(&input.instance)?;
    let listener = Listener { input, config };
    Part::spawn("listener", Stage::Others, move || listener.run())
}

/// A listener ready to run: its connection settings are checked.
struct Listener {
    input: Input,
    config: postgres::Config,
}

impl Listener {
    /// Runs until the instance stops.
    fn run(self) {
        let mut failures = 0u32;
        while !self.input.shutdown.is_stopped() {
            let lost = match Listening::start(&self.config, &self.input.connections.server(), &self.input.instance) {
                Ok((listening, cancelled)) => {
                    failures = 0;
                    // Cancels of tasks running here, sent while nobody listened.
                    for id in cancelled {
                        self.input.stats.cancels.fetch_add(1, Ordering::Relaxed);
                        self.input.in_flight.cancel(id);
                    }
                    self.listen(listening)
                }
                Err(error) => Some(error.to_string()),
            };
            self.input.stats.listening.store(false, Ordering::SeqCst);
            let Some(why) = lost else { break };
            failures += 1;
            // None after a first loss: the server may have closed just this connection.
            let pause = backoff::pause(failures - 1);
            if failures == 1 {
                log::warn!("{why}; reconnecting");
            } else {
                log::error!("{why}; trying again in {pause:?}");
            }
            if self.input.shutdown.sleep(pause) {
                break;
            }
        }
        log::debug!("listener stopped");
    }

    /// Listens until the instance stops (`None`) or the connection is lost (why).
    fn listen(&self, mut listening: Listening) -> Option<String> {
        let input = &self.input;
        log::debug!("listening on {}", listening.channel());
        // Whatever was inserted while we were not listening: look for it now, and for
        // the next task due later.
        input.lanes.wake_all();
        input.timer.refresh();
        input.stats.connections.fetch_add(1, Ordering::SeqCst);
        input.stats.listening.store(true, Ordering::SeqCst);
        while !input.shutdown.is_stopped() {
            match listening.next(STOP_CHECK) {
                Ok(Some(payload)) => {
                    input.stats.notifications.fetch_add(1, Ordering::Relaxed);
                    self.wake_for(&Payload::read(&payload));
                }
                Ok(None) if listening.is_closed() => return Some("listener: connection closed by the server".into()),
                Ok(None) => {}
                Err(error) => return Some(error.to_string()),
            }
        }
        None
    }

    fn wake_for(&self, payload: &Payload) {
        let input = &self.input;
        if payload.ready > 0 {
            input.lanes.wake(usize::try_from(payload.ready).unwrap_or(usize::MAX));
        }
        if let Some(at) = payload.next_due(Instant::now()) {
            input.timer.arm(at);
        }
        if let Some(task_id) = payload.cancel {
            input.stats.cancels.fetch_add(1, Ordering::Relaxed);
            input.in_flight.cancel(task_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_says_what_is_ready_when_the_next_is_due_and_what_to_cancel() {
        let now = Instant::now();
        let inserted = Payload::read(r#"{"ready": 3, "first_id": 9, "next_in": 1.5}"#);
        assert_eq!(inserted.ready, 3);
        assert_eq!(inserted.next_due(now), Some(now + Duration::from_millis(1500)));
        assert_eq!(Payload::read(r#"{"cancel": 42}"#).cancel, Some(42));
        assert_eq!(Payload::read(r#"{"ready": 0, "next_in": -2}"#).next_due(now), Some(now), "overdue: now");
    }

    #[test]
    fn a_payload_that_is_not_ours_means_look_and_a_senseless_due_time_is_ignored() {
        let now = Instant::now();
        assert_eq!(Payload::read("hello").ready, 1);
        assert_eq!(Payload::read(r#"{"ready": 1, "next_in": null}"#).next_due(now), None);
        let far = Payload { next_in: Some(f64::INFINITY), ..Payload::default() };
        assert_eq!(far.next_due(now), None);
    }
}
