//! The listener: one raw `postgres` connection per instance, outside the pool, that
//! runs `LISTEN` on the engine's channel and turns each notification into wake-ups in
//! the [`WakeupQueue`](crate::wakeup::WakeupQueue).
//!
//! The notification is sent by a trigger on `tasks` (second migration), once per
//! inserting statement, inside the inserting transaction: PostgreSQL delivers it at
//! commit and drops it on rollback, and it comes whoever inserts (this library, the
//! CLI, plain SQL). Its payload says how many of the inserted tasks are runnable now,
//! and the listener wakes the producer, which claims once for as many tasks as its
//! idle workers (and buffer) have room for: one claim per instance per notification.
//! Since the fifth migration the trigger notifies only when some instance sleeps
//! (see the producer).
//!
//! Notifications sent while the connection is down are lost for us, so after every
//! (re)connection the listener wakes the producer to look for work as if notified.
//! Reconnections back off from 100 ms to 5 s. The producer's slow fallback poll
//! remains as a safety net.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use serde::Deserialize;

use crate::cluster::{quote_identifier, redact_url};
use crate::runner::Shared;
use crate::Error;

/// How often the listener, while waiting for notifications, looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// The longest pause between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The channel of the tasks table in `schema`. The schema is the per-deployment
/// prefix: two engines sharing a database keep their tables in two schemas, and do
/// not wake each other. Mirrors the trigger function `task_engine_notify_insert`.
pub fn channel_name(schema: &str) -> String {
    // Channel names are identifiers: at most 63 bytes.
    let prefix: String = schema
        .chars()
        .scan(0, |len, c| {
            *len += c.len_utf8();
            (*len <= 50).then_some(c)
        })
        .collect();
    format!("{prefix}.task_engine")
}

/// The payload of a notification: tasks inserted (see the trigger function), or a
/// running task cancelled (`engine cancel`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Payload {
    /// Inserted tasks that are runnable now.
    ready: u64,
    /// Seconds until the earliest inserted scheduled task is due.
    next_in: Option<f64>,
    /// A task to cancel.
    cancel: Option<i64>,
}

/// How a listening session ended.
enum Ended {
    Stopped,
    Lost(String),
}

pub(crate) struct Listener {
    shared: Arc<Shared>,
    config: postgres::Config,
    /// The URL, without its password, for messages.
    server: String,
}

impl Listener {
    pub(crate) fn new(shared: Arc<Shared>, database_url: &str) -> Result<Self, Error> {
        let server = redact_url(database_url);
        let mut config: postgres::Config =
            database_url.parse().map_err(|e| Error::Config(format!("bad database URL {server}: {e}")))?;
        config
            .application_name(&format!("task_engine listener {}", shared.instance))
            .connect_timeout(Duration::from_secs(5))
            // A server or network that vanishes without closing the socket is noticed
            // within about half a minute.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        Ok(Self { shared, config, server })
    }

    /// Runs until the instance stops.
    pub(crate) fn run(self) {
        let mut failures = 0u32;
        loop {
            if self.shared.stop.is_stopped() {
                break;
            }
            let ended = match self.connect() {
                Ok((client, channel)) => {
                    failures = 0;
                    self.listen(client, &channel)
                }
                Err(message) => Ended::Lost(message),
            };
            self.shared.counters.listening.store(false, Ordering::SeqCst);
            match ended {
                Ended::Stopped => break,
                Ended::Lost(message) => {
                    failures += 1;
                    let pause = backoff(failures);
                    if failures == 1 {
                        log::warn!("listener: {message}; reconnecting");
                    } else {
                        log::error!("listener: {message}; trying again in {pause:?}");
                    }
                    if self.shared.stop.wait(pause) {
                        break;
                    }
                }
            }
        }
        log::debug!("listener stopped");
    }

    /// Connects, finds the channel of the `tasks` table this connection sees, and
    /// listens on it.
    fn connect(&self) -> Result<(Client, String), String> {
        let fail = |what: &str, e: postgres::Error| format!("could not {what} on {}: {e}", self.server);
        let mut client = self.config.connect(NoTls).map_err(|e| fail("connect", e))?;
        let row = client
            .query_one(
                "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass('tasks')",
                &[],
            )
            .map_err(|e| fail("find the tasks table (run `engine migrate`)", e))?;
        let channel = channel_name(row.get::<_, &str>(0));
        client.batch_execute(&format!("LISTEN {}", quote_identifier(&channel))).map_err(|e| fail("LISTEN", e))?;
        Ok((client, channel))
    }

    fn listen(&self, mut client: Client, channel: &str) -> Ended {
        let counters = &self.shared.counters;
        log::debug!("listening on {channel}");
        // Whatever was inserted while we were not listening: look for it now, and for
        // the next scheduled task.
        self.shared.wakeup.wake_all();
        self.shared.timer.refresh();
        counters.listener_connections.fetch_add(1, Ordering::SeqCst);
        counters.listening.store(true, Ordering::SeqCst);
        loop {
            if self.shared.stop.is_stopped() {
                return Ended::Stopped;
            }
            {
                let mut notifications = client.notifications();
                let mut iter = notifications.timeout_iter(STOP_CHECK);
                loop {
                    match iter.next() {
                        Ok(Some(notification)) => {
                            counters.notifications.fetch_add(1, Ordering::Relaxed);
                            self.wake_for(notification.payload());
                        }
                        Ok(None) => break,
                        Err(e) => return Ended::Lost(format!("connection lost: {e}")),
                    }
                }
            }
            if client.is_closed() {
                return Ended::Lost("connection closed by the server".to_owned());
            }
        }
    }

    fn wake_for(&self, payload: &str) {
        match serde_json::from_str::<Payload>(payload) {
            Ok(payload) => {
                if payload.ready > 0 {
                    self.shared.wakeup.wake(usize::try_from(payload.ready).unwrap_or(usize::MAX));
                }
                if let Some(next_in) = payload.next_in.filter(|s| s.is_finite()) {
                    let delay = Duration::from_secs_f64(next_in.clamp(0.0, 1e9));
                    self.shared.timer.arm(std::time::Instant::now() + delay);
                }
                if let Some(task_id) = payload.cancel {
                    self.shared.cancels.cancel(task_id);
                }
            }
            // Someone else's NOTIFY on our channel: look, to be safe.
            Err(_) => self.shared.wakeup.wake(1),
        }
    }
}

/// The pause after `failures` consecutive failures: none after a first loss (the
/// server may have merely closed this one connection), then 100 ms doubling up to
/// [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    (Duration::from_millis(100) * 2u32.pow((failures - 2).min(16))).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_backs_off_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[test]
    fn the_channel_is_the_schema_with_a_suffix_within_63_bytes() {
        assert_eq!(channel_name("public"), "public.task_engine");
        assert!(channel_name(&"é".repeat(40)).len() <= 63);
    }
}
