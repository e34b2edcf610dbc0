//! The build script's choice of the task crates to link, from metadata shaped like
//! `cargo metadata`'s.

#[path = "../build/task_crates.rs"]
mod task_crates;

use serde_json::json;

fn dependency(name: &str, path: bool, kind: Option<&str>) -> serde_json::Value {
    json!({ "name": name, "kind": kind, "rename": null, "path": if path { Some(format!("/w/{name}")) } else { None } })
}

#[test]
fn the_build_script_links_every_task_crate_and_only_those() {
    let metadata = json!({ "packages": [
        { "name": "engine", "dependencies": [
            dependency("task_engine", true, None),
            dependency("tasks", true, None),
            dependency("billing-tasks", true, None),
            dependency("pg_cluster", true, None),
            dependency("test_db", true, Some("dev")),
            dependency("tested_only", true, None),
            dependency("serde", false, None),
        ]},
        { "name": "task_engine", "dependencies": [dependency("serde", false, None)] },
        { "name": "tasks", "dependencies": [dependency("task_engine", true, None)] },
        { "name": "billing-tasks", "dependencies": [dependency("task_engine", true, None)] },
        { "name": "pg_cluster", "dependencies": [] },
        { "name": "test_db", "dependencies": [dependency("task_engine", true, None)] },
        { "name": "tested_only", "dependencies": [dependency("task_engine", true, Some("dev"))] },
    ]});
    // A task crate is a normal dependency that depends (normally) on task_engine; named
    // as Rust code names it.
    let crates = task_crates::task_crates(&metadata, "engine");
    assert_eq!(crates, ["billing_tasks", "tasks"]);

    let code = task_crates::link_code(&crates);
    assert!(code.contains("    billing_tasks::link();") && code.contains("    tasks::link();"), "{code}");
    assert!(code.contains(r#"pub const TASK_CRATES: &[&str] = &["billing_tasks", "tasks"];"#), "{code}");
}

#[test]
fn a_renamed_task_crate_is_linked_by_its_new_name() {
    let mut renamed = dependency("billing-tasks", true, None);
    renamed["rename"] = json!("billing");
    let metadata = json!({ "packages": [
        { "name": "engine", "dependencies": [renamed] },
        { "name": "billing-tasks", "dependencies": [dependency("task_engine", true, None)] },
    ]});
    assert_eq!(task_crates::task_crates(&metadata, "engine"), ["billing"]);
}
