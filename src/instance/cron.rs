//! The cron part: fires the schedules of recurring tasks ([`crate::schedule::fire_due`]) at
//! their ticks, on the instance's claims connection (its statements are short; a wait
//! for a schedule's row is bounded as the claims' are). Every instance runs one; the schedule's row
//! lock makes each tick enqueued once. It reads the schedules again at least every few
//! seconds, so that a schedule added or changed elsewhere is seen, and renews the sets
//! of schedules its instance declares ([`Renewal`]).

use std::time::Duration;

use diesel::PgConnection;

use crate::db::schedules;
use crate::declared::{Declarations, Renewal};
use crate::error::Error;
use crate::instance::backoff;
use crate::instance::connections::Connections;
use crate::instance::parts::{Part, Stage};
use crate::instance::shutdown::Shutdown;
use crate::schedule::{fire_due, Ticks};

/// The longest sleep between two readings of the schedules.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// What the cron part needs.
pub(crate) struct Input {
    /// Where it gets the claims' connection.
    pub connections: Connections,
    pub shutdown: Shutdown,
    /// The schedules the instance declares (already applied at its start).
    pub declarations: Declarations,
}

/// Starts cron: it fires schedules until the instance stops.
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    Part::spawn("cron", Stage::Others, move || run(input))
}

fn run(input: Input) {
    let mut renewal = Renewal::new(input.declarations);
    let mut failures = 0;
    let mut sleep = Duration::ZERO;
    while !input.shutdown.sleep(sleep) {
        let result = input.connections.claims(|conn| tick(conn, &mut renewal));
        sleep = match result {
            Ok(sleep) => {
                failures = 0;
                sleep
            }
            Err(error) => {
                failures += 1;
                log::warn!("cron could not fire the schedules: {error}");
                backoff::pause(failures)
            }
        };
    }
}

/// Fires what is due, then renews the declarations if it is time; returns how long to
/// sleep until the next tick (at most [`LOOK_EVERY`]).
fn tick(conn: &mut PgConnection, renewal: &mut Renewal) -> Result<Duration, Error> {
    let now = schedules::now(conn)?;
    fire_due(conn, now)?;
    if let Err(error) = renewal.renew_if_due(conn) {
        // Tried again at the next renewal; a connection that broke fails the next firing.
        log::warn!("cron could not renew the schedules its instance declares: {error}");
    }
    let next = schedules::list(conn)?
        .iter()
        .filter_map(|row| Ticks::of(row).ok()?.after(now.max(row.last_tick.unwrap_or(row.created_at))))
        .min();
    let until_next = next.and_then(|next| (next - now).to_std().ok()).unwrap_or(LOOK_EVERY);
    Ok(until_next.min(LOOK_EVERY))
}
