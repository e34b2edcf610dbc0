//! What each subcommand does, a subcommand a file.

pub mod demo;
pub mod status;
