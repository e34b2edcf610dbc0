//! The `engine` command: the task engine library with every task crate of the
//! workspace linked in. Argument parsing, logging and signals live here; everything
//! else is the library's.

mod bench;
mod cli;
mod commands;
mod database;
mod duration;

/// `TASK_CRATES` and `link_task_crates()`, written by build.rs.
mod task_crates {
    include!(concat!(env!("OUT_DIR"), "/task_crates.rs"));
}

use std::fmt;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

/// An error in what the user gave (exit code 2), as opposed to a failure (exit code 1).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Writes a line to stdout, returning the error: a closed pipe (`engine status | head`)
/// then ends the command with its usual exit code instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?;
    }};
}
pub(crate) use outln;

fn main() -> ExitCode {
    // Every task crate this package depends on (build.rs lists them).
    task_crates::link_task_crates();

    let cli = Cli::parse();
    cli::setup_logging(&cli);
    cli::route_panics_to_the_log();

    match cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader has all it wanted.
        Err(error)
            if error.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", report(&error));
            ExitCode::from(exit_code_of(&error))
        }
    }
}

/// The error and its causes, each cause once: the library's messages already include
/// their source's ("parameters do not fit task type `x`: missing field `y`"), and the
/// chain would say it again.
fn report(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Bad input is 2; everything else (database away, migration failed, ...) is 1.
fn exit_code_of(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match error.downcast_ref::<task_engine::Error>() {
        Some(
            task_engine::Error::UnknownTaskType { .. }
            | task_engine::Error::InvalidParameters { .. }
            | task_engine::Error::Serialization { .. }
            | task_engine::Error::InvalidValue(_)
            | task_engine::Error::InvalidSetting { .. }
            | task_engine::Error::TaskNotFound(_)
            | task_engine::Error::InvalidTransition { .. },
        ) => 2,
        _ => 1,
    }
}
