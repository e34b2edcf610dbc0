//! The engine's channel and stripes, as the database spells them
//! (`task_engine_channel()` and `task_engine_stripes()`, migration
//! `channel_and_stripes_spelled_once`): the LISTEN connection, the stripes an idle
//! instance holds so that inserts notify it, and the notifications the engine sends
//! itself.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use crate::db::transitions::notify_waiting;
use crate::error::Error;

/// A raw `postgres` connection, outside the pool, listening on the engine's channel.
pub(crate) struct Listening {
    client: Client,
    channel: String,
}

impl Listening {
    /// Connects, finds the channel of the `tasks` table this connection sees, runs
    /// `LISTEN` on it (committed), and then (in the same round trip) finds the tasks
    /// running on `instance` that an operator asked to cancel: those cancels'
    /// notifications may have been sent while no connection listened; any later one is
    /// heard. Locks and changes nothing.
    pub(crate) fn start(config: &postgres::Config, server: &str, instance: &str) -> Result<(Self, Vec<i64>), Error> {
        let fail = |context: &str| {
            let context = format!("could not {context} on {server}");
            move |source| Error::Listener { context, source }
        };
        let mut client = config.connect(NoTls).map_err(fail("connect"))?;
        let channel: String = client
            .query_one("SELECT task_engine_channel()", &[])
            .map_err(fail("find the tasks table (run `engine migrate`)"))?
            .get(0);
        let quoted = format!("\"{}\"", channel.replace('"', "\"\""));
        let literal = format!("'{}'", instance.replace('\'', "''"));
        let messages = client
            .simple_query(&format!(
                "BEGIN; LISTEN {quoted}; COMMIT;
                 SELECT id FROM tasks
                 WHERE status = 'running' AND instance = {literal} AND cancel_requested_at IS NOT NULL"
            ))
            .map_err(fail("LISTEN"))?;
        let cancelled = messages
            .iter()
            .filter_map(|message| match message {
                postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
                _ => None,
            })
            .collect();
        Ok((Self { client, channel }, cancelled))
    }

    /// The channel listened on.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Waits up to `timeout` for a notification and returns its payload (`None` when
    /// none came).
    pub(crate) fn next(&mut self, timeout: Duration) -> Result<Option<String>, Error> {
        let mut notifications = self.client.notifications();
        let next = notifications.timeout_iter(timeout).next();
        next.map(|notification| notification.map(|n| n.payload().to_owned()))
            .map_err(|source| Error::Listener { context: "connection lost".to_owned(), source })
    }

    /// Tells whether the server has closed the connection.
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Takes a shared session lock on every stripe, on the idle producer's own
/// connection: while it holds them, inserts notify (see `task_engine_notify_insert`).
/// All or none: if an inserter holds a stripe (it skipped its notification and has
/// not committed yet), the locks taken are released and this returns false.
pub(crate) fn take_stripes(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(sql_type = Bool)]
        taken: bool,
    }
    let taken: Taken = diesel::sql_query(
        "WITH c AS MATERIALIZED (SELECT hashtext(task_engine_channel()) AS key)
         SELECT bool_and(pg_try_advisory_lock_shared(c.key, s)) AS taken
         FROM c, generate_series(0, task_engine_stripes() - 1) s",
    )
    .get_result(conn)?;
    if !taken.taken {
        release_stripes(conn)?;
    }
    Ok(taken.taken)
}

/// Releases the stripes (every advisory lock of the producer's session): the instance
/// is busy, inserts need not notify it.
pub(crate) fn release_stripes(conn: &mut PgConnection) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_unlock_all()").execute(conn).map(drop)
}

/// Tells the instances that `ready` tasks wait, runnable now (a retry, a resumed
/// queue, a limit raised); delivered when the transaction commits. Locks and changes
/// nothing.
pub(crate) fn notify_ready(conn: &mut PgConnection, ready: i64) -> QueryResult<()> {
    diesel::sql_query(concat!("SELECT ", notify_waiting!("$1::bigint"), "::text AS sent"))
        .bind::<BigInt, _>(ready)
        .execute(conn)
        .map(drop)
}

/// Asks the instance that runs `task_id` to stop it (every instance hears it);
/// delivered when the transaction commits. Locks and changes nothing.
pub(crate) fn notify_cancel(conn: &mut PgConnection, task_id: i64) -> QueryResult<()> {
    diesel::sql_query(
        "SELECT pg_notify(task_engine_channel(), json_build_object('cancel', $1::bigint)::text)::text AS sent",
    )
    .bind::<BigInt, _>(task_id)
    .execute(conn)
    .map(drop)
}
