//! What a task crate's tests use: a [`TestContext`], the [`TaskContext`] of a plain unit
//! test (no database, no instance), whose stop, cancel and time limit the test sets and
//! whose progress and checkpoints it reads back; and [`run_task`] and [`perform`], which
//! run one attempt inline as the engine does (parameters parsed from JSON, output
//! serialised), against the test's database if its context has one. `docs/testing.md`
//! says what is simulated and what is not.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::context::{Host, TaskContext, TestHost, TestReports};
use crate::db::connect::PgPool;
use crate::registry::run_typed;
use crate::task::{Task, TaskError};

/// A [`TaskContext`] for a test: pass `&ctx` where a task takes `&TaskContext`.
///
/// ```
/// use task_engine::testing::TestContext;
///
/// let ctx = TestContext::builder().attempt(2).checkpoint(&40).build();
/// assert_eq!(ctx.attempt(), 2);
/// assert_eq!(ctx.last_checkpoint::<u32>().unwrap(), Some(40));
/// ctx.progress(50, "half way").unwrap();
/// ctx.controls().stop();
/// assert!(ctx.stop_requested());
/// assert_eq!(ctx.progress_reports()[0].percent, 50);
/// ```
pub struct TestContext {
    context: TaskContext,
    host: Arc<TestHost>,
}

impl TestContext {
    /// A context with the defaults of [`TestContextBuilder`]: attempt 1 of 25 of task 1
    /// of type `test`, on instance `test`, without a database.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts a context with settings of the test's choosing.
    pub fn builder() -> TestContextBuilder {
        TestContextBuilder::default()
    }

    /// Returns the switches that the engine would throw: stop, cancel, time limit. They
    /// may be sent to another thread, to throw one while the task runs.
    pub fn controls(&self) -> Controls {
        Controls {
            stopping: Arc::clone(&self.host.stopping),
            cancelled: Arc::clone(&self.context.cancelled),
            timed_out: Arc::clone(&self.context.timed_out),
        }
    }

    /// Returns every [`TaskContext::progress`] the task reported, in order (the engine
    /// writes at most one a second; a test sees them all).
    pub fn progress_reports(&self) -> Vec<Progress> {
        let reports = self.host.reports();
        reports
            .progress
            .iter()
            .map(|(percent, message)| Progress {
                percent: u8::try_from(*percent).unwrap_or(100),
                message: message.clone(),
            })
            .collect()
    }

    /// Returns every checkpoint the task saved ([`TaskContext::checkpoint`]), as JSON,
    /// in order; the one the test gave is not among them.
    pub fn checkpoints(&self) -> Vec<serde_json::Value> {
        self.host.reports().checkpoints.clone()
    }
}

impl Default for TestContext {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for TestContext {
    type Target = TaskContext;

    fn deref(&self) -> &TaskContext {
        &self.context
    }
}

/// The settings of a [`TestContext`].
#[derive(Clone)]
pub struct TestContextBuilder {
    task_id: i64,
    task_type: &'static str,
    attempt: i32,
    max_attempts: i32,
    instance: String,
    worker: usize,
    pool: Option<PgPool>,
    checkpoint: Option<serde_json::Value>,
}

impl Default for TestContextBuilder {
    fn default() -> Self {
        Self {
            task_id: 1,
            task_type: "test",
            attempt: 1,
            max_attempts: 25,
            instance: "test".to_owned(),
            worker: 0,
            pool: None,
            checkpoint: None,
        }
    }
}

impl TestContextBuilder {
    /// Takes the type name and the attempts of `T` ([`Task::NAME`],
    /// [`Task::MAX_ATTEMPTS`]).
    pub fn task<T: Task>(mut self) -> Self {
        self.task_type = T::NAME;
        self.max_attempts = T::MAX_ATTEMPTS;
        self
    }

    /// Sets [`TaskContext::task_id`] (default 1). No row of `tasks` has to exist.
    pub fn task_id(mut self, task_id: i64) -> Self {
        self.task_id = task_id;
        self
    }

    /// Sets [`TaskContext::task_type`] (default `test`).
    pub fn task_type(mut self, task_type: &'static str) -> Self {
        self.task_type = task_type;
        self
    }

    /// Sets [`TaskContext::attempt`], 1 for the first (the default).
    pub fn attempt(mut self, attempt: i32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Sets [`TaskContext::max_attempts`] (default 25, as [`Task::MAX_ATTEMPTS`]).
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets [`TaskContext::instance`] (default `test`).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }

    /// Sets [`TaskContext::worker`] (default 0).
    pub fn worker(mut self, worker: usize) -> Self {
        self.worker = worker;
        self
    }

    /// Gives the task a database: [`TaskContext::connection`] and
    /// [`TaskContext::pool`] use this pool. Without it, `connection` returns an error
    /// and `pool` panics, each saying so.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Seeds the checkpoint that [`TaskContext::last_checkpoint`] returns, as if an
    /// earlier attempt had saved it.
    ///
    /// # Panics
    ///
    /// If `value` does not serialise to JSON.
    pub fn checkpoint(mut self, value: &impl Serialize) -> Self {
        let value = serde_json::to_value(value)
            .unwrap_or_else(|e| panic!("the checkpoint given to the test context is not JSON: {e}"));
        self.checkpoint = Some(value);
        self
    }

    /// Builds the context.
    pub fn build(self) -> TestContext {
        let host = Arc::new(TestHost {
            name: self.instance,
            stopping: Arc::new(AtomicBool::new(false)),
            pool: self.pool,
            reports: Mutex::new(TestReports { last_checkpoint: self.checkpoint, ..TestReports::default() }),
        });
        let context = TaskContext {
            task_id: self.task_id,
            task_type: self.task_type,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            worker: self.worker,
            cancelled: Arc::new(AtomicBool::new(false)),
            timed_out: Arc::new(AtomicBool::new(false)),
            instance: Host::Test(Arc::clone(&host)),
            reported: Default::default(),
        };
        TestContext { context, host }
    }
}

/// The engine's switches on one [`TestContext`], which a test throws (from any thread).
#[derive(Clone)]
pub struct Controls {
    stopping: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl Controls {
    /// Stops the instance, as a shutdown does: [`TaskContext::stop_requested`] turns
    /// true.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Cancels the task, as `engine cancel` does: [`TaskContext::cancel_requested`] and
    /// [`TaskContext::stop_requested`] turn true.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Passes the attempt's time limit, as the watchdog does:
    /// [`TaskContext::timed_out`] and [`TaskContext::stop_requested`] turn true.
    pub fn time_out(&self) {
        self.timed_out.store(true, Ordering::Relaxed);
    }
}

/// One [`TaskContext::progress`] report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// How far, 0 to 100 (more was taken as 100, as the engine takes it).
    pub percent: u8,
    /// What the task said it was doing.
    pub message: String,
}

/// Runs one attempt of the task type `T` with these parameters, inline, as the engine
/// runs it: the parameters go through JSON and are parsed as the engine parses a stored
/// task's, so parameters that do not fit fail with the permanent error the engine
/// records; the output must serialise, as the engine stores it. Returns the task's
/// output, or the error the engine would record for the attempt
/// ([`TaskError::is_permanent`], [`TaskError::snoozed_for`]).
///
/// `parameters` is anything that serialises to the parameters' JSON: a
/// `serde_json::json!` value, or a value of `T` (see [`perform`]). A panic of the task
/// is not caught: it fails the test.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use task_engine::testing::{run_task, TestContext};
/// use task_engine::{Task, TaskContext, TaskError};
///
/// #[derive(Serialize, Deserialize)]
/// struct Greet { name: String }
/// impl Task for Greet {
///     const NAME: &'static str = "greet";
///     type Output = String;
///     fn run(&self, _: &TaskContext) -> Result<String, TaskError> { Ok(format!("hello {}", self.name)) }
/// }
///
/// let ctx = TestContext::new();
/// assert_eq!(run_task::<Greet>(&serde_json::json!({"name": "Ada"}), &ctx).unwrap(), "hello Ada");
/// let error = run_task::<Greet>(&serde_json::json!({"nom": "Ada"}), &ctx).unwrap_err();
/// assert!(error.is_permanent());
/// assert!(error.message().starts_with("parameters do not fit task type `greet`"));
/// ```
///
/// # Panics
///
/// If `parameters` do not serialise to JSON (an enqueue would refuse them), or the task
/// panics.
pub fn run_task<T: Task>(parameters: &impl Serialize, ctx: &TaskContext) -> Result<T::Output, TaskError> {
    let parameters = serde_json::to_value(parameters)
        .unwrap_or_else(|e| panic!("the parameters given for task type `{}` are not JSON: {e}", T::NAME));
    let mut stored = String::new();
    as_stored(&parameters, &mut stored);
    run_typed::<T>(&stored, ctx).map(|(output, _)| output).map_err(|failure| failure.into_task_error())
}

/// Runs one attempt of `task` inline as the engine would after enqueueing it: like
/// [`run_task`], through its JSON, so that a type whose parameters do not come back
/// from their own JSON fails here as in the engine.
///
/// # Panics
///
/// As [`run_task`].
pub fn perform<T: Task>(task: &T, ctx: &TaskContext) -> Result<T::Output, TaskError> {
    run_task::<T>(task, ctx)
}

/// Writes `value` as PostgreSQL gives back a `jsonb` (`task_parameters::text`, what the
/// engine parses): keys by length, then by bytes, and `, ` and `: ` between items, so
/// that a parse error names the place the engine's names. Numbers are written as
/// serde_json writes them (`jsonb` would write `1e3` as `1000`).
fn as_stored(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(object) => {
            let mut entries: Vec<_> = object.iter().collect();
            entries.sort_by(|(a, _), (b, _)| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
            out.push('{');
            for (n, (key, value)) in entries.into_iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::from(key.as_str()).to_string());
                out.push_str(": ");
                as_stored(value, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                as_stored(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::error::Error;

    /// Counts to `to`, reporting each step and saving it as its checkpoint, from the
    /// last checkpoint on; stops between steps when asked.
    #[derive(Serialize, Deserialize)]
    struct Count {
        to: u32,
    }

    impl Task for Count {
        const NAME: &'static str = "count";
        const MAX_ATTEMPTS: i32 = 3;
        type Output = u32;

        fn run(&self, ctx: &TaskContext) -> Result<u32, TaskError> {
            let from = ctx.last_checkpoint::<u32>()?.unwrap_or(0);
            for n in from + 1..=self.to {
                if ctx.stop_requested() {
                    return Err(TaskError::new(format!("stopped at {n}")));
                }
                ctx.checkpoint(&n)?;
                ctx.progress(u8::try_from(n).unwrap_or(u8::MAX), format!("at {n}"))?;
            }
            Ok(self.to - from)
        }
    }

    /// Reports progress until it is asked to stop, then says why it stopped.
    #[derive(Serialize, Deserialize)]
    struct UntilStopped {}

    impl Task for UntilStopped {
        const NAME: &'static str = "until_stopped";
        type Output = &'static str;

        fn run(&self, ctx: &TaskContext) -> Result<&'static str, TaskError> {
            let mut n = 0u8;
            while !ctx.stop_requested() {
                ctx.progress(n % 100, "working")?;
                n = n.wrapping_add(1);
                std::thread::yield_now();
            }
            Ok(if ctx.cancel_requested() {
                "cancelled"
            } else if ctx.timed_out() {
                "timed out"
            } else {
                "instance stopping"
            })
        }
    }

    /// Answers as its parameters say.
    #[derive(Serialize, Deserialize)]
    enum Answer {
        Snooze(u64),
        Permanent,
        Unserialisable,
    }

    impl Task for Answer {
        const NAME: &'static str = "answer";
        type Output = std::collections::HashMap<(u8, u8), u8>;

        fn run(&self, _: &TaskContext) -> Result<Self::Output, TaskError> {
            match self {
                Self::Snooze(secs) => Err(TaskError::snooze(Duration::from_secs(*secs))),
                Self::Permanent => Err(TaskError::permanent("no such customer")),
                // A map whose keys are not strings has no JSON.
                Self::Unserialisable => Ok([((1, 2), 3)].into()),
            }
        }
    }

    #[test]
    fn a_test_context_has_the_settings_it_was_built_with_and_defaults_otherwise() {
        let ctx = TestContext::new();
        assert_eq!(
            (ctx.task_id(), ctx.task_type(), ctx.attempt(), ctx.max_attempts(), ctx.instance(), ctx.worker()),
            (1, "test", 1, 25, "test", 0)
        );
        assert!(!ctx.stop_requested() && !ctx.cancel_requested() && !ctx.timed_out());

        let ctx = TestContext::builder().task::<Count>().task_id(7).attempt(3).instance("web-1").worker(2).build();
        assert_eq!(
            (ctx.task_id(), ctx.task_type(), ctx.attempt(), ctx.max_attempts(), ctx.instance(), ctx.worker()),
            (7, "count", 3, 3, "web-1", 2)
        );
        let ctx = TestContext::builder().task_type("other").max_attempts(9).build();
        assert_eq!((ctx.task_type(), ctx.max_attempts()), ("other", 9));
    }

    #[test]
    fn every_progress_and_checkpoint_is_kept_in_memory_for_the_test() {
        let ctx = TestContext::new();
        assert_eq!(run_task::<Count>(&serde_json::json!({"to": 3}), &ctx).unwrap(), 3);
        let progress = ctx.progress_reports();
        assert_eq!(
            progress,
            [1, 2, 3].map(|n| Progress { percent: n, message: format!("at {n}") }),
            "every report, though the engine would write one a second"
        );
        assert_eq!(ctx.checkpoints(), [1, 2, 3].map(|n| serde_json::json!(n)));
        assert_eq!(ctx.last_checkpoint::<u32>().unwrap(), Some(3));

        ctx.progress(250, "more than done").unwrap();
        assert_eq!(ctx.progress_reports().last().unwrap().percent, 100, "clamped as the engine clamps it");
    }

    #[test]
    fn a_seeded_checkpoint_is_where_the_attempt_resumes_until_it_saves_another() {
        let ctx = TestContext::builder().attempt(2).checkpoint(&7).build();
        assert_eq!(ctx.last_checkpoint::<u32>().unwrap(), Some(7));
        assert_eq!(run_task::<Count>(&serde_json::json!({"to": 9}), &ctx).unwrap(), 2, "resumed after 7");
        assert_eq!(ctx.checkpoints(), [serde_json::json!(8), serde_json::json!(9)]);
        assert_eq!(ctx.last_checkpoint::<u32>().unwrap(), Some(9));

        assert_eq!(TestContext::new().last_checkpoint::<u32>().unwrap(), None, "a first start has none");
        let error = TestContext::builder().checkpoint(&"seven").build().last_checkpoint::<u32>().unwrap_err();
        assert!(error.to_string().contains("the checkpoint of task type `test` does not fit"), "{error}");
    }

    #[test]
    fn a_stop_thrown_from_another_thread_reaches_the_running_task() {
        for (throw, why) in [
            (Controls::stop as fn(&Controls), "instance stopping"),
            (Controls::cancel, "cancelled"),
            (Controls::time_out, "timed out"),
        ] {
            let ctx = TestContext::new();
            let controls = ctx.controls();
            let (sent, thrown) = mpsc::channel();
            std::thread::scope(|s| {
                let ctx = &ctx;
                s.spawn(move || {
                    // Mid-run: once the task has reported.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while ctx.progress_reports().is_empty() {
                        assert!(Instant::now() < deadline, "the task never reported");
                        std::thread::yield_now();
                    }
                    throw(&controls);
                    sent.send(()).unwrap();
                });
                assert_eq!(perform(&UntilStopped {}, ctx).unwrap(), why);
            });
            thrown.recv().unwrap();
            assert!(ctx.stop_requested());
        }
    }

    #[test]
    fn parameters_that_do_not_fit_fail_for_good_with_the_engines_message() {
        let ctx = TestContext::new();
        let error = run_task::<Count>(&serde_json::json!({"to": "ten"}), &ctx).unwrap_err();
        assert!(error.is_permanent());
        // What the engine parses: the stored parameters, as PostgreSQL gives them back.
        let engine = crate::registry::TaskEntry::of::<Count>("Count").run(r#"{"to": "ten"}"#, &ctx);
        let Err(failure) = engine else { panic!("the engine ran it") };
        assert_eq!(error.message(), failure.into_message(), "the message the engine records");
        assert!(ctx.progress_reports().is_empty(), "the task did not run");
    }

    #[test]
    fn a_snooze_a_permanent_error_and_an_output_without_json_come_back_as_the_engine_sees_them() {
        let ctx = TestContext::new();
        let snoozed = perform(&Answer::Snooze(30), &ctx).unwrap_err();
        assert_eq!(snoozed.snoozed_for(), Some(Duration::from_secs(30)));
        assert!(!snoozed.is_permanent());
        let permanent = perform(&Answer::Permanent, &ctx).unwrap_err();
        assert!(permanent.is_permanent());
        assert_eq!(permanent.message(), "no such customer");
        let unserialisable = perform(&Answer::Unserialisable, &ctx).unwrap_err();
        assert!(unserialisable.is_permanent());
        assert!(unserialisable.message().starts_with("could not serialise the result of `answer`"), "{unserialisable}");
    }

    #[test]
    fn parameters_are_parsed_from_the_text_postgresql_gives_back_for_them() {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Text {
            #[diesel(sql_type = diesel::sql_types::Text)]
            text: String,
        }
        let value = serde_json::json!({
            "bb": [1, -2.5, true, null, {"z": "é\"\\\n\u{1}", "yy": []}],
            "a": {}, "ccc": "x", "b": 0, "B": "upper"
        });
        let db = test_db::TestDatabase::new();
        let stored: Text = diesel::sql_query("SELECT $1::jsonb::text AS text")
            .bind::<diesel::sql_types::Text, _>(value.to_string())
            .get_result(&mut db.connect())
            .unwrap();
        let mut ours = String::new();
        as_stored(&value, &mut ours);
        assert_eq!(ours, stored.text);
    }

    #[test]
    fn without_a_pool_a_connection_is_refused_with_a_reason() {
        let ctx = TestContext::new();
        let error = ctx.connection().err().expect("no database, no connection");
        assert!(matches!(error, Error::Config(_)), "{error}");
        assert!(error.to_string().contains("has no database: give it a pool"), "{error}");
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = ctx.pool();
        }))
        .unwrap_err();
        let message = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
        assert!(message.is_some_and(|m| m.contains("give it a pool")), "{message:?}");
    }
}
