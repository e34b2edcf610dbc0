//! The engine's tests on the other PostgreSQL versions we support. `.ci/run` puts the
//! server binaries of 13 and 18 in `target/postgresql/<major>/bin`; this test runs this
//! whole test binary again once per version found there, on private clusters of that
//! version (`TASK_ENGINE_PG_BIN`, which the harness's clusters honour), one version after
//! the other. Without them (a developer's machine) it says so and passes: the suite has
//! run on the machine's own server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Set in a run on another version, which must not start runs of its own.
const ON_VERSION: &str = "TASK_ENGINE_TEST_ON_VERSION";

#[test]
fn the_engine_tests_pass_on_the_other_postgresql_versions_present() {
    if std::env::var_os(ON_VERSION).is_some() {
        return;
    }
    let root = versions_dir();
    let versions = versions_in(&root);
    if versions.is_empty() {
        say(&format!(
            "skipped: no other PostgreSQL versions in {} (`.ci/run` fetches 13 and 18 there); \
             the tests ran on the machine's server only",
            root.display()
        ));
        return;
    }
    let this_binary = std::env::current_exe().expect("the path of this test binary");
    let mut failed = Vec::new();
    for (major, bin) in versions {
        // Through `.ci/run`'s link when we are root (a store `postgres` can reach).
        let bin = std::fs::canonicalize(&bin).unwrap_or(bin);
        let server = version_of(&bin);
        let output = Command::new(&this_binary)
            .env("TASK_ENGINE_PG_BIN", &bin)
            .env(ON_VERSION, &major)
            // Private clusters of this version, not a server of the caller's.
            .env_remove("TEST_DATABASE_URL")
            .output()
            .unwrap_or_else(|e| panic!("run {} on {server}: {e}", this_binary.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary = stdout.lines().rfind(|l| l.starts_with("test result:")).unwrap_or("no summary").to_owned();
        let skipped =
            if bin.join("pg_basebackup").is_file() { "" } else { " (failover test skipped: no pg_basebackup)" };
        say(&format!("{server} ({}): {summary}{skipped}", bin.display()));
        if !output.status.success() {
            eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
            failed.push(server);
        }
    }
    assert!(failed.is_empty(), "the engine's tests failed on {}", failed.join(", "));
}

/// Writes a line to stderr past the test harness's capture, so that CI's log shows which
/// versions ran even when the test passes.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "versions: {line}");
}

/// `target/postgresql` of this workspace (or of `CARGO_TARGET_DIR`).
fn versions_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| "target".into());
    workspace.join(target).join("postgresql")
}

/// The `<major>/bin` directories under `root` that hold a server, oldest first.
fn versions_in(root: &Path) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| ["initdb", "pg_ctl", "postgres"].iter().all(|p| bin.join(p).is_file()))
        .collect();
    found.sort();
    found.into_iter().map(|(major, bin)| (major.to_string(), bin)).collect()
}

/// "PostgreSQL 13.23", from `postgres --version`.
fn version_of(bin: &Path) -> String {
    let output = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("run {}/postgres --version: {e}", bin.display()));
    assert!(output.status.success(), "{}/postgres does not start: {output:?}", bin.display());
    let line = String::from_utf8_lossy(&output.stdout);
    format!("PostgreSQL {}", line.split_whitespace().last().unwrap_or("?"))
}
