//! The shape of the code, checked from its text: no module of the library imports a
//! module that imports it back, and the layout section of docs/design.md names every
//! source file where it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The library's modules by path (`db::claim`; `crate` for lib.rs), with their text.
fn library_modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if path.is_dir() {
                walk(&path, &[prefix, &[name]].concat(), out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = match name.as_str() {
                    "lib" => vec!["crate".to_owned()],
                    "mod" => prefix.to_vec(),
                    _ => [prefix, &[name]].concat(),
                };
                out.insert(module.join("::"), std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut modules = BTreeMap::new();
    walk(&root().join("src"), &[], &mut modules);
    modules
}

/// The paths a file names after `crate::`, with `use` groups (`{a, b::{c}}`) spread
/// out; comments are left out, and so is `$crate::` (a macro's, resolved where used).
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let code: String =
        text.lines().filter(|line| !line.trim_start().starts_with("//")).map(|line| format!("{line}\n")).collect();
    let mut paths = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let macro_path = rest[..at].ends_with('$');
        rest = &rest[at + "crate::".len()..];
        let mut tree = Vec::new();
        let used = use_tree(rest, &[], &mut tree);
        if !macro_path {
            paths.extend(tree);
        }
        rest = &rest[used..];
    }
    paths
}

/// Reads a use tree at the start of `text` (after some `prefix`), pushing the paths it
/// names; returns how many bytes it read.
fn use_tree(text: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    let mut at = 0;
    loop {
        let rest = &text[at..];
        let skipped = rest.len() - rest.trim_start().len();
        at += skipped;
        let rest = &text[at..];
        if let Some(group) = rest.strip_prefix('{') {
            at += 1;
            let mut inner = 0;
            loop {
                let r = &group[inner..];
                let ws = r.len() - r.trim_start().len();
                inner += ws;
                if group[inner..].starts_with('}') {
                    inner += 1;
                    break;
                }
                inner += use_tree(&group[inner..], &path, out);
                let r = &group[inner..];
                let ws = r.len() - r.trim_start().len();
                inner += ws;
                if group[inner..].starts_with(',') {
                    inner += 1;
                }
            }
            return at + inner;
        }
        let ident_len = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if ident_len == 0 {
            out.push(path);
            return at;
        }
        path.push(rest[..ident_len].to_owned());
        at += ident_len;
        if text[at..].starts_with("::") {
            at += 2;
        } else {
            out.push(path);
            return at;
        }
    }
}

/// The module a path names: its longest prefix that is a module.
fn resolve(path: &[String], modules: &BTreeMap<String, String>) -> String {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| modules.contains_key(candidate))
        .unwrap_or_else(|| "crate".to_owned())
}

/// Which modules each module imports (`crate::` paths), and the paths that only reach
/// the root's re-exports.
fn imports() -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let modules = library_modules();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut through_root = Vec::new();
    for (module, text) in &modules {
        let entry = graph.entry(module.clone()).or_default();
        for path in crate_paths(text) {
            let target = resolve(&path, &modules);
            if target == "crate" {
                through_root.push(format!("{module}: crate::{}", path.join("::")));
            } else if &target != module {
                entry.insert(target);
            }
        }
    }
    (graph, through_root)
}

/// The cycles of a graph: its strongly connected components of more than one node.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(node) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    let mut found: Vec<Vec<String>> = Vec::new();
    for node in graph.keys() {
        if found.iter().any(|c| c.contains(node)) {
            continue;
        }
        let component: Vec<String> = graph
            .keys()
            .filter(|other| *other == node || (reaches(node, other) && reaches(other, node)))
            .cloned()
            .collect();
        if component.len() > 1 {
            found.push(component);
        }
    }
    found
}

#[test]
fn no_module_of_the_library_imports_a_module_that_imports_it_back() {
    let (graph, _) = imports();
    assert!(graph.len() > 20, "the modules were not found: {graph:?}");
    assert!(graph.values().map(BTreeSet::len).sum::<usize>() > 20, "imports were not read: {graph:?}");
    let by_file = cycles(&graph);
    assert!(by_file.is_empty(), "modules that import each other: {by_file:?}");

    // And between the top-level modules (`instance` and `db` counted whole).
    let top = |module: &str| module.split("::").next().unwrap().to_owned();
    let mut coarse: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, targets) in &graph {
        let entry = coarse.entry(top(module)).or_default();
        entry.extend(targets.iter().map(|t| top(t)).filter(|t| *t != top(module)));
    }
    let by_top = cycles(&coarse);
    assert!(by_top.is_empty(), "top-level modules that import each other: {by_top:?}");
}

#[test]
fn modules_import_from_where_a_name_is_defined_not_from_the_roots_re_exports() {
    // A path through lib.rs's `pub use` hides an edge from the check above.
    let (_, through_root) = imports();
    assert!(through_root.is_empty(), "imports through the root: {through_root:#?}");
}

#[test]
fn the_import_reader_sees_groups_and_leaves_out_comments_and_macros() {
    let text = "use crate::a::{b, c::{d, E}};\n// crate::commented\nlet x = $crate::m; crate::f::g(1);";
    let paths: Vec<String> = crate_paths(text).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["a::b", "a::c::d", "a::c::E", "f::g"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    graph.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycles(&graph), [["a", "b", "c"]]);
}

/// The layout block of docs/design.md: directory (or, for a file at the root, "") to
/// the `.rs` files it names there.
fn design_layout() -> BTreeMap<String, BTreeSet<String>> {
    let design = std::fs::read_to_string(root().join("docs/design.md")).unwrap();
    let section = design.split("\n### The files\n").nth(1).expect("a \"The files\" section in docs/design.md");
    let block = section.split("```text\n").nth(1).and_then(|b| b.split("```").next()).expect("a text block");
    let mut layout: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dir = String::new();
    for line in block.lines() {
        if !line.starts_with(' ') {
            let first = line.split_whitespace().next().unwrap_or_default();
            dir = if first.ends_with('/') { first.to_owned() } else { String::new() };
        }
        let words = line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '/'));
        for word in words.filter(|w| w.ends_with(".rs") && !w.contains('/')) {
            layout.entry(dir.clone()).or_default().insert(word.to_owned());
        }
        layout.entry(dir.clone()).or_default();
    }
    layout
}

/// Every directory of the workspace that holds `.rs` files, with them.
fn source_tree() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, BTreeSet<String>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "migrations" {
                    walk(&path, &format!("{rel}{name}/"), out);
                }
            } else if name.ends_with(".rs") {
                out.entry(rel.to_owned()).or_default().insert(name);
            }
        }
    }
    let mut tree = BTreeMap::new();
    walk(&root(), "", &mut tree);
    tree
}

#[test]
fn the_design_layout_names_every_source_file_in_its_directory() {
    let layout = design_layout();
    // The project's own crates and folders: a task crate a project adds by the recipe
    // (docs/task-crates.md) is its own (and this test must stay green after the recipe).
    let ours = |dir: &str| layout.keys().any(|named| named.split('/').next() == dir.split('/').next());
    for (dir, files) in source_tree().into_iter().filter(|(dir, _)| dir.is_empty() || ours(dir)) {
        let named = layout.get(&dir).unwrap_or_else(|| panic!("the layout in docs/design.md lacks {dir:?}"));
        assert_eq!(named, &files, "the layout in docs/design.md of {dir:?} differs from the tree");
    }
}

/// The recipe of docs/task-crates.md, step by step, holds for the project's own task
/// crate: `tasks/` is the recipe's example, built and tested with everything else.
#[test]
fn every_task_crate_follows_the_recipe() {
    let page = std::fs::read_to_string(root().join("docs/task-crates.md")).unwrap();
    let recipe = page.split("\n## Adding a task crate\n").nth(1).unwrap().split("\n## ").next().unwrap();
    let read = |path: &str| std::fs::read_to_string(root().join(path)).unwrap();
    let manifest = read("tasks/Cargo.toml");
    let dependencies = manifest.split("[dependencies]\n").nth(1).unwrap().split("\n[").next().unwrap();

    // 1. the dependencies the recipe names (each `name.workspace = true` in backquotes)
    let named: Vec<&str> = recipe.split('`').filter(|s| s.ends_with(".workspace = true")).collect();
    assert!(named.len() >= 3, "the recipe names its dependencies: {named:?}");
    for line in named {
        assert!(dependencies.lines().any(|l| l.trim() == line), "tasks/Cargo.toml lacks {line:?}");
    }
    // 2. a member, and a default member
    let workspace = read("Cargo.toml");
    for table in ["members", "default-members"] {
        let list = workspace.split(&format!("\n{table} = [")).nth(1).unwrap().split(']').next().unwrap();
        assert!(list.split(',').any(|m| m.trim() == "\"tasks\""), "tasks is not in {table}");
    }
    // 3. a dependency of `engine`
    assert!(read("engine/Cargo.toml").lines().any(|l| l.starts_with("tasks")), "engine does not depend on tasks");
    // 4. `pub fn link() {}`
    assert!(read("tasks/src/lib.rs").contains("\npub fn link() {}\n"), "tasks has no `pub fn link() {{}}`");
}
