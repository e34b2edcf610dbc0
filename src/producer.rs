//! The producer: claims runnable tasks for the idle workers of its instance, as many
//! as there is room for in one statement, and hands them over through the wake-up
//! queue. Workers never ask the database for work.
//!
//! It also tells inserters whether a notification is needed (fifth migration): while
//! the instance is idle, the producer's connection holds a shared advisory lock on
//! each of the 16 stripes the insert trigger tries; while it is busy, it holds none,
//! and inserts that no idle instance would hear skip their NOTIFY. Going idle is
//! race-free: the producer takes the stripes only when no inserter holds one (an
//! inserter that skipped its NOTIFY holds its stripe until it commits), then claims
//! once more before it sleeps. The locks live as long as the producer's own
//! connection (not from the pool): a lost connection drops them, and the producer
//! checks its connection every second while it sleeps.
//!
//! An instance fed a stream of single inserts is idle between them, so each insert
//! would notify it. When claims find tasks less than [`STREAMING`] apart, the producer
//! lets go of the stripes and claims again after every short claim, until one comes
//! back empty: then it takes the stripes and looks once more, as above. Inserts in
//! the stream skip their NOTIFY; an isolated task still costs one notification and
//! one claim.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer};

use crate::cluster::redact_url;
use crate::runner::Shared;
use crate::storage::{self, ClaimedTask};
use crate::wakeup::Next;
use crate::Error;

/// The longest pause between two claims when the database fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a sleeping producer checks its connection (and the fallback poll).
const TICK: Duration = Duration::from_secs(1);
/// The stripes of the insert trigger's lock.
const STRIPES: i32 = 16;

/// Claims that find tasks this close together mean tasks are streaming in: the
/// instance stays awake (inserts need not notify it) and claims again after each
/// short claim, until one comes back empty.
const STREAMING: Duration = Duration::from_millis(2);

/// The `worker` recorded on an execution until its outcome names the worker that ran
/// it: the claim is made before any worker takes the task.
const NOT_YET_TAKEN: i32 = -1;

struct Producer {
    shared: Arc<Shared>,
    conn: Option<PgConnection>,
    /// Whether this connection holds the stripes (the instance is idle).
    holding: bool,
}

/// Claims until the instance stops, then gives back what no worker started.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut producer = Producer { shared: Arc::clone(&shared), conn: None, holding: false };
    // Connect before the first claim is due (a failure is met again, and handled, there).
    let _ = producer.conn();
    let mut failures = 0u32;
    let mut last_claim = Instant::now();
    // When a claim last found tasks.
    let mut last_found: Option<Instant> = None;
    loop {
        // Claimed tasks that wait too long for a worker go back, for other instances.
        let stale = shared.wakeup.take_stale(shared.max_queue_wait);
        producer.give_back(stale, "they waited too long for a worker");
        let tick = TICK.min(shared.poll_interval).min(shared.max_queue_wait);
        match shared.wakeup.next(tick) {
            Next::Stop => break,
            Next::Tick => {
                if producer.holding && producer.ping().is_err() {
                    // The stripes went with the connection: look again, anew.
                    producer.lost();
                    shared.wakeup.wake(1);
                } else if last_claim.elapsed() >= shared.poll_interval {
                    shared.wakeup.wake(1); // the fallback poll
                }
            }
            Next::Claim(demand) => {
                last_claim = Instant::now();
                match producer.claim(demand.count) {
                    Ok((tasks, claimed_at)) => {
                        failures = 0;
                        let counters = &shared.counters;
                        counters.claims.fetch_add(1, Ordering::Relaxed);
                        counters.claimed_tasks.fetch_add(tasks.len() as u64, Ordering::Relaxed);
                        if tasks.is_empty() {
                            counters.empty_claims.fetch_add(1, Ordering::Relaxed);
                        }
                        for task in &tasks {
                            shared.cancels.started(task.id);
                        }
                        let full = tasks.len() == demand.count;
                        let streaming = !tasks.is_empty() && last_found.is_some_and(|t| t.elapsed() < STREAMING);
                        if !tasks.is_empty() {
                            last_found = Some(Instant::now());
                        }
                        let idle = shared.wakeup.deliver_claimed_at(tasks, demand, claimed_at, streaming);
                        if idle && !producer.holding {
                            producer.fall_asleep();
                        } else if (full || streaming) && producer.holding {
                            producer.wake_up();
                        }
                    }
                    Err(error) => {
                        producer.lost();
                        failures += 1;
                        let pause = (Duration::from_millis(100) * 2u32.pow((failures - 1).min(16))).min(MAX_BACKOFF);
                        log::error!("could not claim tasks, trying again in {pause:?}: {error}");
                        if shared.stop.wait(pause) {
                            break;
                        }
                        shared.wakeup.wake(1);
                    }
                }
            }
        }
    }
    let left = shared.wakeup.finish();
    producer.give_back(left, "the instance stops");
    producer.lost();
    log::debug!("producer stopped");
}

impl Producer {
    fn conn(&mut self) -> Result<&mut PgConnection, Error> {
        if self.conn.is_none() {
            let url = &self.shared.database_url;
            let mut conn = PgConnection::establish(url)
                .map_err(|e| Error::Config(format!("could not connect to {}: {e}", redact_url(url))))?;
            // Prepare the claim with a claim of nothing: a real claim is then one round
            // trip, and its `now()` (the executions' start) follows its sending closely,
            // as the time its tasks spend in the queue assumes.
            let shared = &self.shared;
            storage::claim(&mut conn, &shared.instance, NOT_YET_TAKEN, &shared.task_classes, 0)?;
            self.conn = Some(conn);
            self.set_holding(false);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Forgets a connection that failed (closing it drops its locks).
    fn lost(&mut self) {
        self.conn = None;
        self.set_holding(false);
    }

    fn set_holding(&mut self, holding: bool) {
        self.holding = holding;
        self.shared.counters.marked_idle.store(holding, Ordering::SeqCst);
    }

    fn ping(&mut self) -> Result<(), Error> {
        diesel::sql_query("SELECT 1").execute(self.conn()?)?;
        Ok(())
    }

    /// Claims up to `count` tasks; also returns when the statement was sent (after
    /// connecting, if the connection had to be made), which the tasks' time in the
    /// queue and the claim's round trip count from.
    fn claim(&mut self, count: usize) -> Result<(Vec<ClaimedTask>, Instant), Error> {
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let shared = Arc::clone(&self.shared);
        let conn = self.conn()?;
        let sent_at = Instant::now();
        Ok((storage::claim(conn, &shared.instance, NOT_YET_TAKEN, &shared.task_classes, limit)?, sent_at))
    }

    /// The instance goes idle: take the stripes, then look once more (what was
    /// inserted without a notification before we held them), and arm the scheduler
    /// for what was scheduled meanwhile. If an inserter holds a stripe, it is about to
    /// commit: look again shortly and try again.
    fn fall_asleep(&mut self) {
        #[derive(QueryableByName)]
        struct Taken {
            #[diesel(sql_type = Bool)]
            taken: bool,
        }
        let taken = self.conn().and_then(|conn| {
            let taken: Taken = diesel::sql_query(
                "SELECT bool_and(pg_try_advisory_lock_shared(
                     hashtext(left(n.nspname, 50) || '.task_engine'), s)) AS taken
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                      generate_series(0, $1 - 1) s
                 WHERE c.oid = 'tasks'::regclass",
            )
            .bind::<Integer, _>(STRIPES)
            .get_result(conn)?;
            if !taken.taken {
                diesel::sql_query("SELECT pg_advisory_unlock_all()").execute(conn)?;
            }
            Ok(taken.taken)
        });
        match taken {
            Ok(true) => {
                self.set_holding(true);
                self.shared.timer.refresh();
            }
            Ok(false) => std::thread::sleep(Duration::from_millis(1)),
            Err(error) => {
                log::warn!("could not mark the instance idle ({error}); looking again");
                self.lost();
            }
        }
        self.shared.wakeup.wake(1);
    }

    /// The instance is busy: inserts need not notify it.
    fn wake_up(&mut self) {
        let released =
            self.conn().and_then(|conn| Ok(diesel::sql_query("SELECT pg_advisory_unlock_all()").execute(conn)?));
        match released {
            Ok(_) => self.set_holding(false),
            Err(_) => self.lost(),
        }
    }

    /// Gives back tasks claimed but never started (the instance is stopping, or they
    /// waited too long for a worker). If the database is away they stay running
    /// here and are rescued as lost attempts later.
    fn give_back(&mut self, tasks: Vec<ClaimedTask>, why: &str) {
        if tasks.is_empty() {
            return;
        }
        let released = self.conn().and_then(|conn| Ok(storage::release(conn, &tasks)?));
        match released {
            Ok(n) => {
                log::debug!("{n} claimed task(s) given back unstarted: {why}");
                self.shared.counters.given_back.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(error) => {
                log::error!("could not give back {} unstarted task(s) ({error}); they will be rescued", tasks.len());
                self.lost();
            }
        }
        for task in &tasks {
            self.shared.cancels.forget(task.id);
        }
    }
}
