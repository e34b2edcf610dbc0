//! The producer: claims runnable tasks for the idle workers of its instance, as many
//! as there is room for in one statement, and hands them over through the wake-up
//! queue. Workers never ask the database for work.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::runner::Shared;
use crate::storage::{self, ClaimedTask};
use crate::{Error, PooledConnection};

/// The longest pause between two claims when the database fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The `worker` recorded on an execution until its outcome names the worker that ran
/// it: the claim is made before any worker takes the task.
const NOT_YET_TAKEN: i32 = -1;

/// Claims until the instance stops, then gives back what no worker started.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut failures = 0u32;
    // Kept between claims: a checkout costs a round trip (the pool tests it). After
    // an error it goes back to the pool, whose test weeds it out if it is dead.
    let mut conn: Option<PooledConnection> = None;
    while let Some(demand) = shared.wakeup.demand(shared.poll_interval) {
        match claim(&shared, &mut conn, demand.count) {
            Ok(tasks) => {
                failures = 0;
                let counters = &shared.counters;
                counters.claims.fetch_add(1, Ordering::Relaxed);
                if tasks.is_empty() {
                    counters.empty_claims.fetch_add(1, Ordering::Relaxed);
                }
                for task in &tasks {
                    shared.cancels.started(task.id);
                }
                shared.wakeup.deliver(tasks, demand);
            }
            Err(error) => {
                conn = None;
                failures += 1;
                let pause = (Duration::from_millis(100) * 2u32.pow((failures - 1).min(16))).min(MAX_BACKOFF);
                log::error!("could not claim tasks, trying again in {pause:?}: {error}");
                if shared.stop.wait(pause) {
                    break;
                }
            }
        }
    }
    release(&shared, shared.wakeup.finish());
    log::debug!("producer stopped");
}

fn claim(shared: &Shared, conn: &mut Option<PooledConnection>, count: usize) -> Result<Vec<ClaimedTask>, Error> {
    let conn = match conn {
        Some(conn) => conn,
        None => conn.insert(shared.pool.get()?),
    };
    let limit = i64::try_from(count).unwrap_or(i64::MAX);
    Ok(storage::claim(conn, &shared.instance, NOT_YET_TAKEN, &shared.task_classes, limit)?)
}

/// Gives back tasks claimed but never started (the instance is stopping). If the
/// database is away they stay running and are rescued as lost attempts later.
fn release(shared: &Shared, tasks: Vec<ClaimedTask>) {
    if tasks.is_empty() {
        return;
    }
    let released = shared.pool.get().map_err(Error::from).and_then(|mut conn| Ok(storage::release(&mut conn, &tasks)?));
    match released {
        Ok(n) => log::debug!("{n} claimed task(s) given back unstarted"),
        Err(error) => {
            log::error!("could not give back {} unstarted task(s) ({error}); they will be rescued", tasks.len())
        }
    }
    for task in &tasks {
        shared.cancels.forget(task.id);
    }
}
