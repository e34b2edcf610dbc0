//! The project's own task types, used by the demo and the tests.
//! Each registers itself with `register_task!`: nothing else lists them. One example
//! schedule is declared with `register_schedule!`, off unless asked for.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use task_engine::{register_schedule, register_task, Schedule, Task, TaskContext, TaskError};

/// Makes sure the linker keeps this crate's registrations: call it once from the
/// binary (an `inventory` registration in a crate nothing references is dropped).
pub fn link() {}

/// Does nothing; parameters `{}`, result `null`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Noop {}

impl Task for Noop {
    const NAME: &'static str = "noop";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        Ok(())
    }
}
register_task!(Noop);

// An example of a schedule declared with the code: a `noop` every second. Declared only
// when TASKS_EXAMPLE_SCHEDULE is set (to anything) as the instance starts, so that an
// `engine run` (yours, the demo's) enqueues nothing unasked; the tests of `engine` set
// it. A schedule of one's own is declared the same way, without the condition.
register_schedule!(if std::env::var_os("TASKS_EXAMPLE_SCHEDULE").is_some() =>
    Schedule::new("tasks-example-every-second", "* * * * * *", &Noop {})?);

/// Returns its parameters, whatever JSON they are, as its result.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Echo(pub serde_json::Value);

impl Task for Echo {
    const NAME: &'static str = "echo";
    type Output = serde_json::Value;

    fn run(&self, _ctx: &TaskContext) -> Result<serde_json::Value, TaskError> {
        Ok(self.0.clone())
    }
}
register_task!(Echo);

/// Sleeps `ms` milliseconds; result `null`. Asked to stop (`engine cancel`, its time
/// limit, or its instance's stop), it cuts the sleep short with an error: the attempt
/// is cancelled, timed out, or interrupted (it waits again, using no attempt).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sleep {
    pub ms: u64,
}

impl Task for Sleep {
    const NAME: &'static str = "sleep";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        let until = std::time::Instant::now() + Duration::from_millis(self.ms);
        loop {
            let now = std::time::Instant::now();
            if now >= until {
                return Ok(());
            }
            if ctx.stop_requested() {
                return Err(TaskError::new("asked to stop while sleeping"));
            }
            std::thread::sleep((until - now).min(Duration::from_millis(10)));
        }
    }
}
register_task!(Sleep);

/// Fails with `message`; with `"permanent": true`, an error no retry can fix.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fail {
    pub message: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent: bool,
}

impl Task for Fail {
    const NAME: &'static str = "fail";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        if self.permanent {
            Err(TaskError::permanent(&self.message))
        } else {
            Err(TaskError::new(&self.message))
        }
    }
}
register_task!(Fail);

/// Panics with `message`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panic {
    pub message: String,
}

impl Task for Panic {
    const NAME: &'static str = "panic";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        panic!("{}", self.message)
    }
}
register_task!(Panic);

/// Works through `steps` steps of `ms` milliseconds each; after each, saves the number
/// of steps done as its checkpoint and says how far it got. An attempt resumes after
/// the last step saved, and stops between steps when asked to (an error: the steps done
/// are kept). Result: `{"resumed_at": n}`, the steps done before this attempt.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Steps {
    pub steps: u32,
    #[serde(default)]
    pub ms: u64,
}

impl Task for Steps {
    const NAME: &'static str = "steps";
    type Output = serde_json::Value;

    fn run(&self, ctx: &TaskContext) -> Result<serde_json::Value, TaskError> {
        let resumed_at = ctx.last_checkpoint::<u32>()?.unwrap_or(0).min(self.steps);
        for done in resumed_at..self.steps {
            if ctx.stop_requested() {
                return Err(TaskError::new(format!("stopped after {done} of {} steps", self.steps)));
            }
            std::thread::sleep(Duration::from_millis(self.ms));
            let done = done + 1;
            ctx.checkpoint(&done)?;
            let percent = u64::from(done) * 100 / u64::from(self.steps);
            ctx.progress(u8::try_from(percent).unwrap_or(100), format!("step {done} of {}", self.steps))?;
        }
        Ok(serde_json::json!({ "resumed_at": resumed_at }))
    }
}
register_task!(Steps);

/// Writes its run into `task_journal`, a table of yours (`task_id bigint, attempt int,
/// instance text, started_at timestamptz, ended_at timestamptz`): its start, then after
/// sleeping `ms` milliseconds its end. An example of a task doing its own database work
/// through its context; the load and pooler tests judge overlapping runs by this record,
/// so it must be complete: a run's end is written even when the database cannot be
/// reached for a while (a pooler restarting), trying again every 100 ms for up to two
/// minutes, on a fresh connection from the pool each time. A start that fails fails the
/// attempt (the engine retries it); if it failed with its connection, it may have been
/// written all the same, its answer lost, so its end is written before the attempt fails.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    #[serde(default)]
    pub ms: u64,
}

impl Journal {
    /// How long a run's end is tried, and the pause between tries.
    const END_TRIES_FOR: Duration = Duration::from_secs(120);
    const END_PAUSE: Duration = Duration::from_millis(100);

    /// Writes the run's end, on a fresh connection at each try, until it is written or
    /// [`Journal::END_TRIES_FOR`] has passed; returns the last error then.
    fn write_end(ctx: &TaskContext) -> Result<(), TaskError> {
        use diesel::sql_types::{BigInt, Integer};
        use diesel::RunQueryDsl;
        let deadline = std::time::Instant::now() + Self::END_TRIES_FOR;
        loop {
            let written = ctx.connection().map_err(TaskError::from).and_then(|mut conn| {
                diesel::sql_query(
                    "UPDATE task_journal SET ended_at = clock_timestamp() WHERE task_id = $1 AND attempt = $2",
                )
                .bind::<BigInt, _>(ctx.task_id())
                .bind::<Integer, _>(ctx.attempt())
                .execute(&mut conn)
                .map_err(TaskError::from)
            });
            match written {
                Ok(_) => return Ok(()),
                Err(error) if std::time::Instant::now() >= deadline => return Err(error),
                Err(_) => std::thread::sleep(Self::END_PAUSE),
            }
        }
    }
}

impl Task for Journal {
    const NAME: &'static str = "journal";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        use diesel::result::{DatabaseErrorKind, Error as DieselError};
        use diesel::sql_types::{BigInt, Integer, Text};
        use diesel::RunQueryDsl;
        let started = diesel::sql_query(
            "INSERT INTO task_journal (task_id, attempt, instance, started_at) VALUES ($1, $2, $3, clock_timestamp())",
        )
        .bind::<BigInt, _>(ctx.task_id())
        .bind::<Integer, _>(ctx.attempt())
        .bind::<Text, _>(ctx.instance())
        .execute(&mut ctx.connection()?);
        match started {
            Ok(_) => {}
            Err(
                error @ DieselError::DatabaseError(
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                    _,
                ),
            ) => {
                Self::write_end(ctx)?;
                return Err(error.into());
            }
            Err(error) => return Err(error.into()),
        }
        std::thread::sleep(Duration::from_millis(self.ms));
        Self::write_end(ctx)
    }
}
register_task!(Journal);
