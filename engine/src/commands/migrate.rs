//! `engine migrate`: applies the schema's migrations.

use super::Context;
use crate::outln;

/// Applies the migrations the database lacks and names each.
pub fn run(ctx: &Context) -> anyhow::Result<()> {
    let db = ctx.open()?;
    let mut conn = db.connect()?;
    let applied = task_engine::run_migrations(&mut conn)?;
    if applied.is_empty() {
        outln!("the schema is up to date");
    }
    for name in applied {
        outln!("applied {name}");
    }
    Ok(())
}
