//! The schema's migrations, embedded in the binary: `engine migrate` applies the same
//! files that `diesel migration run` applies from `migrations/`.
//!
//! Migrators serialise on a transaction-scoped advisory lock (which a transaction
//! pooler carries, unlike a session lock): each migration runs in a transaction of its
//! own that first takes the lock and then reads what is pending, so that a fleet
//! starting at once applies each migration once, the late arrivals waiting and then
//! finding nothing to do, and each migration's own locks last only its transaction.

use diesel::connection::Connection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable, Text};
use diesel::PgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::Error;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The first key of the migrators' advisory lock ("migr" in ASCII); the second is
/// `hashtext(current_schema())`, the schema the migrations create their objects in, so
/// that two deployments in two schemas of one database migrate independently.
const MIGRATE_LOCK: i32 = 0x6d69_6772;

/// Waits for the migrators' lock of the current schema until the transaction ends (a
/// transaction-scoped advisory lock); locks and changes nothing else.
fn lock_migrations(conn: &mut PgConnection) -> QueryResult<()> {
    diesel::sql_query("SELECT pg_advisory_xact_lock($1, hashtext(coalesce(current_schema(), '')))")
        .bind::<Integer, _>(MIGRATE_LOCK)
        .execute(conn)
        .map(drop)
}

/// Applies the migrations the database lacks and returns their names; applying them to
/// an up-to-date database does nothing and returns an empty list. Safe to run from many
/// processes at once: each migration is applied once, by one of them, and every one
/// returns once the schema is complete.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, Error> {
    let mut applied = Vec::new();
    // One transaction per migration (diesel nests each migration's own transaction in
    // a savepoint of ours), the lock taken first and the pending list read under it.
    while let Some(version) = conn.transaction(|conn| {
        lock_migrations(conn).map_err(|e| Error::Migration(e.into()))?;
        let pending = conn.pending_migrations(MIGRATIONS).map_err(Error::Migration)?;
        let Some(next) = pending.first() else { return Ok::<_, Error>(None) };
        let version = conn.run_migration(next).map_err(Error::Migration)?;
        Ok(Some(version.to_string()))
    })? {
        applied.push(version);
    }
    Ok(applied)
}

/// Returns the names of the migrations the database lacks. Waits for a migrator at
/// work (its lock), so that it reads a finished migration and never races one to
/// create diesel's bookkeeping table.
pub fn pending_migrations(conn: &mut PgConnection) -> Result<Vec<String>, Error> {
    conn.transaction(|conn| {
        lock_migrations(conn).map_err(|e| Error::Migration(e.into()))?;
        let pending = conn.pending_migrations(MIGRATIONS).map_err(Error::Migration)?;
        Ok(pending.iter().map(|m| m.name().to_string()).collect())
    })
}

/// What an instance needs of the schema, the last migration's object last: a database
/// without it has not been migrated, or not since this version.
const NEEDED: [&str; 6] = [
    "tasks",
    "task_executions",
    "task_engine_instances",
    "task_engine_queues",
    "task_engine_schedules",
    "task_engine_declarations",
];

/// The objects of the schema an instance needs that the database (in the connection's
/// search path) lacks; none on a migrated database. Reads the catalog only, and creates
/// nothing (unlike [`pending_migrations`], which creates diesel's bookkeeping table).
pub(crate) fn missing_schema(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Missing {
        #[diesel(sql_type = Nullable<Text>)]
        name: Option<String>,
    }
    let missing: Vec<Missing> =
        diesel::sql_query("SELECT n.name FROM unnest($1::text[]) AS n(name) WHERE to_regclass(n.name) IS NULL")
            .bind::<diesel::sql_types::Array<Text>, _>(&NEEDED[..])
            .load(conn)?;
    Ok(missing.into_iter().filter_map(|m| m.name).collect())
}

#[cfg(test)]
mod tests {
    use diesel::migration::MigrationSource;
    use diesel::pg::Pg;

    /// `run_migrations` runs each migration inside the transaction that holds the lock,
    /// where `CREATE INDEX CONCURRENTLY` cannot run: a migration that opts out of its
    /// transaction (`run_in_transaction = false` in its `metadata.toml`) needs a way of
    /// its own to be serialised first (docs/operations.md, "Migrating").
    #[test]
    fn every_migration_runs_in_a_transaction() {
        let migrations = MigrationSource::<Pg>::migrations(&super::MIGRATIONS).unwrap();
        assert!(migrations.len() > 20);
        for migration in migrations {
            assert!(migration.metadata().run_in_transaction(), "{} opts out of its transaction", migration.name());
        }
    }
}
