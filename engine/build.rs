//! Links every task crate `engine` depends on, so that adding the dependency is enough:
//! a registration in a crate that nothing references is dropped by the linker, silently
//! (in a release build). Writes `$OUT_DIR/task_crates.rs`, which `main.rs` includes.

#[path = "build/task_crates.rs"]
mod task_crates;

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let cargo = std::env::var_os("CARGO").expect("set by cargo");
    // `--no-deps`: the workspace's own manifests only; no network, no lock file.
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");

    let crates = task_crates::task_crates(&metadata, "engine");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("task_crates.rs");
    std::fs::write(out, task_crates::link_code(&crates)).expect("OUT_DIR is writable");

    // Again when a dependency is added or removed: here, in the workspace's table, or in
    // a member (one that starts or stops depending on `task_engine`).
    let manifests = metadata["packages"].as_array().into_iter().flatten().filter_map(|p| p["manifest_path"].as_str());
    let root = metadata["workspace_root"].as_str().map(|root| format!("{root}/Cargo.toml"));
    for manifest in manifests.map(str::to_owned).chain(root) {
        println!("cargo:rerun-if-changed={manifest}");
    }
    println!("cargo:rerun-if-changed=build/task_crates.rs");
}
