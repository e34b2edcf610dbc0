//! The heartbeat: proves the instance alive, with a connection of its own that no slow
//! work shares. At start, once the instance's name is its own (the listener's session
//! holds the name lock: a second live instance cannot use the name, and one restarted
//! under it knows the previous holder is gone), it registers the instance's row and
//! rescues what a previous run of that name left running. Without a listener there is
//! no name lock: the row's lease stands in for it, and the instance registers only
//! once a row of its name has gone silent for its lease. Then, six times per lease, it
//! renews `last_seen_at` (recording the connections the instance holds) and runs a
//! [`rescue`] pass. It outlives the instance's stop: it retires only once the last
//! attempt has ended and been recorded, then removes the row.
//!
//! It judges other instances only once its own heartbeat has succeeded for a whole
//! lease without a break: after a database restart every instance gets a full lease to
//! renew its row before anyone takes it for dead. A live instance's tasks are never
//! taken, however long they run: the heartbeat does not depend on the workers. Its
//! waits are bounded, and the instance claims only while its last heartbeat is less
//! than half a lease old ([`Alive`]): an instance others may soon take for dead takes
//! no new work. A row found gone is registered again.
//!
//! The same statement that renews the row finds the cancels requested for tasks
//! running here, and the settings of the instance's queues: a cancel, a resumed queue
//! or a raised limit whose notification was lost (the listener reconnecting, or none)
//! reaches the instance within one heartbeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::PgConnection;

use crate::db::connect::ping;
use crate::db::instances;
use crate::error::Error;
use crate::instance::connections::{Connections, Counted};
use crate::instance::in_flight::InFlight;
use crate::instance::lanes::Lanes;
use crate::instance::parts::{Part, Stage};
use crate::instance::shutdown::Shutdown;
use crate::instance::timer::Timer;
use crate::instance::{lock, rescue};

/// Heartbeats per lease.
const BEATS_PER_LEASE: u32 = 6;

/// What the heartbeat needs.
pub(crate) struct Input {
    pub instance: String,
    /// Recorded in the instance's row.
    pub host: String,
    pub task_types: Vec<&'static str>,
    /// The queues it runs, recorded in the instance's row.
    pub queues: Vec<String>,
    /// Where it gets its own connection.
    pub connections: Connections,
    /// How long an instance may stay silent before it is taken for dead.
    pub lease: Duration,
    /// Asked to look for the rescued tasks' due time.
    pub timer: Arc<Timer>,
    /// Renewed by each sound heartbeat; read by the producer.
    pub alive: Arc<Alive>,
    /// What this instance runs: not ghosts; told of cancels found.
    pub in_flight: Arc<InFlight>,
    /// Woken when a queue's settings changed (resumed, a limit changed).
    pub lanes: Arc<Lanes>,
    /// Set once the instance's last attempt is recorded (not at its stop: until then
    /// its attempts still run, and another instance must not take them).
    pub retired: Shutdown,
    pub stats: Arc<Stats>,
}

/// What the heartbeat counts.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub heartbeats: AtomicU64,
    pub rescue_passes: AtomicU64,
    pub rescued: AtomicU64,
    /// Cancels found by a heartbeat before any notification set their task's flag.
    pub cancels_found: AtomicU64,
    /// Times a heartbeat found the settings of the instance's queues changed, and woke
    /// the lanes.
    pub queue_changes: AtomicU64,
}

/// Until when the instance may claim: half a lease after the sending of its last sound
/// heartbeat. Others take it for dead a whole lease after that heartbeat reached the
/// database (later still), so an instance whose heartbeat is stuck or failing stops
/// claiming well before its tasks can be taken.
#[derive(Debug, Default)]
pub(crate) struct Alive {
    until: Mutex<Option<Instant>>,
}

impl Alive {
    /// A heartbeat sent at `sent` has succeeded.
    fn renewed(&self, sent: Instant, lease: Duration) {
        let mut until = lock(&self.until);
        let new = sent + lease / 2;
        if until.map_or(true, |old| old < new) {
            *until = Some(new);
        }
    }

    /// Whether the instance may claim at `now`.
    pub(crate) fn may_claim(&self, now: Instant) -> bool {
        lock(&self.until).is_some_and(|until| now < until)
    }
}

/// Whether the instance's own heartbeat is sound, and so whether it may judge others.
#[derive(Debug)]
struct Health {
    lease: Duration,
    /// Since when the heartbeat has succeeded without a break.
    since: Option<Instant>,
}

impl Health {
    /// A heartbeat succeeded at `now` (a first one, or one after a failure, starts the
    /// count).
    fn beat(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// A heartbeat failed; returns true if it had been sound until then.
    fn failed(&mut self) -> bool {
        self.since.take().is_some()
    }

    /// Whether the instance may take others for dead: its own heartbeat has been sound
    /// for a whole lease.
    fn may_judge_others(&self, now: Instant) -> bool {
        self.since.is_some_and(|since| now.saturating_duration_since(since) >= self.lease)
    }
}

/// Starts the heartbeat: connects, registers the instance (or fails here: its name is
/// in use), and recovers the tasks a previous instance of that name left running,
/// before anything claims; then beats until the instance retires (`input.retired`, which its
/// [`Part`] sets at the last stage), and removes its row.
pub(crate) fn spawn(input: Input) -> Result<Part, Error> {
    let retired = input.retired.clone();
    let heartbeat = Heartbeat::start(input)?;
    Ok(Part::spawn("heartbeat", Stage::Heartbeat, move || heartbeat.run())?.stopped_by(move || {
        retired.stop();
    }))
}

/// A heartbeat of a registered instance.
struct Heartbeat {
    input: Input,
    conn: Option<Counted>,
    /// The bounds of its statements' waits, as settings.
    bounds: [String; 2],
    health: Health,
    /// The queues' settings as the last heartbeat read them (`None`: not read yet).
    queues: Option<Option<String>>,
}

impl Heartbeat {
    /// Connects, registers the instance, and recovers the tasks a previous instance of
    /// that name left running.
    fn start(input: Input) -> Result<Self, Error> {
        let interval = input.lease / BEATS_PER_LEASE;
        let bounds = [
            format!("lock_timeout = {}", interval.as_millis().max(1)),
            format!("statement_timeout = {}", (input.lease / 3).as_millis().max(1)),
        ];
        let session = input.connections.session();
        let mut conn = open(&input, &bounds)?;
        let bounds_ref = [bounds[0].as_str(), bounds[1].as_str()];
        register_when_free(&input, &mut conn, &bounds_ref)?;
        let sent = Instant::now();
        let recovered =
            session.with(&mut conn, &bounds_ref, |c| rescue::previous_self(c, &input.instance, input.lease))?;
        if recovered > 0 {
            log::warn!(
                "instance {}: {recovered} task(s) left running by its previous run put back to waiting",
                input.instance
            );
            input.timer.refresh();
        }
        // The queues' settings before any producer claims: a change after this one is
        // seen at a heartbeat.
        let open = connections_text(&input);
        let queues = session
            .with(&mut conn, &bounds_ref, |c| instances::beat(c, &input.instance, &input.queues, &open))?
            .map(|beat| beat.queues);
        let mut health = Health { lease: input.lease, since: None };
        health.beat(Instant::now());
        input.alive.renewed(sent, input.lease);
        Ok(Self { input, conn: Some(conn), bounds, health, queues })
    }

    /// Runs until the instance retires, then removes its row and lets go of its name.
    fn run(mut self) {
        let interval = self.input.lease / BEATS_PER_LEASE;
        while !self.input.retired.sleep(interval) {
            if let Err(error) = self.beat() {
                if self.health.failed() {
                    log::error!("instance {}: heartbeat failed: {error}", self.input.instance);
                }
                // A statement that failed (a lock wait, a timeout) on a connection that
                // still answers keeps the connection.
                if !self.conn.as_mut().is_some_and(|conn| ping(conn).is_ok()) {
                    self.conn = None;
                }
            }
        }
        self.deregister();
        log::debug!("heartbeat stopped");
    }

    /// Removes the instance's row, on its connection (or, if that is gone, a new one).
    fn deregister(&mut self) {
        let instance = &self.input.instance;
        let removed = match self.conn.as_mut() {
            Some(conn) => instances::deregister(conn, instance).map_err(Error::from),
            None => Err(Error::Config("no heartbeat connection".into())),
        }
        .or_else(|_| Ok::<_, Error>(instances::deregister(&mut *self.input.connections.heartbeat()?, instance)?));
        if let Err(error) = removed {
            log::warn!("instance {instance}: could not remove its row: {error}");
        }
        self.conn = None;
    }

    fn beat(&mut self) -> Result<(), Error> {
        let input = &self.input;
        let sent = Instant::now();
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let conn = open(input, &self.bounds)?;
                log::info!("instance {}: heartbeat connection back", input.instance);
                self.conn.insert(conn)
            }
        };
        let session = input.connections.session();
        let bounds = [self.bounds[0].as_str(), self.bounds[1].as_str()];
        let open = connections_text(input);
        match session.with(conn, &bounds, |c| instances::beat(c, &input.instance, &input.queues, &open))? {
            Some(beat) => {
                for task_id in beat.cancels {
                    if input.in_flight.cancel_if_running(task_id) {
                        input.stats.cancels_found.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if settings_changed(&mut self.queues, beat.queues) {
                    input.stats.queue_changes.fetch_add(1, Ordering::Relaxed);
                    input.lanes.wake_all();
                }
            }
            None => {
                session.with(conn, &bounds, |c| instances::register(c, &registration(input)))?;
                log::warn!(
                    "instance {}: its row was gone (deleted by hand, or the instance was paused for ten leases): \
                     registered again",
                    input.instance
                );
            }
        }
        self.health.beat(Instant::now());
        input.alive.renewed(sent, input.lease);
        input.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        if sent.elapsed() > input.lease / BEATS_PER_LEASE {
            // A slow heartbeat: renew first, rescue at the next one.
            return Ok(());
        }
        let judge_others = self.health.may_judge_others(Instant::now());
        let rescued =
            rescue::pass(conn, (session, &bounds), &input.instance, input.lease, &input.in_flight, judge_others)?;
        if judge_others {
            input.stats.rescue_passes.fetch_add(1, Ordering::Relaxed);
        }
        if rescued > 0 {
            input.stats.rescued.fetch_add(rescued as u64, Ordering::Relaxed);
            log::warn!("instance {}: {rescued} lost attempt(s) recorded; their tasks wait again", input.instance);
            input.timer.refresh();
        }
        Ok(())
    }
}

/// Opens the heartbeat's connection: a vanished peer noticed within half a minute, lock
/// waits bounded by a heartbeat's interval and statements by a third of the lease
/// (`bounds`, on its session if it is its own).
fn open(input: &Input, bounds: &[String; 2]) -> Result<Counted, Error> {
    let mut conn = input.connections.heartbeat()?;
    input.connections.session().prepare(&mut conn, &[bounds[0].as_str(), bounds[1].as_str()])?;
    Ok(conn)
}

/// Registers the instance once the previous one of its name is gone
/// ([`instances::register_if_free`]): at once, unless a row of its name is still
/// renewed by an instance that no name lock tells about (one without a listener):
/// then once that row has gone silent for its lease (its instance is dead by the rule
/// every instance follows). Fails if the row is still renewed a lease later.
fn register_when_free(input: &Input, conn: &mut PgConnection, bounds: &[&str]) -> Result<(), Error> {
    let deadline = Instant::now() + input.lease + input.lease / BEATS_PER_LEASE;
    let (session, listening) = (input.connections.session(), input.connections.listens());
    let mut told = false;
    let register = |c: &mut PgConnection| {
        instances::register_if_free(c, &registration(input), listening, &connections_text(input))
    };
    while !session.with(conn, bounds, register)? {
        if Instant::now() >= deadline {
            return Err(Error::Config(format!(
                "instance name `{}` is in use by a running instance (its row is renewed): give this one another name",
                input.instance
            )));
        }
        if !told {
            told = true;
            log::warn!(
                "instance {}: a row of this name is renewed by an instance no lock tells about (one without a \
                 listener): waiting up to {:?} for it to go silent",
                input.instance,
                input.lease
            );
        }
        std::thread::sleep((input.lease / BEATS_PER_LEASE).min(Duration::from_secs(1)));
    }
    Ok(())
}

/// The connections the instance holds now, as its row records them.
fn connections_text(input: &Input) -> String {
    serde_json::to_string(&input.connections.open_now()).unwrap_or_default()
}

/// Records the queues' settings `now` read, and tells whether they changed since they
/// were last read (not at a first reading).
fn settings_changed(last: &mut Option<Option<String>>, now: Option<String>) -> bool {
    last.replace(now.clone()).is_some_and(|last| last != now)
}

fn registration(input: &Input) -> instances::Registration<'_> {
    instances::Registration {
        instance: &input.instance,
        host: &input.host,
        pid: std::process::id(),
        task_types: &input.task_types,
        queues: &input.queues,
        lease: input.lease,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_claims_only_until_half_a_lease_after_its_last_sound_heartbeat() {
        let lease = Duration::from_secs(30);
        let start = Instant::now();
        let alive = Alive::default();
        assert!(!alive.may_claim(start), "no heartbeat yet");
        alive.renewed(start, lease);
        assert!(alive.may_claim(start + Duration::from_secs(14)));
        assert!(!alive.may_claim(start + Duration::from_secs(15)));
        // A late answer to an older heartbeat does not shorten the time.
        alive.renewed(start + Duration::from_secs(10), lease);
        alive.renewed(start + Duration::from_secs(5), lease);
        assert!(alive.may_claim(start + Duration::from_secs(24)));
        assert!(!alive.may_claim(start + Duration::from_secs(25)));
    }

    #[test]
    fn a_change_of_the_queues_settings_is_news_from_the_second_reading_on() {
        let mut last = None;
        assert!(!settings_changed(&mut last, None), "the first reading");
        assert!(!settings_changed(&mut last, None));
        assert!(settings_changed(&mut last, Some("q/t////".into())), "a queue paused");
        assert!(!settings_changed(&mut last, Some("q/t////".into())));
        assert!(settings_changed(&mut last, Some("q/f////".into())), "resumed");
        assert!(settings_changed(&mut last, None), "its row deleted");
    }

    #[test]
    fn an_instance_judges_others_only_after_a_whole_lease_of_sound_heartbeats() {
        let lease = Duration::from_secs(30);
        let start = Instant::now();
        let mut health = Health { lease, since: None };
        assert!(!health.may_judge_others(start), "never beat");
        health.beat(start);
        health.beat(start + Duration::from_secs(20));
        assert!(!health.may_judge_others(start + Duration::from_secs(29)));
        assert!(health.may_judge_others(start + lease));
        // A failure (the database restarted, say) starts the count again.
        assert!(health.failed());
        assert!(!health.failed(), "a second failure in a row is not news");
        health.beat(start + Duration::from_secs(40));
        assert!(!health.may_judge_others(start + Duration::from_secs(60)));
        assert!(health.may_judge_others(start + Duration::from_secs(70)));
    }
}
