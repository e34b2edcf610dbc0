//! Which crates are task crates, read from `cargo metadata`, and the code that links
//! them. Shared by `build.rs` and the engine's tests (`#[path]`), so that the rule is
//! tested on its own.

use serde_json::Value;

/// The task crates of `package`: its normal dependencies that themselves depend
/// (normally) on `task_engine`, by the name `package`'s code uses for them, sorted.
pub fn task_crates(metadata: &Value, package: &str) -> Vec<String> {
    let packages = metadata["packages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let depends_on_engine = |name: &str| {
        packages
            .iter()
            .filter(|p| p["name"] == name)
            .any(|p| normal_dependencies(p).any(|d| d["name"] == "task_engine"))
    };
    let Some(this) = packages.iter().find(|p| p["name"] == package) else { return Vec::new() };
    let mut crates: Vec<String> = normal_dependencies(this)
        .filter(|d| d["path"].is_string() && d["name"].as_str().is_some_and(depends_on_engine))
        .map(|d| d["rename"].as_str().or(d["name"].as_str()).unwrap_or_default().replace('-', "_"))
        .collect();
    crates.sort();
    crates
}

fn normal_dependencies(package: &Value) -> impl Iterator<Item = &Value> {
    let dependencies = package["dependencies"].as_array().map(Vec::as_slice).unwrap_or_default();
    dependencies.iter().filter(|d| d["kind"].is_null())
}

/// The code `main.rs` includes: the list, and one function calling each crate's `link()`.
pub fn link_code(crates: &[String]) -> String {
    let mut code =
        String::from("/// The task crates linked in: `engine`'s dependencies that depend on `task_engine`.\n");
    code += &format!("pub const TASK_CRATES: &[&str] = &{crates:?};\n\n");
    code += "/// Keeps each task crate's registrations (the linker drops a crate nothing references).\n";
    code += "pub fn link_task_crates() {\n";
    for name in crates {
        code += &format!("    {name}::link(); // a task crate needs `pub fn link() {{}}` (see docs/task-crates.md)\n");
    }
    code += "}\n";
    code
}
