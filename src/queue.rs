//! Operating queues from a program: pause and resume, and the limits every instance
//! obeys from its next claim on (`engine queue ...` calls these). A queue needs no
//! creating: tasks name it, instances run it; these only store its settings.

use std::time::Duration;

use diesel::prelude::*;

use crate::db::channel;
use crate::db::queues::{self, Limit};
use crate::error::Error;

/// Pauses a queue: no instance claims its tasks from its next claim on; tasks already
/// claimed run to their end. Lasts until [`resume_queue`], across restarts.
pub fn pause_queue(conn: &mut PgConnection, queue: &str) -> Result<(), Error> {
    check_name(queue)?;
    Ok(queues::set_paused(conn, queue, true)?)
}

/// Resumes a paused queue, and wakes the idle instances (in the same transaction).
pub fn resume_queue(conn: &mut PgConnection, queue: &str) -> Result<(), Error> {
    check_name(queue)?;
    changed_and_wake(conn, |conn| queues::set_paused(conn, queue, false))
}

/// At most `limit` tasks of the queue run at once across every instance (`None`: no
/// limit; 1: the queue's tasks run one at a time, in order). Claims of a queue with a
/// limit take turns on the queue's row, and count what runs.
pub fn set_queue_concurrency(conn: &mut PgConnection, queue: &str, limit: Option<u32>) -> Result<(), Error> {
    check_name(queue)?;
    changed_and_wake(conn, |conn| queues::set_limit(conn, queue, &Limit::Concurrency(limit)))
}

/// At most `limit` tasks of one key ([`crate::NewTask::key`]) of the queue run at once
/// (`None`: no limit; at least 1). Tasks without a key are not held to it.
pub fn set_queue_key_limit(conn: &mut PgConnection, queue: &str, limit: Option<u32>) -> Result<(), Error> {
    check_name(queue)?;
    if limit == Some(0) {
        return Err(Error::InvalidValue("a limit per key of 0 would run nothing: at least 1".into()));
    }
    changed_and_wake(conn, |conn| queues::set_limit(conn, queue, &Limit::PerKey(limit)))
}

/// At most `count` tasks of the queue start per `period` across every instance
/// (`None`: no limit). Counted in windows: a window opens at the first claim after the
/// last one closed, and lasts `period`.
pub fn set_queue_rate_limit(conn: &mut PgConnection, queue: &str, rate: Option<(u32, Duration)>) -> Result<(), Error> {
    check_name(queue)?;
    if let Some((count, period)) = rate {
        if count == 0 || period < Duration::from_millis(1) {
            return Err(Error::InvalidValue(format!(
                "a rate limit of {count} per {period:?}: at least 1 task per at least 1ms"
            )));
        }
    }
    changed_and_wake(conn, |conn| queues::set_limit(conn, queue, &Limit::Rate(rate)))
}

/// Removes a queue's settings (pause, limits): its tasks, waiting or running, are not
/// touched, and run from every instance's next claim as those of any queue without
/// settings (not paused, no limit). Wakes the idle instances. Returns false, changing
/// nothing, when the queue has no settings.
pub fn remove_queue(conn: &mut PgConnection, queue: &str) -> Result<bool, Error> {
    check_name(queue)?;
    conn.transaction(|conn| {
        let removed = queues::delete(conn, queue)? > 0;
        if removed {
            channel::notify_ready(conn, 1)?;
        }
        Ok(removed)
    })
}

/// A queue name: 1 to 200 bytes, no control character.
fn check_name(queue: &str) -> Result<(), Error> {
    if queue.is_empty() || queue.len() > 200 || queue.chars().any(char::is_control) {
        return Err(Error::InvalidValue(format!("queue name {queue:?}: 1 to 200 bytes, without control characters")));
    }
    Ok(())
}

/// Applies a change that may let tasks run, and notifies the instances in the same
/// transaction: an idle instance waits for a notification, not for a poll.
fn changed_and_wake(
    conn: &mut PgConnection,
    change: impl FnOnce(&mut PgConnection) -> QueryResult<()>,
) -> Result<(), Error> {
    conn.transaction(|conn| {
        change(conn)?;
        channel::notify_ready(conn, 1)?;
        Ok(())
    })
}
