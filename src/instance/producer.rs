//! The producer: claims runnable tasks of its queue for the idle workers of its lane
//! (and a buffer), as many as there is room for in one statement, and puts them in the
//! lane's hand-off. Workers never ask the database for work. A queue with limits is
//! claimed under its row lock ([`claim::claim_limited`]); the producer learns that it
//! has limits from a plain claim, which then claims nothing.
//!
//! It also tells inserters whether to notify: when its claims come back short it
//! falls asleep, and the instance's session holds the [`stripes`](super::stripes)
//! (inserts notify) and has it claim once more, so that no insert goes unseen; when a
//! claim comes back full it is busy, and once no lane sleeps the stripes go (inserts
//! skip their NOTIFY). While claims find tasks less than [`STREAMING`] apart, it stays
//! awake and claims again after each short claim, until one comes back empty. It
//! claims on the instance's claims connection, which it shares with the other lanes'
//! producers, the timer and cron.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::attempt::ClaimedTask;
use crate::db::{channel, claim, completion};
use crate::error::Error;
use crate::instance::backoff;
use crate::instance::connections::Connections;
use crate::instance::handoff::{Drained, Handoff, Next};
use crate::instance::heartbeat::Alive;
use crate::instance::in_flight::InFlight;
use crate::instance::parts::{Part, Stage};
use crate::instance::server_clock::ServerClock;
use crate::instance::shutdown::Shutdown;
use crate::instance::stripes::Stripes as Asleep;
use crate::instance::timer::Timer;

/// The longest the producer waits before it looks at its connection, the fallback
/// poll and the tasks waiting too long for a worker.
const TICK: Duration = Duration::from_secs(1);

/// Claims that find tasks this close together mean tasks are streaming in.
const STREAMING: Duration = Duration::from_millis(2);

/// How often a producer that may not claim (its heartbeat is late) looks again.
const PAUSED_LOOK: Duration = Duration::from_millis(100);

/// What the producer needs.
pub(crate) struct Input {
    pub instance: String,
    /// Its thread's name.
    pub name: String,
    /// Where it gets the claims' connection.
    pub connections: Connections,
    /// Told when its lane falls asleep and when it is busy again.
    pub stripes: Arc<Asleep>,
    /// The queue it claims from.
    pub queue: String,
    /// The types it claims: those the instance can run.
    pub task_types: Vec<&'static str>,
    /// Its lane's.
    pub handoff: Arc<Handoff>,
    /// Where it records what it claimed.
    pub in_flight: Arc<InFlight>,
    /// Set from each claim's `now()`.
    pub clock: Arc<ServerClock>,
    /// Asked to look again for tasks due later when the instance falls asleep, and
    /// armed for the next window of a rate limit used up.
    pub timer: Arc<Timer>,
    /// Whether the instance's heartbeat is recent enough to claim.
    pub alive: Arc<Alive>,
    pub shutdown: Shutdown,
    /// The fallback poll of an idle instance.
    pub poll_interval: Duration,
    /// How long a claimed task may wait for a worker before it goes back.
    pub max_queue_wait: Duration,
    pub stats: Arc<Stats>,
}

/// What the producer counts.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub claims: AtomicU64,
    pub wasted_claims: AtomicU64,
    pub claimed_tasks: AtomicU64,
    pub given_back: AtomicU64,
    /// Reasons to claim it left alone, its heartbeat being late.
    pub paused_claims: AtomicU64,
    /// Whether its lane sleeps (the session holds the stripes for it).
    pub marked_idle: AtomicBool,
}

/// The producer's decisions, apart from the database.
#[derive(Debug)]
struct Pace {
    /// Whether its lane sleeps: the session holds the stripes for it.
    holding: bool,
    last_claim: Instant,
    /// When a claim last found tasks.
    last_found: Option<Instant>,
}

/// What to do with the stripes after a claim.
#[derive(Debug, PartialEq, Eq)]
enum Stripes {
    /// The instance goes idle: take them, and look once more.
    Take,
    /// The instance is busy: inserts need not notify it.
    Release,
    Keep,
}

impl Pace {
    fn new(now: Instant) -> Self {
        Self { holding: false, last_claim: now, last_found: None }
    }

    /// A claim starts at `now`.
    fn claiming(&mut self, now: Instant) {
        self.last_claim = now;
    }

    /// A claim came back at `now` with `found` tasks: whether tasks stream in.
    fn found(&mut self, found: usize, now: Instant) -> bool {
        if found == 0 {
            return false;
        }
        let streaming = self.last_found.is_some_and(|last| now.saturating_duration_since(last) < STREAMING);
        self.last_found = Some(now);
        streaming
    }

    /// Once the claim's tasks are handed over: `idle` if the hand-off has no reason
    /// left to claim, `full` if the claim got all it asked for.
    fn stripes(&self, idle: bool, full: bool, streaming: bool) -> Stripes {
        if idle && !self.holding {
            Stripes::Take
        } else if (full || streaming) && self.holding {
            Stripes::Release
        } else {
            Stripes::Keep
        }
    }

    /// Whether a tick at `now` without a claim should look for work unprompted (the
    /// fallback poll).
    fn poll(&self, now: Instant, poll_interval: Duration) -> bool {
        now.saturating_duration_since(self.last_claim) >= poll_interval
    }
}

struct Producer {
    input: Input,
    pace: Pace,
    /// Whether it is holding off claims, its heartbeat being late.
    paused: bool,
    /// Whether its queue has limits (claimed under the queue's lock), as last seen.
    limited: bool,
    /// The key of the last task it claimed: its next claim serves the keys after it first.
    last_key: String,
    /// Whether its last claim met several keys: its next claim lets them take turns.
    fair: bool,
}

/// Starts the producer: it claims until the instance stops, then gives back what no
/// worker started.
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    let name = input.name.clone();
    Part::spawn(&name, Stage::Producers, move || run(input))
}

fn run(input: Input) {
    let mut producer = Producer {
        input,
        pace: Pace::new(Instant::now()),
        paused: false,
        limited: false,
        last_key: String::new(),
        fair: false,
    };
    // Prepare the claim with a claim of nothing, connecting if need be (a failure is
    // met again, and handled, at the first claim): a real claim is then one round trip,
    // and its `now()` (the executions' start) follows its sending closely, as the time
    // its tasks spend in the hand-off assumes.
    let _ = producer.claim_nothing();
    let mut failures = 0u32;
    loop {
        let input = &producer.input;
        let stale = input.handoff.take_stale(input.max_queue_wait);
        producer.give_back(stale, "they waited too long for a worker");
        let input = &producer.input;
        let tick = TICK.min(input.poll_interval).min(input.max_queue_wait);
        match input.handoff.next(tick) {
            Next::Stop => break,
            Next::Tick => {
                if producer.pace.poll(Instant::now(), producer.input.poll_interval) {
                    producer.input.handoff.wake(1);
                }
            }
            Next::Claim(_) if !producer.may_claim() => {
                if producer.input.shutdown.sleep(PAUSED_LOOK) {
                    break;
                }
                producer.input.handoff.wake(1);
            }
            Next::Claim(demand) => match producer.claim(demand.count) {
                Ok((claim::Claim { tasks: claimed, more, .. }, sent_at)) => {
                    failures = 0;
                    producer.input.stripes.looked();
                    let found = claimed.len();
                    producer.count(&claimed);
                    let streaming = producer.pace.found(found, Instant::now());
                    let drained = if more {
                        Drained::No
                    } else if streaming {
                        Drained::IfEmpty
                    } else {
                        Drained::IfShort
                    };
                    let idle = producer.input.handoff.deliver_claimed_at(claimed, demand, sent_at, drained);
                    match producer.pace.stripes(idle, found == demand.count, streaming) {
                        Stripes::Take => producer.fall_asleep(),
                        Stripes::Release => producer.wake_up(),
                        Stripes::Keep => {}
                    }
                }
                Err(error) => {
                    failures += 1;
                    let pause = backoff::pause(failures);
                    log::error!("could not claim tasks, trying again in {pause:?}: {error}");
                    if producer.input.shutdown.sleep(pause) {
                        break;
                    }
                    producer.input.handoff.wake(1);
                }
            },
        }
    }
    let left = producer.input.handoff.finish();
    producer.give_back(left, "the instance stops");
    if producer.pace.holding {
        producer.wake_up();
    }
    log::debug!("producer stopped");
}

impl Producer {
    /// Whether the instance's heartbeat is recent enough to claim; says so in the log
    /// when that changes.
    fn may_claim(&mut self) -> bool {
        let alive = self.input.alive.may_claim(Instant::now());
        if !alive {
            self.input.stats.paused_claims.fetch_add(1, Ordering::Relaxed);
        }
        if alive == self.paused {
            self.paused = !alive;
            if alive {
                log::info!("instance {}: heartbeat renewed, claiming again", self.input.instance);
            } else {
                log::warn!(
                    "instance {}: no sound heartbeat for half a lease: claiming nothing until there is one",
                    self.input.instance
                );
            }
        }
        alive
    }

    /// A claim of nothing, which prepares the claim on the claims' connection.
    fn claim_nothing(&self) -> Result<(), Error> {
        let (connections, lane) = (&self.input.connections, self.lane());
        let session = connections.session();
        connections.claims(|conn| Ok(claim::claim(conn, session, &lane, 0).map(drop)?))
    }

    /// Its claims' description, as of now.
    fn lane(&self) -> claim::LaneClaim<'_> {
        let input = &self.input;
        claim::LaneClaim {
            instance: &input.instance,
            queue: &input.queue,
            task_types: &input.task_types,
            after_key: &self.last_key,
            fair: self.fair,
        }
    }

    fn set_holding(&mut self, holding: bool) {
        self.pace.holding = holding;
        self.input.stats.marked_idle.store(holding, Ordering::SeqCst);
    }

    /// Claims up to `count` tasks; also returns when the statement was sent (after
    /// connecting, if it had to), which the tasks' time in the hand-off and the claim's
    /// round trip count from.
    fn claim(&mut self, count: usize) -> Result<(claim::Claim, Instant), Error> {
        self.pace.claiming(Instant::now());
        let limit = i64::try_from(count).unwrap_or(i64::MAX);
        let (input, lane, limited) = (&self.input, self.lane(), self.limited);
        let session = input.connections.session();
        let (mut claim, sent_at) = input.connections.claims(|conn| {
            let sent_at = Instant::now();
            let mut claim = if limited {
                claim::claim_limited(conn, session, &lane, limit)?
            } else {
                claim::claim(conn, session, &lane, limit)?
            };
            if claim.limited && !limited {
                // Limits were set on the queue: a plain claim of it claims nothing.
                claim = claim::claim_limited(conn, session, &lane, limit)?;
            }
            Ok((claim, sent_at))
        })?;
        let input = &self.input;
        if let Some(task) = claim.tasks.first() {
            input.clock.observe(task.claimed_at, Instant::now());
        }
        self.limited = claim.limited;
        if let Some(key) = claim.last_key.take() {
            self.last_key = key;
        }
        if claim.keys > 0 {
            self.fair = claim.keys > 1;
        }
        if let Some(wait) = claim.rate_wait {
            // The timer wakes the lanes when the rate limit's next window opens.
            input.timer.arm(Instant::now() + wait);
        }
        Ok((claim, sent_at))
    }

    fn count(&self, claimed: &[ClaimedTask]) {
        let stats = &self.input.stats;
        stats.claims.fetch_add(1, Ordering::Relaxed);
        stats.claimed_tasks.fetch_add(claimed.len() as u64, Ordering::Relaxed);
        if claimed.is_empty() {
            stats.wasted_claims.fetch_add(1, Ordering::Relaxed);
        }
        self.input.in_flight.claimed(claimed.iter().map(|t| (t.id, t.execution_id)));
    }

    /// Its lane falls asleep: the session takes the stripes if no other lane holds
    /// them already (woken at once for it), then has the lanes look once more, for
    /// what was inserted without a notification before they were held.
    fn fall_asleep(&mut self) {
        self.set_holding(true);
        if self.input.stripes.asleep() {
            if let Err(error) = self.input.connections.claims(|conn| Ok(channel::wake_listeners(conn)?)) {
                // The listener takes them at its next look, a tenth of a second away.
                log::debug!("could not wake the listener ({error})");
            }
        }
    }

    /// Its lane is busy: once no lane sleeps, inserts need not notify the instance.
    fn wake_up(&mut self) {
        self.input.stripes.busy();
        self.set_holding(false);
    }

    /// Gives back tasks claimed but never started (the instance is stopping, or they
    /// waited too long for a worker). If the database is away they stay running here
    /// and are rescued as lost attempts later.
    fn give_back(&mut self, claimed: Vec<ClaimedTask>, why: &str) {
        if claimed.is_empty() {
            return;
        }
        // A release that waited too long for a locked row is tried again, twice: tasks
        // not given back are rescued later, with an attempt used.
        let (connections, instance) = (&self.input.connections, self.input.instance.as_str());
        let release = || connections.claims(|conn| Ok(completion::release(conn, instance, &claimed)?));
        let mut released = release();
        for _ in 0..2 {
            // A connection that failed is closed: the database is away.
            if !matches!(&released, Err(Error::Database(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            released = release();
        }
        match released {
            Ok(n) => {
                log::debug!("{n} claimed task(s) given back unstarted: {why}");
                self.input.stats.given_back.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(error) => {
                log::error!("could not give back {} unstarted task(s) ({error}); they will be rescued", claimed.len());
            }
        }
        self.input.in_flight.forget(claimed.iter().map(|t| (t.id, t.execution_id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn claims_that_find_tasks_less_than_2_ms_apart_mean_tasks_stream_in() {
        let start = Instant::now();
        let mut pace = Pace::new(start);
        assert!(!pace.found(1, start), "a first find is not a stream");
        assert!(pace.found(3, start + ms(1)));
        assert!(!pace.found(2, start + ms(3)), "finds 2 ms apart are not a stream");
        assert!(!pace.found(0, start + ms(4)), "an empty claim is not a stream");
        assert!(!pace.found(1, start + ms(10)), "finds 9 ms apart are not a stream");
    }

    #[test]
    fn an_idle_instance_takes_the_stripes_and_a_busy_or_streaming_one_lets_them_go() {
        let mut pace = Pace::new(Instant::now());
        assert_eq!(pace.stripes(true, false, false), Stripes::Take);
        assert_eq!(pace.stripes(false, true, false), Stripes::Keep, "not holding: nothing to let go");
        pace.holding = true;
        assert_eq!(pace.stripes(true, false, false), Stripes::Keep, "idle and already holding");
        assert_eq!(pace.stripes(false, true, false), Stripes::Release, "a full claim: busy");
        assert_eq!(pace.stripes(false, false, true), Stripes::Release, "streaming");
        assert_eq!(pace.stripes(false, false, false), Stripes::Keep);
    }

    #[test]
    fn a_quiet_tick_polls_only_after_the_poll_interval() {
        let start = Instant::now();
        let mut pace = Pace::new(start);
        assert!(!pace.poll(start + ms(500), ms(1000)));
        assert!(pace.poll(start + ms(1000), ms(1000)));
        pace.claiming(start + ms(900));
        assert!(!pace.poll(start + ms(1000), ms(1000)), "a claim resets the poll");
    }
}
