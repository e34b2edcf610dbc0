//! The rules of a task's state transitions, each written once. Every statement that
//! moves a task takes its rules from here, so that a new rule, or a new column that a
//! transition must move, changes one place: `docs/state-machine.md` lists each
//! transition with the function and the statement that make it. The tests below fail
//! when a transition statement stops using these rules, or when one is written out by
//! hand elsewhere.
//!
//! The rules are SQL fragments (macros, since the statements are built with `concat!`)
//! over the task row aliased `t`, and the default retry delay's curve, shared with
//! [`crate::retry`](mod@crate::retry).

/// waiting → running, the claim's update of the rows it locked: one more attempt, run
/// by the instance `$instance` (a parameter), from now: while it runs, `updated_at` is
/// its attempt's start.
macro_rules! mark_running {
    ($instance:literal) => {
        concat!("status = 'running', instance = ", $instance, ", attempts = t.attempts + 1, updated_at = now()")
    };
}
pub(crate) use mark_running;

/// Out of `running` by any way but a success (a failure, a retry, a snooze, a release,
/// a rescue): a cancel an operator requested while the attempt ran wins, and the task
/// ends `cancelled`. A `WHEN` clause of the new status's `CASE`, after a success's.
macro_rules! cancel_wins {
    () => {
        "WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'"
    };
}
pub(crate) use cancel_wins;

/// Back to waiting after a run, a task lets go a unique key it held only while waiting
/// (`released`): a newer task may hold it now (migration 16); a task that holds its key
/// while running keeps it through its retries. After a completion or a release,
/// `unique::keep_keys` gives the key back where no other task holds it. `$when`, if given, says when the task
/// goes back to waiting (otherwise: whatever its new status, which holds no key unless
/// it waits).
macro_rules! lets_waiting_key_go {
    () => {
        "unique_scope = CASE WHEN t.unique_key IS NOT NULL AND t.unique_scope = 'waiting' THEN 'released'
                                     ELSE t.unique_scope END"
    };
    ($when:literal) => {
        concat!(
            "unique_scope = CASE WHEN ",
            $when,
            " AND t.unique_key IS NOT NULL
                                      AND t.unique_scope = 'waiting' THEN 'released' ELSE t.unique_scope END"
        )
    };
}
pub(crate) use lets_waiting_key_go;

/// failed or cancelled → waiting, by an operator (`engine retry`): due now, the cancel
/// request forgotten, one more attempt if it used them all, its history kept; a unique
/// key let go whatever its scope (a newer task may hold it).
macro_rules! retried_by_operator {
    () => {
        "status = 'waiting', run_at = now(), cancel_requested_at = NULL,
     max_attempts = GREATEST(t.max_attempts, t.attempts + 1), updated_at = now(),
     unique_scope = CASE WHEN t.unique_key IS NULL THEN t.unique_scope ELSE 'released' END"
    };
}
pub(crate) use retried_by_operator;

/// The notification that tasks wait (again, or changed): `$ready` of them runnable now,
/// and, if given, the earliest of the others due in `$next_in` seconds. The listener
/// reads it (`Payload` in `instance/listener.rs`); the insert trigger sends the same
/// keys. Sent at commit, on the deployment's channel.
macro_rules! notify_waiting {
    ($ready:literal) => {
        concat!("pg_notify(task_engine_channel(), json_build_object('ready', ", $ready, ")::text)")
    };
    ($ready:literal, $next_in:literal) => {
        concat!(
            "pg_notify(task_engine_channel(), json_build_object(
                        'ready', ",
            $ready,
            ",
                        'next_in', ",
            $next_in,
            "
                    )::text)"
        )
    };
}
pub(crate) use notify_waiting;

/// The seconds a task waits, after its failed attempt `attempts` (an expression), before
/// the next, by the default retry delay ([`crate::retry::DEFAULT`]), `unit` standing
/// for a random number in [0, 1): the rescue's, since a lost attempt's task has no
/// type of ours to ask.
pub(crate) fn default_retry_seconds(attempts: &str, unit: &str) -> String {
    crate::retry::DEFAULT.sql_seconds(attempts, unit)
}

#[cfg(test)]
#[path = "transitions_tests.rs"]
mod tests;
