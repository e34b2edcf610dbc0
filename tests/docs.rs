//! The README and the guide in docs/ hold together: every relative link leads to a file
//! that exists and, when it names a heading, to a heading of that page; the README links
//! every page of the guide and stays a front door. Links to other sites are not fetched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pages checked: README.md, CHANGELOG.md and every docs/*.md.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("CHANGELOG.md")];
    let mut guide: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    guide.sort();
    pages.extend(guide);
    pages
}

/// A page without its fenced code blocks (each of their lines left empty).
fn without_code_blocks(text: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if !inside {
            out += line;
        }
        out.push('\n');
    }
    out
}

/// Text with its inline code spans (a run of backquotes up to the next run as long)
/// replaced by `code`, so that a link whose text is code is still seen as a link.
fn without_inline_code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        out += &rest[..start];
        let run = rest[start..].len() - rest[start..].trim_start_matches('`').len();
        let after = &rest[start + run..];
        match after.find(&"`".repeat(run)) {
            Some(end) => {
                out += "code";
                rest = &after[end + run..];
            }
            None => {
                out += &rest[start..start + run];
                rest = after;
            }
        }
    }
    out + rest
}

/// The targets of the inline links `[text](target)` of a page's prose: code blocks and
/// inline code left out, and links to other sites too.
fn relative_links(text: &str) -> Vec<String> {
    let prose = without_inline_code(&without_code_blocks(text));
    let mut links = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let end = rest.find([')', ' ', '\n']).unwrap_or(rest.len());
        let target = &rest[..end];
        if !["http://", "https://", "mailto:"].iter().any(|scheme| target.starts_with(scheme)) {
            links.push(target.to_owned());
        }
    }
    links
}

/// GitHub's anchor for a heading: lowercase, spaces to `-`, punctuation other than `-`
/// and `_` removed.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page: its headings' slugs, a repeated one numbered as GitHub does
/// (`name`, `name-1`, ...).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    for line in without_code_blocks(text).lines() {
        let hashes = line.len() - line.trim_start_matches('#').len();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = slug(&line[hashes..]);
            let mut anchor = base.clone();
            let mut n = 0;
            while !anchors.insert(anchor.clone()) {
                n += 1;
                anchor = format!("{base}-{n}");
            }
        }
    }
    anchors
}

/// What is wrong with one link of `page`, if anything.
fn broken(page: &Path, target: &str) -> Option<String> {
    let (file, anchor) = match target.split_once('#') {
        Some((file, anchor)) => (file, Some(anchor)),
        None => (target, None),
    };
    let path = if file.is_empty() { page.to_owned() } else { page.parent().unwrap().join(file) };
    if !path.exists() {
        return Some(format!("{target}: no file {}", path.display()));
    }
    let anchor = anchor?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    (!anchors(&text).contains(anchor))
        .then(|| format!("{target}: no heading of {} has the anchor {anchor:?}", path.display()))
}

#[test]
fn every_relative_link_in_the_readme_and_the_docs_resolves() {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for target in relative_links(&text) {
            checked += 1;
            if let Some(why) = broken(&page, &target) {
                wrong.push(format!("{}: {why}", page.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(checked > 50, "only {checked} links were found: the reader misses them");
    assert!(wrong.is_empty(), "broken links:\n{}", wrong.join("\n"));
}

#[test]
fn the_readme_links_every_page_of_the_guide() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let linked: BTreeSet<String> =
        relative_links(&readme).into_iter().map(|t| t.split('#').next().unwrap().to_owned()).collect();
    for page in pages().iter().filter(|p| p.parent() == Some(&root().join("docs"))) {
        let name = format!("docs/{}", page.file_name().unwrap().to_str().unwrap());
        assert!(linked.contains(&name), "the README does not link {name}");
    }
}

#[test]
fn the_readme_is_a_front_door_of_at_most_260_lines() {
    let lines = std::fs::read_to_string(root().join("README.md")).unwrap().lines().count();
    assert!(lines <= 260, "the README has {lines} lines: move the detail to a page of docs/");
}

#[test]
fn a_heading_becomes_the_anchor_github_gives_it() {
    assert_eq!(slug("The `engine` command"), "the-engine-command");
    assert_eq!(slug("Queues' cost (issue 17)"), "queues-cost-issue-17");
    assert_eq!(slug("One bad task, row or outcome"), "one-bad-task-row-or-outcome");
    assert_eq!(slug("snake_case and-dash: 2.5x"), "snake_case-and-dash-25x");
    let page = "# Title\n## Two words\n```sh\n# a comment, not a heading\n```\n## Two words\n#hashtag\n";
    assert_eq!(anchors(page), BTreeSet::from(["title".into(), "two-words".into(), "two-words-1".into()]));
}

#[test]
fn links_in_code_are_not_links_and_code_in_a_link_text_is() {
    let page = "See [`engine run`](cli.md#run) and [x](https://example.org).\n\
                `[not](a.md)` and\n```text\n[nor](b.md)\n```\n[a\nwrapped text](c.md#d)\n";
    assert_eq!(relative_links(page), ["cli.md#run", "c.md#d"]);
}

/// A page's Rust examples run under `cargo test --doc` only if `src/lib.rs` includes
/// the page: one added to the guide without that would never be compiled.
#[test]
fn every_page_with_rust_examples_is_compiled_by_the_doc_tests() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let mut with_examples = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        if !text.lines().any(|line| line.trim_start().starts_with("```rust")) {
            continue;
        }
        with_examples += 1;
        let name = page.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        let included = format!("include_str!(\"../{name}\")");
        assert!(lib.contains(&included), "{name} has Rust examples that src/lib.rs does not include ({included})");
    }
    assert!(with_examples >= 6, "{with_examples} pages with Rust examples");
}
