//! Keeping the claim fast: every claimed task leaves a dead entry at the head of its
//! level in `tasks_claim_idx` (a claim's update is never HOT, `status` being in the
//! index's predicate), and each claim walks past those entries until a vacuum removes
//! them.
//! Autovacuum comes too rarely for a queue (at most once a minute per table), so each
//! instance runs `VACUUM tasks` itself, on a maintenance connection opened for it and
//! closed after (one instance at a time: the others skip it), once it has claimed
//! [`VACUUM_EVERY`] tasks since the last time, or [`VACUUM_AFTER`] tasks and
//! [`VACUUM_PERIOD`] has passed (a slow stream of claims piles up dead entries too).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::maintenance;
use crate::error::Error;
use crate::instance::connections::Connections;
use crate::instance::parts::{Part, Stage};
use crate::instance::producer;
use crate::instance::shutdown::Shutdown;

/// Tasks claimed by this instance between two vacuums.
const VACUUM_EVERY: u64 = 20_000;
/// Tasks claimed since the last vacuum that call for one once [`VACUUM_PERIOD`] has passed.
const VACUUM_AFTER: u64 = 1_000;
const VACUUM_PERIOD: Duration = Duration::from_secs(5);
/// How often the thread looks.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// What the vacuum needs.
pub(crate) struct Input {
    /// Where it opens its maintenance connection.
    pub connections: Connections,
    /// Where it reads how many tasks the instance has claimed.
    pub claims: Arc<producer::Stats>,
    pub shutdown: Shutdown,
    pub stats: Arc<Stats>,
}

/// What the vacuum counts.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub vacuums: AtomicU64,
}

/// Whether a vacuum is due, `claimed` tasks and `elapsed` after the last.
fn due(claimed: u64, elapsed: Duration) -> bool {
    claimed >= VACUUM_EVERY || (claimed >= VACUUM_AFTER && elapsed >= VACUUM_PERIOD)
}

/// Starts the vacuum: it vacuums when due until the instance stops, or until it finds
/// it may not vacuum.
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    Part::spawn("vacuum", Stage::Others, move || run(input))
}

fn run(input: Input) {
    let (mut last, mut last_at) = (0u64, Instant::now());
    while !input.shutdown.sleep(LOOK_EVERY) {
        let claimed = input.claims.claimed_tasks.load(Ordering::Relaxed);
        if !due(claimed - last, last_at.elapsed()) {
            continue;
        }
        (last, last_at) = (claimed, Instant::now());
        let mut conn = match input.connections.maintenance() {
            Ok(conn) => conn,
            Err(error) => {
                log::warn!("cannot VACUUM tasks ({error}); trying again later");
                continue;
            }
        };
        let started = Instant::now();
        match maintenance::vacuum(&mut conn) {
            Ok(()) => {
                input.stats.vacuums.fetch_add(1, Ordering::Relaxed);
                log::debug!("VACUUM tasks took {:?}", started.elapsed());
            }
            Err(error) => {
                let message = error.to_string();
                if message.contains("permission") || message.contains("owner") {
                    log::warn!("cannot VACUUM tasks ({message}): leaving it to autovacuum");
                    break;
                }
                log::warn!("VACUUM tasks failed: {message}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vacuum_is_due_after_20000_claims_or_1000_once_5_s_have_passed() {
        assert!(!due(19_999, Duration::ZERO));
        assert!(due(20_000, Duration::ZERO));
        assert!(!due(999, Duration::from_secs(60)));
        assert!(!due(1_000, Duration::from_millis(4_999)));
        assert!(due(1_000, VACUUM_PERIOD));
    }
}
