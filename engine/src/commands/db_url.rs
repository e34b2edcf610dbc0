//! `engine db-url`: the database's URL, for psql or another program.

use super::Context;
use crate::database::Database;
use crate::outln;

/// Prints the URL, its password hidden (the embedded cluster is started if need be).
pub fn run(ctx: &Context) -> anyhow::Result<()> {
    let db = Database::open(ctx.database_url.clone(), &ctx.data_dir)?;
    outln!("{}", task_engine::redact_url(db.url()));
    Ok(())
}
