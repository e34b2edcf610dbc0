//! The engine's channel and stripes, as the database spells them
//! (`task_engine_channel()` and `task_engine_stripes()`, migration
//! `channel_and_stripes_spelled_once`): the LISTEN connection, the stripes an idle
//! instance holds so that inserts notify it, and the notifications the engine sends
//! itself.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use crate::db::connect::redact_url;
use crate::error::Error;

/// A raw `postgres` connection, outside the pool, listening on the engine's channel.
pub(crate) struct Listening {
    client: Client,
    channel: String,
}

impl Listening {
    /// Connects, finds the channel of the `tasks` table this connection sees, and
    /// runs `LISTEN` on it. Locks and changes nothing.
    pub(crate) fn start(config: &postgres::Config, database_url: &str) -> Result<Self, Error> {
        let fail = |context: &str| {
            let context = format!("could not {context} on {}", redact_url(database_url));
            move |source| Error::Listener { context, source }
        };
        let mut client = config.connect(NoTls).map_err(fail("connect"))?;
        let channel: String = client
            .query_one("SELECT task_engine_channel()", &[])
            .map_err(fail("find the tasks table (run `engine migrate`)"))?
            .get(0);
        let quoted = format!("\"{}\"", channel.replace('"', "\"\""));
        client.batch_execute(&format!("LISTEN {quoted}")).map_err(fail("LISTEN"))?;
        Ok(Self { client, channel })
    }

    /// The channel listened on.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Which of `task_ids` an operator asked to cancel (its notification may have been
    /// missed while this connection was down). Locks and changes nothing.
    pub(crate) fn cancels_requested(&mut self, task_ids: &[i64]) -> Result<Vec<i64>, Error> {
        let rows = self
            .client
            .query("SELECT id FROM tasks WHERE id = ANY($1) AND cancel_requested_at IS NOT NULL", &[&task_ids])
            .map_err(|source| Error::Listener { context: "could not look for cancels".to_owned(), source })?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
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

/// Sends `payload` on the engine's channel; delivered when the transaction commits.
/// Locks and changes nothing.
pub(crate) fn notify(conn: &mut PgConnection, payload: &serde_json::Value) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_notify(task_engine_channel(), $1)::text AS sent")
        .bind::<Text, _>(payload.to_string())
        .execute(conn)
        .map(drop)
}
