//! The default retry delay, from one set of constants: [`default_retry_delay`] in Rust,
//! and the same curve in SQL ([`RetryCurve::sql_seconds`]) for the rescue of lost
//! attempts, whose task types the rescuing instance may not know.

use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

/// A retry delay of `attempt^exponent + base_seconds` seconds after failed attempt
/// `attempt` (from 1, at most `attempt_cap`), give or take `jitter_percent` at random.
pub(crate) struct RetryCurve {
    exponent: i32,
    base_seconds: i32,
    jitter_percent: i32,
    attempt_cap: i32,
}

/// The default curve: `attempt^4 + 3` seconds, give or take 10%.
pub(crate) const DEFAULT: RetryCurve =
    RetryCurve { exponent: 4, base_seconds: 3, jitter_percent: 10, attempt_cap: 100 };

impl RetryCurve {
    /// The wait after failed attempt `attempt`, in seconds, `unit` in [0, 1) placing it
    /// within the jitter.
    pub(crate) fn seconds(&self, attempt: i32, unit: f64) -> f64 {
        let attempt = f64::from(attempt.clamp(1, self.attempt_cap));
        (attempt.powi(self.exponent) + f64::from(self.base_seconds)) * (self.low() + self.spread() * unit)
    }

    /// The same wait as a SQL expression of `attempts` (an expression of at least 1) and
    /// `unit` (`random()` in the rescue).
    pub(crate) fn sql_seconds(&self, attempts: &str, unit: &str) -> String {
        format!(
            "(power(least({attempts}, {}), {}) + {}) * ({} + {} * {unit})",
            self.attempt_cap,
            self.exponent,
            self.base_seconds,
            self.low(),
            self.spread()
        )
    }

    /// The smallest factor of the jitter: 0.9 for 10%.
    fn low(&self) -> f64 {
        f64::from(100 - self.jitter_percent) / 100.0
    }

    /// The jitter's width: 0.2 for 10%.
    fn spread(&self) -> f64 {
        f64::from(2 * self.jitter_percent) / 100.0
    }
}

/// The default wait before a retry: `attempt^4 + 3` seconds, give or take 10% at
/// random so that tasks that failed together do not retry together: about 4 s, 19 s,
/// 84 s, 4.3 min, 10.5 min, ... 3.8 days before the 25th attempt; 25 attempts span
/// about three weeks.
pub fn default_retry_delay(attempt: i32) -> Duration {
    Duration::from_secs_f64(DEFAULT.seconds(attempt, unit_random()))
}

/// A number in [0, 1) good enough for jitter, without a random-number crate: the
/// standard library's randomly keyed hasher over the time and a counter.
fn unit_random() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::{Double, Integer};

    use super::*;

    #[test]
    fn the_default_retry_delay_grows_as_the_fourth_power_with_ten_percent_jitter() {
        for (attempt, base) in [(1, 4.0), (2, 19.0), (3, 84.0), (10, 10_003.0)] {
            let delays: Vec<f64> = (0..50).map(|_| default_retry_delay(attempt).as_secs_f64()).collect();
            assert!(delays.iter().all(|d| *d >= base * 0.9 && *d <= base * 1.1), "attempt {attempt}: {delays:?}");
            let spread =
                delays.iter().cloned().fold(f64::MIN, f64::max) - delays.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread > base * 0.02, "attempt {attempt}: no jitter in {delays:?}");
        }
    }

    /// The rescue's SQL and the Rust function give the same wait, for every attempt and
    /// across the jitter.
    #[test]
    fn the_retry_curve_in_sql_agrees_with_the_one_in_rust() {
        #[derive(QueryableByName)]
        struct Seconds {
            #[diesel(sql_type = Double)]
            seconds: f64,
        }
        let db = test_db::TestDatabase::new();
        let mut conn = db.connect();
        let statement = format!("SELECT ({})::float8 AS seconds", DEFAULT.sql_seconds("$1", "$2"));
        for attempt in (1..=30).chain([99, 100, 101, 1000]) {
            for unit in [0.0, 0.25, 0.5, 0.999] {
                let sql: Seconds = diesel::sql_query(&statement)
                    .bind::<Integer, _>(attempt)
                    .bind::<Double, _>(unit)
                    .get_result(&mut conn)
                    .unwrap();
                let rust = DEFAULT.seconds(attempt, unit);
                assert!(
                    (sql.seconds - rust).abs() <= rust * 1e-12,
                    "attempt {attempt}, {unit}: {} in SQL, {rust}",
                    sql.seconds
                );
            }
        }
        assert_eq!(
            DEFAULT.sql_seconds("t.attempts", "random()"),
            "(power(least(t.attempts, 100), 4) + 3) * (0.9 + 0.2 * random())"
        );
    }
}
