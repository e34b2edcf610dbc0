//! The transitions' rules against the statements: each statement uses its rules, and
//! no file but a rule's home writes it out.

use std::path::Path;

use super::*;
use crate::db::{claim, completion, operator, rescue, unique};

/// The statements that move a task, with the rules each must use.
fn transition_statements() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let rules = |rules: &[&str]| rules.iter().map(|r| r.to_string()).collect::<Vec<_>>();
    let running = rules(&[mark_running!("$3")]);
    let back = "t.unique_scope = 'waiting' THEN 'released'";
    let notify = "pg_notify(task_engine_channel(), json_build_object(";
    let ended = rules(&[cancel_wins!(), back, notify]);
    let mut statements = vec![
        ("claim", claim::CLAIM, running.clone()),
        ("claim (keys in turn)", claim::CLAIM_FAIR, running.clone()),
        ("claim (a limit per key)", claim::CLAIM_CAPPED, running),
        ("complete", completion::COMPLETE, ended.clone()),
        ("release", completion::RELEASE, ended.clone()),
        ("release of an abandoned attempt", completion::RELEASE_ABANDONED, ended.clone()),
        ("operator's retry", operator::REQUEUE, rules(&[retried_by_operator!()])),
        ("operator's bulk retry", operator::REQUEUE_BATCH, rules(&[retried_by_operator!(), notify])),
        ("replace of a unique task", unique::REPLACE_WAITING, rules(&[notify])),
    ];
    // A lost attempt's task waits the default retry delay, from `retry`'s constants.
    let mut rescued = ended;
    rescued.push(default_retry_seconds("t.attempts", "random()"));
    statements.extend(rescue::statements().map(|(name, statement)| (name, statement, rescued.clone())));
    statements
}

#[test]
fn every_transition_statement_uses_the_rules_written_here() {
    let statements = transition_statements();
    assert_eq!(statements.len(), 12);
    for (name, statement, rules) in statements {
        for rule in rules {
            assert!(statement.contains(&rule), "the {name} statement does not use the rule {rule:?}:\n{statement}");
        }
    }
}

/// What only a rule's home may write: its own words. Anywhere else in the
/// library's SQL, a statement would be applying the rule by hand.
#[test]
fn no_statement_writes_a_transition_rule_by_hand() {
    let here = "db/transitions.rs";
    let rules = [
        ("a cancel wins", "cancel_requested_at IS NOT NULL THEN", here),
        ("a key let go", "THEN 'released'", here),
        ("a key let go", "ELSE 'released'", here),
        ("the notification", "json_build_object('ready'", here),
        ("the notification", "'next_in',", here),
        ("the claim's update", "attempts = t.attempts + 1", here),
        ("an operator's retry", "GREATEST(t.max_attempts", here),
        ("an operator's retry", "GREATEST(max_attempts", here),
        ("the retry curve", "power(least(", "retry.rs"),
    ];
    let mut found = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (rule, words, home) in rules {
                    if text.contains(words) && !path.ends_with(home) && !path.ends_with("db/transitions_tests.rs") {
                        found.push(format!("{}: {rule} ({words:?})", path.display()));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "rules written out by hand: {found:#?}");
}
