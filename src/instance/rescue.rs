//! The rescue of lost attempts, run by the heartbeat on its connection. A lost attempt
//! is closed on its execution (`stopped_at`, an error saying why and where) and counts
//! as an attempt: the task waits again, due at once, or fails after its last attempt.
//! Lost are the running tasks of:
//!
//! - a previous instance of this name (at start, once the name is ours: the previous
//!   holder's session is gone, or, without a listener, its row silent for its lease);
//! - this instance, that none of its workers runs, claimed over a lease ago (ghosts: a
//!   claim whose answer was lost with the connection, an outcome never recorded);
//! - instances whose own lease (recorded in their row) expired, or that have no row and
//!   do not hold their name lock, once this instance has proved itself alive for a
//!   whole lease (see the heartbeat).

use std::time::Duration;

use diesel::PgConnection;

use crate::db::connect::Session;
use crate::db::instances;
use crate::db::rescue::{self as statements, Lost};
use crate::error::Error;
use crate::instance::in_flight::InFlight;

/// Puts back what a previous instance of this name left running; returns how many
/// tasks wait again.
pub(crate) fn previous_self(conn: &mut PgConnection, instance: &str, lease: Duration) -> Result<usize, Error> {
    Ok(statements::rescue(conn, Lost::PreviousSelf, instance, lease, &[])?)
}

/// One pass: this instance's ghosts, and the tasks of dead instances if it may judge
/// others (whose rows, long dead and with nothing left running, it then forgets), each
/// statement with the heartbeat's bounds (`settings`, on its session or for each
/// transaction). Returns how many tasks wait again.
pub(crate) fn pass(
    conn: &mut PgConnection,
    (session, bounds): (Session, &[&str]),
    instance: &str,
    lease: Duration,
    in_flight: &InFlight,
    judge_others: bool,
) -> Result<usize, Error> {
    let ghosts = in_flight.ids();
    let mut rescued =
        session.with(conn, bounds, |c| statements::rescue(c, Lost::OwnGhosts, instance, lease, &ghosts))?;
    if judge_others {
        rescued += session.with(conn, bounds, |c| statements::rescue(c, Lost::Dead, instance, lease, &[]))?;
        session.with(conn, bounds, |c| instances::forget_long_dead(c, lease))?;
    }
    Ok(rescued)
}
