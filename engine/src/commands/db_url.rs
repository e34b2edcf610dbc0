//! `engine db-url`: the database's URL, for psql or another program.

use super::Context;
use crate::outln;

/// Prints the URL, its password hidden (the embedded cluster is started if need be).
pub fn run(ctx: &Context) -> anyhow::Result<()> {
    let db = ctx.open()?;
    outln!("{}", task_engine::redact_url(db.url()));
    Ok(())
}
