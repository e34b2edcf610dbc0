//! Read-only monitoring queries, for `engine status` and `engine demo`. Nothing here
//! locks or changes a row.

use std::ops::{Bound, RangeBounds};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Nullable, Text};

use crate::db::models::{status, Task, TaskExecution};
use crate::db::schema::{task_executions, tasks};
use crate::error::Error;

/// How many tasks of one type are in one state.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct StatusCount {
    /// The task type (`tasks.task_class`).
    #[diesel(sql_type = Text)]
    pub task_class: String,
    /// The `status` column.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// What a person calls it: one of [`STATES`].
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = BigInt)]
    pub count: i64,
}

/// The states [`status_counts`] tells apart, in a task's order of life: `waiting`
/// splits into `scheduled` (due later, never tried), `retrying` (due later after a
/// failed or lost attempt) and `waiting` (due now); `stopped` is shown as `succeeded`,
/// the word of the other queues.
pub const STATES: [&str; 7] = ["scheduled", "retrying", "waiting", "running", "succeeded", "failed", "cancelled"];

/// Counts tasks by type and state ([`STATES`]), sorted by type then state. Reads the
/// whole table.
pub fn status_counts(conn: &mut PgConnection) -> Result<Vec<StatusCount>, Error> {
    Ok(diesel::sql_query(
        "SELECT task_class, status,
                CASE WHEN status = 'waiting' AND run_at > now() AND attempts > 0 THEN 'retrying'
                     WHEN status = 'waiting' AND run_at > now() THEN 'scheduled'
                     WHEN status = 'stopped' THEN 'succeeded'
                     ELSE status END AS state,
                count(*) AS count
         FROM tasks
         GROUP BY 1, 2, 3 ORDER BY 1, 3",
    )
    .load(conn)?)
}

/// A task that failed for good, with its last attempt's error.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct FailedTask {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub task_class: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub attempts: i32,
    /// When it failed.
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub failed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

/// The `limit` tasks that failed last, newest first, each with its last attempt's
/// error. Reads the whole table (there is no index on failed tasks).
pub fn failed_tasks(conn: &mut PgConnection, limit: i64) -> Result<Vec<FailedTask>, Error> {
    Ok(diesel::sql_query(
        "SELECT t.id, t.task_class, t.attempts, t.updated_at AS failed_at, e.error AS last_error
         FROM tasks t
         LEFT JOIN LATERAL (
             SELECT x.error FROM task_executions x WHERE x.task_id = t.id ORDER BY x.attempt DESC, x.id DESC LIMIT 1
         ) e ON true
         WHERE t.status = 'failed'
         ORDER BY t.updated_at DESC, t.id DESC
         LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)?)
}

/// Returns the `limit` most recently started executions, newest first, with their
/// task's type.
pub fn recent_executions(conn: &mut PgConnection, limit: i64) -> Result<Vec<(TaskExecution, String)>, Error> {
    Ok(task_executions::table
        .inner_join(tasks::table)
        .select((TaskExecution::as_select(), tasks::task_class))
        .order(task_executions::id.desc())
        .limit(limit)
        .load(conn)?)
}

/// Returns a task with every execution of it, oldest first, through the models'
/// one-to-many relation; `None` if there is no such task.
pub fn task_with_executions(conn: &mut PgConnection, id: i64) -> Result<Option<(Task, Vec<TaskExecution>)>, Error> {
    let Some(task) = tasks::table.find(id).select(Task::as_select()).first(conn).optional()? else {
        return Ok(None);
    };
    let executions =
        TaskExecution::belonging_to(&task).select(TaskExecution::as_select()).order(task_executions::id).load(conn)?;
    Ok(Some((task, executions)))
}

/// A task as `engine status` shows it: every column as text, as PostgreSQL prints it,
/// so that a row the models cannot read (parameters serde_json refuses, a due time at
/// `'infinity'`) can still be shown.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct TaskShown {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub task_class: String,
    #[diesel(sql_type = Text)]
    pub task_parameters: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub instance: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub priority: i32,
    #[diesel(sql_type = Text)]
    pub run_at: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub max_attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub cancel_requested_at: Option<String>,
    #[diesel(sql_type = Text)]
    pub created_at: String,
    #[diesel(sql_type = Text)]
    pub updated_at: String,
    /// `progress`, `progress_message`, `checkpoint` (as JSON text).
    #[diesel(sql_type = Nullable<diesel::sql_types::SmallInt>)]
    pub progress: Option<i16>,
    #[diesel(sql_type = Nullable<Text>)]
    pub progress_message: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub checkpoint: Option<String>,
    /// `unique_key` and `unique_scope`.
    #[diesel(sql_type = Nullable<Text>)]
    pub unique_key: Option<String>,
    #[diesel(sql_type = Text)]
    pub unique_scope: String,
}

/// Returns a task as text with every execution of it, oldest first; `None` if there is
/// no such task.
pub fn task_shown(conn: &mut PgConnection, id: i64) -> Result<Option<(TaskShown, Vec<TaskExecution>)>, Error> {
    let task: Option<TaskShown> = diesel::sql_query(
        "SELECT id, task_class, task_parameters::text AS task_parameters, status, instance, priority,
                run_at::text AS run_at, attempts, max_attempts, cancel_requested_at::text AS cancel_requested_at,
                created_at::text AS created_at, updated_at::text AS updated_at,
                progress, progress_message, checkpoint::text AS checkpoint, unique_key, unique_scope
         FROM tasks WHERE id = $1",
    )
    .bind::<BigInt, _>(id)
    .get_result(conn)
    .optional()?;
    let Some(task) = task else { return Ok(None) };
    let executions = task_executions::table
        .filter(task_executions::task_id.eq(id))
        .select(TaskExecution::as_select())
        .order(task_executions::id)
        .load(conn)?;
    Ok(Some((task, executions)))
}

/// Run-time statistics of one task type, from its finished executions.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct TypeSummary {
    #[diesel(sql_type = Text)]
    pub task_class: String,
    /// Tasks of the type.
    #[diesel(sql_type = BigInt)]
    pub tasks: i64,
    /// Finished executions.
    #[diesel(sql_type = BigInt)]
    pub executions: i64,
    /// Executions that ended with an error.
    #[diesel(sql_type = BigInt)]
    pub failures: i64,
    /// Mean run time, milliseconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub mean_ms: Option<f64>,
    /// 95th percentile of run time, milliseconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub p95_ms: Option<f64>,
}

/// Summarises every task type among the tasks whose id is `first_id` or more: tasks,
/// finished executions, failures, mean and p95 run time (from `started_at` to
/// `stopped_at`), sorted by type.
pub fn type_summaries(conn: &mut PgConnection, first_id: i64) -> Result<Vec<TypeSummary>, Error> {
    Ok(diesel::sql_query(
        "WITH runs AS (
             SELECT t.task_class, e.error,
                    extract(epoch FROM e.stopped_at - e.started_at)::float8 * 1000 AS ms
             FROM task_executions e JOIN tasks t ON t.id = e.task_id
             WHERE e.stopped_at IS NOT NULL AND t.id >= $1
         ), counts AS (
             SELECT task_class, count(*) AS tasks FROM tasks WHERE id >= $1 GROUP BY task_class
         )
         SELECT c.task_class, c.tasks,
                count(r.ms) AS executions,
                count(r.error) AS failures,
                avg(r.ms) AS mean_ms,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY r.ms) AS p95_ms
         FROM counts c LEFT JOIN runs r ON r.task_class = c.task_class
         GROUP BY c.task_class, c.tasks ORDER BY c.task_class",
    )
    .bind::<BigInt, _>(first_id)
    .load(conn)?)
}

/// Counts the tasks with an id in `ids` not yet in a final state (`waiting` or
/// `running`): `..` for every task, `first..=last` for a batch enqueued together.
pub fn unfinished_tasks(conn: &mut PgConnection, ids: impl RangeBounds<i64>) -> Result<i64, Error> {
    let mut query = tasks::table.filter(tasks::status.eq_any([status::WAITING, status::RUNNING])).into_boxed();
    query = match ids.start_bound() {
        Bound::Included(first) => query.filter(tasks::id.ge(*first)),
        Bound::Excluded(after) => query.filter(tasks::id.gt(*after)),
        Bound::Unbounded => query,
    };
    query = match ids.end_bound() {
        Bound::Included(last) => query.filter(tasks::id.le(*last)),
        Bound::Excluded(before) => query.filter(tasks::id.lt(*before)),
        Bound::Unbounded => query,
    };
    Ok(query.count().get_result(conn)?)
}

/// The time of the database server, for comparisons with stored times.
pub fn database_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, Error> {
    Ok(diesel::select(diesel::dsl::now.into_sql::<diesel::sql_types::Timestamptz>()).get_result(conn)?)
}

/// Whether the instance row `i` is taken for dead: silent past the lease it recorded
/// (a row that records none, an older engine's, is never called dead here: its lease
/// is not known). Written once for the queries that judge it.
macro_rules! instance_is_dead {
    () => {
        "(i.lease IS NOT NULL AND i.last_seen_at < now() - i.lease)"
    };
}

/// An instance as `task_engine_instances` shows it, with its running tasks.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct InstanceRow {
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub host: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub pid: i32,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub started_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub last_seen_at: DateTime<Utc>,
    /// Seconds since its last heartbeat, on the server's clock.
    #[diesel(sql_type = Double)]
    pub silent_for: f64,
    /// Silent for longer than its lease: taken for dead, its tasks rescued; its row
    /// is removed after ten leases.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub dead: bool,
    #[diesel(sql_type = BigInt)]
    pub running: i64,
    /// The queues it runs; `None` for an instance of a version that does not record
    /// them (before migration 21).
    #[diesel(sql_type = Nullable<diesel::sql_types::Array<Text>>)]
    pub queues: Option<Vec<String>>,
    /// The connections it held at its last heartbeat, as `4 (session 1, heartbeat 1,
    /// claims 1, completer 1, maintenance 0) + tasks 2/8`; `None` for an instance of
    /// a version that does not record them (before migration 22).
    #[diesel(sql_type = Nullable<Text>)]
    pub connections: Option<String>,
}

/// The instances that have registered and not yet been forgotten, by name.
pub fn instances(conn: &mut PgConnection) -> Result<Vec<InstanceRow>, Error> {
    Ok(diesel::sql_query(concat!(
        "SELECT i.name, i.host, i.pid, i.started_at, i.last_seen_at,
                extract(epoch FROM now() - i.last_seen_at)::float8 AS silent_for, ",
        instance_is_dead!(),
        " AS dead,
                (SELECT count(*) FROM tasks t WHERE t.status = 'running' AND t.instance = i.name) AS running,
                i.queues,
                (SELECT format('%s (session %s, heartbeat %s, claims %s, completer %s, maintenance %s) + tasks %s/%s',
                               s + h + c + d + m, s, h, c, d, m, t, tm)
                 FROM (SELECT (j->>'session')::int AS s, (j->>'heartbeat')::int AS h, (j->>'claims')::int AS c,
                              (j->>'completer')::int AS d, (j->>'maintenance')::int AS m, (j->>'tasks')::int AS t,
                              (j->>'tasks_max')::int AS tm
                       FROM (SELECT i.connections AS j) j
                       WHERE i.connections IS NOT NULL) n) AS connections
         FROM task_engine_instances i ORDER BY i.name"
    ))
    .load(conn)?)
}

/// A queue as `engine status` and `engine queue list` show it: what waits and runs in
/// it, and its settings.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct QueueRow {
    #[diesel(sql_type = Text)]
    pub name: String,
    /// Waiting and due now.
    #[diesel(sql_type = BigInt)]
    pub waiting: i64,
    /// Waiting and due later (scheduled, or retrying).
    #[diesel(sql_type = BigInt)]
    pub later: i64,
    #[diesel(sql_type = BigInt)]
    pub running: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub paused: bool,
    /// At most this many running at once, across instances.
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    pub concurrency: Option<i32>,
    /// At most this many of one key running at once.
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    pub key_concurrency: Option<i32>,
    /// At most this many starts per `rate_period_s` seconds.
    #[diesel(sql_type = Nullable<diesel::sql_types::Integer>)]
    pub rate_limit: Option<i32>,
    #[diesel(sql_type = Nullable<Double>)]
    pub rate_period_s: Option<f64>,
    /// How long the oldest task due now has been due, in seconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_due_s: Option<f64>,
    /// Whether a live instance runs the queue, or may: one that does not record its
    /// queues (a version before migration 21) counts as running every queue.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub served: bool,
}

/// Every queue that has tasks waiting or running, or settings, by name. Reads the
/// waiting and running tasks, and the instances' rows.
pub fn queues(conn: &mut PgConnection) -> Result<Vec<QueueRow>, Error> {
    Ok(diesel::sql_query(concat!(
        "WITH counts AS (
             SELECT queue,
                    count(*) FILTER (WHERE status = 'waiting' AND run_at <= now()) AS waiting,
                    count(*) FILTER (WHERE status = 'waiting' AND run_at > now()) AS later,
                    count(*) FILTER (WHERE status = 'running') AS running,
                    min(run_at) FILTER (WHERE status = 'waiting' AND run_at <= now()) AS oldest_due
             FROM tasks WHERE status IN ('waiting', 'running') GROUP BY queue
         )
         SELECT coalesce(c.queue, q.name) AS name, coalesce(c.waiting, 0) AS waiting,
                coalesce(c.later, 0) AS later, coalesce(c.running, 0) AS running,
                coalesce(q.paused, false) AS paused, q.concurrency, q.key_concurrency, q.rate_limit,
                extract(epoch FROM q.rate_period)::float8 AS rate_period_s,
                CASE WHEN isfinite(c.oldest_due) THEN extract(epoch FROM now() - c.oldest_due)::float8 END
                    AS oldest_due_s,
                EXISTS (SELECT FROM task_engine_instances i
                        WHERE NOT ",
        instance_is_dead!(),
        "
                          AND (i.queues IS NULL OR coalesce(c.queue, q.name) = ANY (i.queues))) AS served
         FROM counts c FULL JOIN task_engine_queues q ON q.name = c.queue
         ORDER BY 1"
    ))
    .load(conn)?)
}

/// Whether a task (in any state) or a schedule names the queue. Looks through the
/// indexes of waiting and running tasks first, then the schedules; only for a queue
/// that none of them names does it read the whole table (each `EXISTS` is evaluated
/// only if those before it found nothing).
pub fn queue_in_use(conn: &mut PgConnection, queue: &str) -> Result<bool, Error> {
    #[derive(QueryableByName)]
    struct Used {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        used: bool,
    }
    let found: Used = diesel::sql_query(
        "SELECT EXISTS (SELECT FROM tasks WHERE queue = $1 AND status = 'waiting')
             OR EXISTS (SELECT FROM tasks WHERE queue = $1 AND status = 'running')
             OR EXISTS (SELECT FROM task_engine_schedules WHERE queue = $1)
             OR EXISTS (SELECT FROM tasks WHERE queue = $1) AS used",
    )
    .bind::<Text, _>(queue)
    .get_result(conn)?;
    Ok(found.used)
}

/// Whether a task (in any state) or a schedule is of the type. Reads the whole table
/// when none is: meant for a type this program does not know, before it says so.
pub fn task_type_in_use(conn: &mut PgConnection, task_class: &str) -> Result<bool, Error> {
    #[derive(QueryableByName)]
    struct Used {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        used: bool,
    }
    let found: Used = diesel::sql_query(
        "SELECT EXISTS (SELECT FROM task_engine_schedules WHERE task_class = $1)
             OR EXISTS (SELECT FROM tasks WHERE task_class = $1) AS used",
    )
    .bind::<Text, _>(task_class)
    .get_result(conn)?;
    Ok(found.used)
}
