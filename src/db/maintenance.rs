//! Keeping the tables small and fast: the vacuum of `tasks` that claims need, and the
//! prune of old finished tasks.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::db::micros;

/// Runs `VACUUM tasks` unless another vacuum is at it (another instance's, or
/// autovacuum: `SKIP_LOCKED` passes over a table whose lock it cannot take at once,
/// with a warning to the client, which needs no session lock of ours and so works
/// through a pooler): it removes the dead index entries claims leave behind, and
/// blocks no claim, insert or completion.
pub(crate) fn vacuum(conn: &mut PgConnection) -> QueryResult<()> {
    conn.batch_execute("VACUUM (SKIP_LOCKED) tasks")
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
