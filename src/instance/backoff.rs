//! The one backoff of the instance's threads: after consecutive failures of the
//! database, wait 100 ms, then twice as long each time, up to 5 s.

use std::time::Duration;

/// The first pause.
pub(crate) const FIRST: Duration = Duration::from_millis(100);
/// The longest pause.
pub(crate) const MAX: Duration = Duration::from_secs(5);

/// The pause after `failures` consecutive failures (none before the first).
pub(crate) fn pause(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => (FIRST * 2u32.pow((n - 1).min(16))).min(MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_from_100_ms_up_to_5_s() {
        assert_eq!(pause(0), Duration::ZERO);
        assert_eq!(pause(1), Duration::from_millis(100));
        assert_eq!(pause(2), Duration::from_millis(200));
        assert_eq!(pause(6), Duration::from_millis(3200));
        assert_eq!(pause(7), MAX);
        assert_eq!(pause(u32::MAX), MAX);
    }
}
