//! The server's clock as the instance reads it: every instant an attempt's record holds
//! (its start, its end) is the instance's monotonic clock plus one offset, kept current
//! from the claims' own `now()`, so that the record of one worker's attempts keeps
//! their order and never overlaps, whichever claims they came in, and costs no round
//! trip.
//!
//! A claim's `now()` is the server's time at some instant between the claim's sending
//! and its answer, so `now() - answer` is a lower bound of the offset. The clock keeps
//! the highest bound seen lately: it never runs ahead of the server by more than the
//! shortest answer's latency, and an instant it gives is never before the claim of the
//! task it dates. "Lately" is the last two windows of [`WINDOW`], so that the offset
//! follows a drift between the two clocks, slowly; a worker's record stays in order
//! across such a step on its own (`instance/worker.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::instance::lock;

/// How long a bound counts before it gives way to newer ones.
const WINDOW: Duration = Duration::from_secs(300);

pub(crate) struct ServerClock {
    /// The instant the offsets are taken from.
    base: Instant,
    bounds: Mutex<Bounds>,
}

/// The server's time at `base`, in microseconds since the epoch, by the highest lower
/// bound of this window and of the last.
struct Bounds {
    current: Option<i64>,
    previous: Option<i64>,
    window_from: Instant,
    /// Before any claim: the instance's own wall clock at `base`.
    fallback: i64,
}

impl ServerClock {
    pub(crate) fn new() -> Self {
        let base = Instant::now();
        let fallback = Utc::now().timestamp_micros();
        Self { base, bounds: Mutex::new(Bounds { current: None, previous: None, window_from: base, fallback }) }
    }

    /// A statement that started on the server at `server_now` (its `now()`) answered
    /// at `answered`.
    pub(crate) fn observe(&self, server_now: DateTime<Utc>, answered: Instant) {
        let bound = server_now.timestamp_micros() - micros(answered.saturating_duration_since(self.base));
        let mut bounds = lock(&self.bounds);
        let age = bounds.window_from.elapsed();
        if age >= WINDOW {
            // After an idle spell of two windows, the last bounds are too old to keep.
            bounds.previous = if age < 2 * WINDOW { bounds.current.take() } else { None };
            bounds.current = None;
            bounds.window_from = Instant::now();
        }
        bounds.current = Some(bounds.current.map_or(bound, |b| b.max(bound)));
    }

    /// `instant` on the server's clock.
    pub(crate) fn at(&self, instant: Instant) -> DateTime<Utc> {
        let bounds = lock(&self.bounds);
        let at_base = match (bounds.current, bounds.previous) {
            (None, None) => bounds.fallback,
            (a, b) => a.max(b).expect("one is set"),
        };
        drop(bounds);
        let since = instant.saturating_duration_since(self.base);
        DateTime::from_timestamp_micros(at_base.saturating_add(micros(since))).unwrap_or_else(Utc::now)
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_the_highest_bound_and_never_dates_a_start_before_its_claim() {
        let clock = ServerClock::new();
        let t0 = clock.base + Duration::from_millis(10);
        let server = DateTime::from_timestamp(1_000_000, 0).unwrap();
        // A slow answer (5 ms after the server's now()) and a quick one (1 ms).
        clock.observe(server, t0 + Duration::from_millis(5));
        clock.observe(server + chrono::TimeDelta::milliseconds(20), t0 + Duration::from_millis(21));
        assert_eq!(clock.at(t0 + Duration::from_millis(21)), server + chrono::TimeDelta::milliseconds(20));
        // The slow answer's task, started when it arrived, is dated after its claim.
        assert!(clock.at(t0 + Duration::from_millis(5)) >= server);
        // A later, slower claim does not move the clock back.
        clock.observe(server + chrono::TimeDelta::milliseconds(30), t0 + Duration::from_millis(40));
        assert_eq!(clock.at(t0 + Duration::from_millis(21)), server + chrono::TimeDelta::milliseconds(20));
    }
}
