//! The schema's migrations, embedded in the binary: `engine migrate` applies the same
//! files that `diesel migration run` applies from `migrations/`.

use diesel::PgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::Error;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Applies the migrations the database lacks and returns their names; applying them to
/// an up-to-date database does nothing and returns an empty list.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, Error> {
    let applied = conn.run_pending_migrations(MIGRATIONS).map_err(Error::Migration)?;
    Ok(applied.iter().map(|version| version.to_string()).collect())
}

/// Returns the names of the migrations the database lacks.
pub fn pending_migrations(conn: &mut PgConnection) -> Result<Vec<String>, Error> {
    let pending = conn.pending_migrations(MIGRATIONS).map_err(Error::Migration)?;
    Ok(pending.iter().map(|m| m.name().to_string()).collect())
}
