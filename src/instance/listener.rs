//! The listener: the instance's session, one raw `postgres` connection straight to
//! PostgreSQL (the listen URL), that listens on the engine's channel and turns each
//! notification into a wake-up. What needs a session lives on it: the instance's name
//! lock, taken first (a second live instance cannot use the name; one restarted under
//! it knows the previous holder is gone), and the [`stripes`](super::stripes) while a
//! lane sleeps. It lives until the instance retires, with the heartbeat.
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

use crate::db::channel::{self, Listening};
use crate::error::Error;
use crate::instance::backoff;
use crate::instance::connections::Connections;
use crate::instance::in_flight::InFlight;
use crate::instance::lanes::Lanes;
use crate::instance::parts::{Part, Stage};
use crate::instance::shutdown::Shutdown;
use crate::instance::stripes::Stripes;
use crate::instance::timer::Timer;

/// How often the listener, while waiting for notifications, looks at the instance's
/// retirement and at the stripes (a producer falling asleep wakes it sooner).
const STOP_CHECK: Duration = Duration::from_millis(100);

/// How soon the listener tries the stripes again when an inserter held one.
const STRIPES_RETRY: Duration = Duration::from_millis(1);

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
    /// Held on the session while a lane sleeps.
    pub stripes: Arc<Stripes>,
    /// Logged when there is no listener.
    pub poll_interval: Duration,
    /// Set once the instance's last attempt is recorded: the session, which holds the
    /// name, lives until then.
    pub retired: Shutdown,
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

/// Starts the listener, unless the instance has none: opens its session (or fails
/// here: the database cannot be reached, or the instance's name is held by another
/// live session); it listens until the instance retires (its name lives as long).
pub(crate) fn spawn(input: Input) -> Result<Option<Part>, Error> {
    let Some(config) = input.connections.listener()? else {
        log::info!("instance {}: no listener: it polls every {:?}", input.instance, input.poll_interval);
        return Ok(None);
    };
    let (listening, cancelled) = Listening::start(&config, &input.connections.listen_server(), &input.instance, None)?;
    if !listening.holds_name() {
        return Err(Error::Config(format!(
            "instance name `{}` is in use by a running instance: give this one another name",
            input.instance
        )));
    }
    let retired = input.retired.clone();
    let listener = Listener { input, config, backend: None };
    let first = Some((listening, cancelled));
    Ok(Some(Part::spawn("listener", Stage::Heartbeat, move || listener.run(first))?.stopped_by(move || {
        retired.stop();
    })))
}

/// A listener ready to run: its connection settings are checked.
struct Listener {
    input: Input,
    config: postgres::Config,
    /// The server process of its last session: one that lingers on the server (a
    /// half-open socket) is ended by the next, to take the name back.
    backend: Option<i32>,
}

impl Listener {
    /// Runs until the instance retires, from its first session.
    fn run(mut self, mut first: Option<(Listening, Vec<i64>)>) {
        let mut failures = 0u32;
        while !self.input.retired.is_stopped() {
            let server = self.input.connections.listen_server();
            let started = first
                .take()
                .map_or_else(|| Listening::start(&self.config, &server, &self.input.instance, self.backend), Ok);
            let lost = match started {
                Ok((listening, cancelled)) => {
                    failures = 0;
                    self.backend = Some(listening.backend());
                    if !listening.holds_name() {
                        log::error!(
                            "instance {}: its name is held by another session (a second instance of that name?): \
                             listening without it",
                            self.input.instance
                        );
                    }
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
            self.input.connections.session_open(false);
            self.input.stripes.set_held(false);
            let Some(why) = lost else { break };
            failures += 1;
            // None after a first loss: the server may have closed just this connection.
            let pause = backoff::pause(failures - 1);
            if failures == 1 {
                log::warn!("{why}; reconnecting");
            } else {
                log::error!("{why}; trying again in {pause:?}");
            }
            if self.input.retired.sleep(pause) {
                break;
            }
        }
        log::debug!("listener stopped");
    }

    /// Listens until the instance retires (`None`) or the connection is lost (why);
    /// between waits, holds the stripes while a lane sleeps.
    fn listen(&self, mut listening: Listening) -> Option<String> {
        let input = &self.input;
        log::debug!("listening on {}", listening.channel());
        input.connections.session_open(true);
        // Whatever was inserted while we were not listening: look for it now, and for
        // the next task due later.
        input.lanes.wake_all();
        input.timer.refresh();
        input.stats.connections.fetch_add(1, Ordering::SeqCst);
        input.stats.listening.store(true, Ordering::SeqCst);
        let mut held = false;
        while !input.retired.is_stopped() {
            let wanted = input.stripes.wanted();
            let mut wait = STOP_CHECK;
            if wanted && !held {
                match listening.take_stripes() {
                    Ok(true) => {
                        held = true;
                        input.stripes.set_held(true);
                        // A look for what was inserted before they were held, and for
                        // what became due meanwhile.
                        input.lanes.wake(1);
                        input.timer.refresh();
                    }
                    // An inserter holds one: it is about to commit. Try again shortly.
                    Ok(false) => wait = STRIPES_RETRY,
                    Err(error) => return Some(error.to_string()),
                }
            } else if !wanted && held {
                if let Err(error) = listening.release_stripes() {
                    return Some(error.to_string());
                }
                held = false;
                input.stripes.set_held(false);
            }
            match listening.next(wait) {
                // A producer falling asleep woke the listeners (to take the stripes).
                Ok(Some(payload)) if payload == channel::WAKE_LISTENERS => {}
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
