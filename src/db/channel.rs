//! The engine's channel and stripes, as the database spells them
//! (`task_engine_channel()` and `task_engine_stripes()`, migration
//! `channel_and_stripes_spelled_once`): the instance's session, which LISTENs, holds the
//! instance's name and, while it is idle, the stripes that make inserts notify it; and
//! the notifications the engine sends itself.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use crate::db::instances::NAME_LOCK;
use crate::db::transitions::notify_waiting;
use crate::error::Error;

/// The instance's session: a raw `postgres` connection, outside the pool, straight to
/// PostgreSQL, that listens on the engine's channel and holds the instance's name lock
/// and, while the instance is idle, the stripes.
pub(crate) struct Listening {
    client: Client,
    channel: String,
    backend: i32,
    holds_name: bool,
    stripes: i32,
}

/// What a listener whose session goes through a transaction pooler is told.
const POOLED_SESSION: &str = "its statements ran on different server connections: is the listen URL a transaction \
     pooler? The session needs PostgreSQL itself (or a pool in session mode): give `engine run --listen-url` \
     (TASK_ENGINE_LISTEN_URL, `Runner::listen_url`) a direct URL";

/// How long a new session waits for the instance's previous one, which it ended, to
/// let go of the name.
const NAME_WAIT: Duration = Duration::from_secs(5);

impl Listening {
    /// Connects, finds the channel of the `tasks` table this connection sees, takes the
    /// instance's name (a session advisory lock, `(NAME_LOCK, hashtext(<channel>/<name>))`:
    /// two schemas' instances of one name do not share it), ending first the
    /// `previous` session of this instance if it still holds it (a connection that
    /// died half-open), runs `LISTEN` (committed), and then (in the same round trip)
    /// finds the tasks running on `instance` that an operator asked to cancel: those
    /// cancels' notifications may have been sent while no connection listened; any
    /// later one is heard. Locks only the name; changes nothing.
    pub(crate) fn start(
        config: &postgres::Config,
        server: &str,
        instance: &str,
        previous: Option<i32>,
    ) -> Result<(Self, Vec<i64>), Error> {
        let fail = |context: &str| {
            let context = format!("could not {context} on {server}");
            move |source: postgres::Error| {
                // Its prepared statements unknown, or known twice: the session's
                // statements ran on different server connections.
                let pooled = [SqlState::INVALID_SQL_STATEMENT_NAME, SqlState::DUPLICATE_PSTATEMENT];
                let context = match source.code() {
                    Some(code) if pooled.contains(code) => format!("{context}: {POOLED_SESSION}"),
                    _ => context,
                };
                Error::Listener { context, source }
            }
        };
        let mut client = config.connect(NoTls).map_err(fail("connect"))?;
        let row = client
            .query_one("SELECT task_engine_channel(), task_engine_stripes(), pg_backend_pid()", &[])
            .map_err(|source| match source.code() {
                Some(&SqlState::UNDEFINED_FUNCTION) => fail("find the tasks table (run `engine migrate`)")(source),
                _ => fail("find the engine's channel")(source),
            })?;
        let (channel, stripes, backend): (String, i32, i32) = (row.get(0), row.get(1), row.get(2));
        let take_name = "SELECT pg_try_advisory_lock($1, hashtext(task_engine_channel() || '/' || $2))";
        let mut holds_name: bool =
            client.query_one(take_name, &[&NAME_LOCK, &instance]).map_err(fail("take the name"))?.get(0);
        if let (false, Some(previous)) = (holds_name, previous) {
            client.execute("SELECT pg_terminate_backend($1)", &[&previous]).map_err(fail("end the last session"))?;
            let deadline = Instant::now() + NAME_WAIT;
            while !holds_name && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                holds_name =
                    client.query_one(take_name, &[&NAME_LOCK, &instance]).map_err(fail("take the name"))?.get(0);
            }
        }
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
        Ok((Self { client, channel, backend, holds_name, stripes }, cancelled))
    }

    /// The channel listened on.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// The server process of this session.
    pub(crate) fn backend(&self) -> i32 {
        self.backend
    }

    /// Whether this session holds the instance's name (another live session may hold
    /// it: a second instance of that name).
    pub(crate) fn holds_name(&self) -> bool {
        self.holds_name
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

    /// Takes a shared session lock on every stripe: while it holds them, inserts notify
    /// (see `task_engine_notify_insert`). All or none: if an inserter holds a stripe
    /// (it skipped its notification and has not committed yet), the locks taken are
    /// released and this returns false. Locks only the stripes.
    pub(crate) fn take_stripes(&mut self) -> Result<bool, Error> {
        let taken: Vec<i32> = self
            .client
            .query(
                "SELECT s FROM generate_series(0, task_engine_stripes() - 1) s
                 WHERE pg_try_advisory_lock_shared(hashtext(task_engine_channel()), s)",
                &[],
            )
            .map_err(lost("take the stripes"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if taken.len() == usize::try_from(self.stripes).unwrap_or(0) {
            return Ok(true);
        }
        self.client
            .execute(
                "SELECT pg_advisory_unlock_shared(hashtext(task_engine_channel()), s) FROM unnest($1::int4[]) s",
                &[&taken],
            )
            .map_err(lost("release the stripes"))?;
        Ok(false)
    }

    /// Releases the stripes (and no other lock of the session: it holds the name):
    /// the instance is busy, inserts need not notify it.
    pub(crate) fn release_stripes(&mut self) -> Result<(), Error> {
        self.client
            .execute(
                "SELECT pg_advisory_unlock_shared(hashtext(task_engine_channel()), s)
                 FROM generate_series(0, task_engine_stripes() - 1) s",
                &[],
            )
            .map(drop)
            .map_err(lost("release the stripes"))
    }
}

/// The error of a statement on the session that failed.
fn lost(context: &str) -> impl FnOnce(postgres::Error) -> Error + '_ {
    move |source| Error::Listener { context: format!("could not {context}"), source }
}

/// The payload of [`wake_listeners`].
pub(crate) const WAKE_LISTENERS: &str = "{}";

/// Wakes the instances' listeners (a notification that asks for nothing), so that the
/// one of an instance falling asleep takes the stripes at once; delivered at commit.
/// Locks and changes nothing.
pub(crate) fn wake_listeners(conn: &mut PgConnection) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_notify(task_engine_channel(), $1)::text AS sent")
        .bind::<diesel::sql_types::Text, _>(WAKE_LISTENERS)
        .execute(conn)
        .map(drop)
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
