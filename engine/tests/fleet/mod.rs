//! A fleet of `engine migrate` processes started at once, for the tests of migrating
//! concurrently (`cli.rs` direct, `pooler.rs` through PgBouncer).

use std::process::{Child, Command, Stdio};

/// Runs `engine migrate` from `pods` processes on `url`, released together (each waits
/// on its stdin, closed for all at once); asserts that each exits 0 and returns the
/// versions they say they applied, sorted.
pub fn migrate_at_once(url: &str, pods: usize) -> Vec<String> {
    let mut fleet: Vec<Child> = (0..pods)
        .map(|_| {
            Command::new("sh")
                .args(["-c", r#"read -r go; exec "$0" migrate"#, env!("CARGO_BIN_EXE_engine")])
                .env("DATABASE_URL", url)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("engine migrate starts")
        })
        .collect();
    for pod in &mut fleet {
        drop(pod.stdin.take()); // go
    }
    let mut applied = Vec::new();
    for pod in fleet {
        let out = pod.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        applied.extend(stdout.lines().filter_map(|l| l.strip_prefix("applied ")).map(str::to_owned));
    }
    applied.sort();
    applied
}
