//! What the tests share: a runner factory, waiting on a condition with a deadline,
//! and task types declared for the tests only.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use task_engine::models::{Task as TaskRow, TaskExecution};
use task_engine::schema::{task_executions, tasks};
use task_engine::{register_task, NewTask, Registry, Runner, RunningEngine, Task, TaskContext, TaskError};
use test_db::TestDatabase;

/// How long a test waits for the engine before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// An instance on `db` with every registered type, ready to configure further. Its
/// fallback poll is an hour: only a notification (or the check after the listener
/// connects) can start a task within a test's patience.
pub fn runner(db: &TestDatabase, instance: &str, workers: usize) -> Runner {
    Runner::new(db.url(), Registry::from_inventory().expect("registry"))
        .instance(instance)
        .workers(workers)
        .poll_interval(Duration::from_secs(3600))
}

/// Starts an instance like [`runner`] makes it.
pub fn start_engine(db: &TestDatabase, instance: &str, workers: usize) -> RunningEngine {
    runner(db, instance, workers).start().expect("engine starts")
}

/// Waits until every worker of `engine` sleeps and its listener listens.
pub fn wait_until_idle(engine: &RunningEngine, workers: usize) {
    wait_until("the engine is idle and listening", || {
        let stats = engine.stats();
        stats.listening && stats.marked_idle && stats.sleeping_workers == workers
    });
}

/// Calls `condition` until it returns true; panics with `what` after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until no task of the database is waiting or running.
pub fn wait_until_all_ended(conn: &mut PgConnection) {
    wait_until("every task has ended", || unfinished(conn) == 0);
}

pub fn unfinished(conn: &mut PgConnection) -> i64 {
    task_engine::report::unfinished_tasks(conn, ..).expect("count unfinished tasks")
}

/// The attempts of tasks no longer running that do not have exactly one closed
/// execution, plus the executions still open (none should be: an execution is
/// written when its attempt ends).
pub fn attempts_not_recorded_once(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT (SELECT count(*) FROM tasks t, generate_series(1, t.attempts) a
                 WHERE t.status <> 'running'
                   AND (SELECT count(*) FROM task_executions e
                        WHERE e.task_id = t.id AND e.attempt = a AND e.stopped_at IS NOT NULL) <> 1)
              + (SELECT count(*) FROM task_executions WHERE stopped_at IS NULL) AS n",
    )
    .get_result::<Count>(conn)
    .expect("count the attempts")
    .n
}

pub fn load_task(conn: &mut PgConnection, id: i64) -> TaskRow {
    tasks::table.find(id).select(TaskRow::as_select()).first(conn).expect("task row")
}

pub fn executions_of(conn: &mut PgConnection, id: i64) -> Vec<TaskExecution> {
    task_executions::table
        .filter(task_executions::task_id.eq(id))
        .order(task_executions::id)
        .select(TaskExecution::as_select())
        .load(conn)
        .expect("executions")
}

/// Waits until the task is in the state `wanted`.
pub fn wait_for_status(conn: &mut PgConnection, id: i64, wanted: &str) {
    wait_until(&format!("task {id} is {wanted}"), || load_task(conn, id).status == wanted);
}

/// The task's status, read without a model (any row can be read).
pub fn status_of(conn: &mut PgConnection, id: i64) -> String {
    tasks::table.find(id).select(tasks::status).first(conn).unwrap()
}

/// An `echo` task of the `tasks` crate, returning `value`.
pub fn echo(value: serde_json::Value) -> NewTask {
    NewTask::new(&::tasks::Echo(value)).unwrap()
}

/// A task that reports its start and then blocks until its gate is opened: it lets a
/// test act while a task is known to be running, with no sleep.
#[derive(Serialize, Deserialize)]
pub struct Gated {
    pub gate: String,
}

impl Task for Gated {
    const NAME: &'static str = "test_gated";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        let gate = Gate::named(&self.gate);
        let mut state = gate.state.lock().unwrap();
        state.started += 1;
        gate.changed.notify_all();
        let _state = gate.changed.wait_while(state, |s| !s.open).unwrap();
        Ok(())
    }
}
register_task!(Gated);

/// Says on its gate that it started, then runs until it is asked to stop: fails
/// "cancelled while running" when cancelled, succeeds when the gate opens.
#[derive(Serialize, Deserialize)]
pub struct UntilCancelled {
    pub gate: String,
}

impl Task for UntilCancelled {
    const NAME: &'static str = "test_until_cancelled";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        let gate = Gate::named(&self.gate);
        let mut state = gate.state.lock().unwrap();
        state.started += 1;
        gate.changed.notify_all();
        while !state.open {
            if ctx.cancel_requested() {
                return Err(TaskError::permanent("cancelled while running"));
            }
            state = gate.changed.wait_timeout(state, Duration::from_millis(5)).unwrap().0;
        }
        Ok(())
    }
}
register_task!(UntilCancelled);

#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    started: usize,
    open: bool,
}

impl Gate {
    /// Returns the gate of that name, shared by every task that names it.
    pub fn named(name: &str) -> Arc<Gate> {
        static GATES: OnceLock<Mutex<HashMap<String, Arc<Gate>>>> = OnceLock::new();
        let gates = GATES.get_or_init(Default::default);
        Arc::clone(gates.lock().unwrap().entry(name.to_owned()).or_default())
    }

    /// Blocks until `count` tasks have started behind the gate.
    pub fn wait_for_started(&self, count: usize) {
        let state = self.state.lock().unwrap();
        let (_state, timeout) = self.changed.wait_timeout_while(state, PATIENCE, |s| s.started < count).unwrap();
        assert!(!timeout.timed_out(), "timed out waiting for {count} gated tasks to start");
    }

    pub fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }
}

/// How many times each key has been run, for the tasks below.
fn runs_of(key: &str) -> u32 {
    static RUNS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    let mut runs = RUNS.get_or_init(Default::default).lock().unwrap();
    let n = runs.entry(key.to_owned()).or_default();
    *n += 1;
    *n
}

/// Fails its first `failures` runs, then succeeds with the attempt number. Retries
/// after 10 ms.
#[derive(Serialize, Deserialize)]
pub struct Flaky {
    pub key: String,
    pub failures: u32,
}

impl Task for Flaky {
    const NAME: &'static str = "test_flaky";
    type Output = i32;

    fn run(&self, ctx: &TaskContext) -> Result<i32, TaskError> {
        let run = runs_of(&self.key);
        if run <= self.failures {
            return Err(TaskError::new(format!("failure {run}")));
        }
        Ok(ctx.attempt())
    }

    fn retry_delay(_attempt: i32) -> Duration {
        Duration::from_millis(10)
    }
}
register_task!(Flaky);

/// Snoozes its first `snoozes` runs for 20 ms, then succeeds with the attempt number;
/// one attempt.
#[derive(Serialize, Deserialize)]
pub struct Snoozer {
    pub key: String,
    pub snoozes: u32,
}

impl Task for Snoozer {
    const NAME: &'static str = "test_snoozer";
    const MAX_ATTEMPTS: i32 = 1;
    type Output = i32;

    fn run(&self, ctx: &TaskContext) -> Result<i32, TaskError> {
        if runs_of(&self.key) <= self.snoozes {
            return Err(TaskError::snooze(Duration::from_millis(20)));
        }
        Ok(ctx.attempt())
    }
}
register_task!(Snoozer);

/// Works through `steps` steps from its last checkpoint, saving a checkpoint and its
/// progress after each; its first attempt fails after step `fail_after`. Returns the
/// step it started from. Retries after 10 ms.
#[derive(Serialize, Deserialize)]
pub struct Resumer {
    pub steps: u32,
    pub fail_after: u32,
}

impl Task for Resumer {
    const NAME: &'static str = "test_resumer";
    type Output = u32;

    fn run(&self, ctx: &TaskContext) -> Result<u32, TaskError> {
        let from = ctx.last_checkpoint::<u32>()?.unwrap_or(0);
        for step in from + 1..=self.steps {
            ctx.checkpoint(&step)?;
            ctx.progress((step * 100 / self.steps) as u8, format!("step {step} of {}", self.steps))?;
            if ctx.attempt() == 1 && step == self.fail_after {
                return Err(TaskError::new("crashed midway"));
            }
        }
        Ok(from)
    }

    fn retry_delay(_attempt: i32) -> Duration {
        Duration::from_millis(10)
    }
}
register_task!(Resumer);

/// Always fails, saying which attempt it was; 3 attempts unless enqueued otherwise;
/// retries after 10 ms.
#[derive(Serialize, Deserialize)]
pub struct AlwaysFails {}

impl Task for AlwaysFails {
    const NAME: &'static str = "test_always_fails";
    const MAX_ATTEMPTS: i32 = 3;
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        Err(TaskError::new(format!("attempt {} failed", ctx.attempt())))
    }

    fn retry_delay(_attempt: i32) -> Duration {
        Duration::from_millis(10)
    }
}
register_task!(AlwaysFails);

/// Panics on its first run, succeeds on the next; retries after 10 ms.
#[derive(Serialize, Deserialize)]
pub struct PanicsOnce {
    pub key: String,
}

impl Task for PanicsOnce {
    const NAME: &'static str = "test_panics_once";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        if runs_of(&self.key) == 1 {
            panic!("first run of {}", self.key);
        }
        Ok(())
    }

    fn retry_delay(_attempt: i32) -> Duration {
        Duration::from_millis(10)
    }
}
register_task!(PanicsOnce);

/// Counts its runs under its key, and panics on a second run of one task id: for
/// the batching tests.
#[derive(Serialize, Deserialize)]
pub struct Counted {
    pub key: String,
}

/// Runs so far of the [`Counted`] tasks under `key`.
pub fn counted_runs(key: &str) -> usize {
    counted_ids(key).len()
}

fn counted_ids(key: &str) -> std::collections::HashSet<i64> {
    COUNTED.get_or_init(Default::default).lock().unwrap().get(key).cloned().unwrap_or_default()
}

static COUNTED: OnceLock<Mutex<HashMap<String, std::collections::HashSet<i64>>>> = OnceLock::new();

impl Task for Counted {
    const NAME: &'static str = "test_counted";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        let mut all = COUNTED.get_or_init(Default::default).lock().unwrap();
        let first = all.entry(self.key.clone()).or_default().insert(ctx.task_id());
        assert!(first, "task {} handed to a second worker", ctx.task_id());
        Ok(())
    }
}
register_task!(Counted);

/// Creates the table where [`Recorded`] tasks write their own runs.
pub fn record_runs_here(conn: &mut PgConnection) {
    use diesel::connection::SimpleConnection;
    conn.batch_execute(
        "CREATE TABLE test_runs (task_id bigint NOT NULL, attempt int NOT NULL, instance text NOT NULL,
                                 started_at timestamptz NOT NULL, ended_at timestamptz)",
    )
    .expect("create test_runs");
}

/// Pairs of runs of one task that overlapped in time, by the tasks' own record (a run
/// not ended yet lasts forever): what "never twice at once" means. The executions
/// table cannot show it: a rescue closes an attempt when it rescues it.
pub fn overlapping_runs(conn: &mut PgConnection) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query(
        "SELECT count(*) AS n FROM test_runs a JOIN test_runs b
           ON a.task_id = b.task_id AND (a.started_at, a.attempt) < (b.started_at, b.attempt)
         WHERE tstzrange(a.started_at, coalesce(a.ended_at, 'infinity'))
            && tstzrange(b.started_at, coalesce(b.ended_at, 'infinity'))",
    )
    .get_result::<Count>(conn)
    .expect("count overlapping runs")
    .n
}

/// Runs of one task, by its own record.
pub fn recorded_runs(conn: &mut PgConnection, task_id: i64) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    diesel::sql_query("SELECT count(*) AS n FROM test_runs WHERE task_id = $1")
        .bind::<diesel::sql_types::BigInt, _>(task_id)
        .get_result::<Count>(conn)
        .expect("count runs")
        .n
}

/// Writes its real start and end into the test's `test_runs` table (see
/// [`record_runs_here`]), and between the two waits for its gate: the task's own
/// record of when it ran, where it ran.
#[derive(Serialize, Deserialize)]
pub struct Recorded {
    pub gate: String,
}

impl Task for Recorded {
    const NAME: &'static str = "test_recorded";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        run_recorded(ctx, || Gated { gate: self.gate.clone() }.run(ctx))
    }
}
register_task!(Recorded);

/// Runs `body` between the task's own record of its start and of its end, in
/// `test_runs` (see [`record_runs_here`]).
pub fn run_recorded(ctx: &TaskContext, body: impl FnOnce() -> Result<(), TaskError>) -> Result<(), TaskError> {
    let mut conn = ctx.connection()?;
    diesel::sql_query(
        "INSERT INTO test_runs (task_id, attempt, instance, started_at) VALUES ($1, $2, $3, clock_timestamp())",
    )
    .bind::<diesel::sql_types::BigInt, _>(ctx.task_id())
    .bind::<diesel::sql_types::Integer, _>(ctx.attempt())
    .bind::<diesel::sql_types::Text, _>(ctx.instance())
    .execute(&mut conn)?;
    body()?;
    diesel::sql_query("UPDATE test_runs SET ended_at = clock_timestamp() WHERE task_id = $1 AND attempt = $2")
        .bind::<diesel::sql_types::BigInt, _>(ctx.task_id())
        .bind::<diesel::sql_types::Integer, _>(ctx.attempt())
        .execute(&mut conn)?;
    Ok(())
}

/// Ends with an outcome PostgreSQL refuses to store: a NUL byte, which neither `jsonb`
/// (the result) nor `text` (the error) can hold. One attempt.
#[derive(Serialize, Deserialize)]
pub struct Poisoned {
    pub in_result: bool,
}

impl Task for Poisoned {
    const NAME: &'static str = "test_poisoned";
    const MAX_ATTEMPTS: i32 = 1;
    type Output = serde_json::Value;

    fn run(&self, _ctx: &TaskContext) -> Result<serde_json::Value, TaskError> {
        if self.in_result {
            Ok(serde_json::json!({ "text": "a nul \u{0} byte" }))
        } else {
            Err(TaskError::new("a nul \u{0} byte"))
        }
    }
}
register_task!(Poisoned);

/// Each run of a [`Logged`] task: task, attempt, instance, start, end (if it ended).
type Run = (i64, i32, String, Instant, Option<Instant>);

static RUN_LOG: OnceLock<Mutex<HashMap<String, Vec<Run>>>> = OnceLock::new();

/// Logs its real start and end in this process's memory (under its key), a few
/// milliseconds apart: the tasks' own record of their runs, whatever happens to the
/// database meanwhile.
#[derive(Serialize, Deserialize)]
pub struct Logged {
    pub key: String,
}

impl Task for Logged {
    const NAME: &'static str = "test_logged";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        let log = RUN_LOG.get_or_init(Default::default);
        let run = (ctx.task_id(), ctx.attempt(), ctx.instance().to_owned(), Instant::now(), None);
        let index = {
            let mut log = log.lock().unwrap();
            let runs = log.entry(self.key.clone()).or_default();
            runs.push(run);
            runs.len() - 1
        };
        // Its work: two milliseconds during which another run would overlap it.
        let until = Instant::now() + Duration::from_millis(2);
        while Instant::now() < until {
            std::thread::park_timeout(until - Instant::now());
        }
        log.lock().unwrap().get_mut(&self.key).unwrap()[index].4 = Some(Instant::now());
        Ok(())
    }
}
register_task!(Logged);

/// What the [`Logged`] tasks under `key` record: how many runs, how many distinct
/// tasks ran, and how many pairs of runs of one task overlapped in time.
pub fn logged_runs(key: &str) -> (usize, usize, usize) {
    let log = RUN_LOG.get_or_init(Default::default).lock().unwrap();
    let runs = log.get(key).cloned().unwrap_or_default();
    let mut by_task: HashMap<i64, Vec<(Instant, Option<Instant>)>> = HashMap::new();
    for (task, _, _, start, end) in &runs {
        by_task.entry(*task).or_default().push((*start, *end));
    }
    let mut overlaps = 0;
    for spans in by_task.values_mut() {
        spans.sort_by_key(|s| s.0);
        for (i, a) in spans.iter().enumerate() {
            overlaps += spans[i + 1..].iter().filter(|b| a.1.map_or(true, |end| b.0 < end)).count();
        }
    }
    (runs.len(), by_task.len(), overlaps)
}

/// Its first run waits for its gate and then fails (retried after 10 ms); later runs
/// succeed at once.
#[derive(Serialize, Deserialize)]
pub struct FailsOnceAtGate {
    pub gate: String,
}

impl Task for FailsOnceAtGate {
    const NAME: &'static str = "test_fails_once_at_gate";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        if runs_of(&self.gate) > 1 {
            return Ok(());
        }
        Gated { gate: self.gate.clone() }.run(ctx)?;
        Err(TaskError::new("failed once, at its gate"))
    }

    fn retry_delay(_attempt: i32) -> Duration {
        Duration::from_millis(10)
    }
}
register_task!(FailsOnceAtGate);

/// Runs until asked to stop, then fails; its type allows 100 ms and one attempt.
#[derive(Serialize, Deserialize)]
pub struct UntilStopped {}

impl Task for UntilStopped {
    const NAME: &'static str = "test_until_stopped";
    const MAX_ATTEMPTS: i32 = 1;
    const TIMEOUT: Option<Duration> = Some(Duration::from_millis(100));
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        let gate = Gate::named("until-stopped");
        let mut state = gate.state.lock().unwrap();
        while !ctx.stop_requested() {
            state = gate.changed.wait_timeout(state, Duration::from_millis(5)).unwrap().0;
        }
        Err(TaskError::new("stopped as asked"))
    }
}
register_task!(UntilStopped);
