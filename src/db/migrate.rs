//! The schema's migrations, embedded in the binary: `engine migrate` applies the same
//! files that `diesel migration run` applies from `migrations/`.

use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
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
