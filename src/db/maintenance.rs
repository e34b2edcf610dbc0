//! Keeping the tables small and fast: the vacuum of `tasks` that claims need, and the
//! prune of old finished tasks.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};

use crate::db::micros;

/// The advisory lock that lets one instance at a time vacuum ("vacu" in ASCII).
const VACUUM_LOCK: i64 = 0x7661_6375;

/// Runs `VACUUM tasks` unless another instance is at it (a session advisory lock,
/// released after): it removes the dead index entries claims leave behind, and blocks
/// no claim, insert or completion. Returns false when another instance holds the lock.
pub(crate) fn vacuum(conn: &mut PgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let locked: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
        .bind::<BigInt, _>(VACUUM_LOCK)
        .get_result(conn)?;
    if !locked.locked {
        return Ok(false);
    }
    let vacuumed = conn.batch_execute("VACUUM tasks");
    diesel::sql_query("SELECT pg_advisory_unlock($1)").bind::<BigInt, _>(VACUUM_LOCK).execute(conn)?;
    vacuumed.map(|_| true)
}

/// Deletes at most `batch` finished tasks (`stopped`, `failed`, `cancelled`) last
/// updated more than `older_than` ago, locking those rows; the cascade trigger deletes
/// their executions. The outer condition repeats the inner one: a task retried while
/// the delete waited for its row is checked again as it now is, and kept. Returns how
/// many tasks it deleted.
pub(crate) fn prune_batch(conn: &mut PgConnection, older_than: Duration, batch: i64) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM tasks
         WHERE id = ANY(ARRAY(
                 SELECT id FROM tasks
                 WHERE status IN ('stopped', 'failed', 'cancelled')
                   AND updated_at < now() - $1 * interval '1 microsecond'
                 LIMIT $2))
           AND status IN ('stopped', 'failed', 'cancelled')
           AND updated_at < now() - $1 * interval '1 microsecond'",
    )
    .bind::<BigInt, _>(micros(older_than))
    .bind::<BigInt, _>(batch)
    .execute(conn)
}
