//! `engine tasks`: the task types linked in.

use super::Context;
use crate::outln;

/// Prints each registered task type: its name, its Rust type, its attempts.
pub fn run(ctx: &Context) -> anyhow::Result<()> {
    for entry in ctx.registry.entries() {
        outln!("{}\t{}\tmax attempts {}", entry.name(), entry.rust_type(), entry.max_attempts());
    }
    Ok(())
}
