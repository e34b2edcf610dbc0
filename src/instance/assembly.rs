//! Puts an instance together from the runner's [`Settings`]: builds the state its parts
//! share and each part's input, starts the parts in the order of the table in
//! [`parts`](super::parts), and takes the instance apart again in that table's stages.

use std::sync::Arc;
use std::time::Duration;

use crate::context::InstanceHandle;
use crate::declared::Declarations;
use crate::error::Error;
use crate::instance::connections::Connections;
use crate::instance::crew::{Crew, Hire, Recipe};
use crate::instance::handoff::Handoff;
use crate::instance::heartbeat::{self, Alive};
use crate::instance::in_flight::InFlight;
use crate::instance::lanes::{Lane, Lanes};
use crate::instance::parts::{Parts, Stage};
use crate::instance::server_clock::ServerClock;
use crate::instance::shutdown::Shutdown;
use crate::instance::stripes::Stripes;
use crate::instance::timer::{self, Timer};
use crate::instance::watchdog::{self, Watchdog};
use crate::instance::{completer, cron, listener, producer, vacuum};
use crate::registry::Registry;

/// What the runner decided, checked.
pub(crate) struct Settings {
    pub instance: String,
    pub host: String,
    pub registry: Registry,
    pub connections: Connections,
    /// The queues to run, with their workers.
    pub queues: Vec<(String, usize)>,
    /// The most tasks claimed ahead, for all the queues.
    pub buffer: usize,
    pub max_claim: usize,
    pub poll_interval: Duration,
    pub max_queue_wait: Duration,
    pub lease: Duration,
    pub flush_delay: Duration,
    pub max_completion_batch: usize,
    pub timeout_grace: Duration,
    /// The schedules it declares, applied at the start: the cron part renews them.
    pub declarations: Declarations,
}

/// The counters of the instance's parts.
#[derive(Default)]
pub(crate) struct Counters {
    pub producer: Arc<producer::Stats>,
    pub completer: Arc<completer::Stats>,
    pub listener: Arc<listener::Stats>,
    pub heartbeat: Arc<heartbeat::Stats>,
    pub vacuum: Arc<vacuum::Stats>,
    /// Whether the instance is marked idle.
    pub stripes: Arc<Stripes>,
}

/// A running instance: what its parts share, and the parts.
pub(crate) struct Instance {
    pub name: String,
    pub shutdown: Shutdown,
    pub alive: Arc<Alive>,
    pub lanes: Arc<Lanes>,
    /// The tasks claimed here and not yet recorded.
    pub in_flight: Arc<InFlight>,
    /// The server's clock, as the claims read it: the producers set it, the workers
    /// date their attempts by it.
    pub clock: Arc<ServerClock>,
    pub counters: Counters,
    /// The workers, waited for at the stop (all but the abandoned).
    pub crew: Arc<Crew>,
    /// Ends the heartbeat (its part's stop), once every attempt is recorded.
    retired: Shutdown,
    parts: Parts,
}

/// Starts an instance's parts, in the order of the table in [`parts`](super::parts).
/// On a failure, what started is stopped again before the error returns.
pub(crate) fn start(settings: Settings) -> Result<Instance, Error> {
    let workers: usize = settings.queues.iter().map(|(_, w)| *w).sum();
    let shutdown = Shutdown::default();
    // Each lane gets its share of the buffer.
    let lanes = Arc::new(Lanes::new(
        settings
            .queues
            .iter()
            .map(|(queue, lane_workers)| Lane {
                queue: queue.clone(),
                handoff: Arc::new(
                    Handoff::new(*lane_workers, settings.buffer.saturating_mul(*lane_workers) / workers.max(1))
                        .with_max_claim(settings.max_claim),
                ),
            })
            .collect(),
    ));
    let timer = Arc::new(Timer::default());
    shutdown.on_stop({
        let lanes = Arc::clone(&lanes);
        move || lanes.stop()
    });
    shutdown.on_stop({
        let timer = Arc::clone(&timer);
        move || timer.stop()
    });
    // The timer's first look: tasks already due later.
    timer.refresh();
    let mut instance = Instance {
        name: settings.instance.clone(),
        shutdown,
        alive: Arc::new(Alive::default()),
        lanes,
        in_flight: Arc::new(InFlight::default()),
        clock: Arc::new(ServerClock::new()),
        counters: Counters::default(),
        crew: Arc::new(Crew::default()),
        retired: Shutdown::default(),
        parts: Parts::default(),
    };
    match instance.start_parts(settings, &timer) {
        Ok(()) => Ok(instance),
        Err(error) => {
            log::info!("instance {} stopping: it could not start ({error})", instance.name);
            instance.shutdown.stop();
            instance.join();
            log::info!("instance {} stopped", instance.name);
            Err(error)
        }
    }
}

impl Instance {
    /// Starts the parts one by one, in the table's order.
    fn start_parts(&mut self, settings: Settings, timer: &Arc<Timer>) -> Result<(), Error> {
        let Settings { instance, host, registry, connections, .. } = &settings;
        let task_types = registry.names();
        let workers = self.lanes.capacity();
        let (shutdown, counters) = (&self.shutdown, &self.counters);
        let stripes = Arc::clone(&counters.stripes);
        stripes.set_session(connections.listens());
        log::info!("instance {instance}: connections: {}", connections.budget());
        // The session first: it takes the instance's name (or the start fails here).
        if let Some(listener) = listener::spawn(listener::Input {
            instance: instance.clone(),
            connections: connections.clone(),
            lanes: Arc::clone(&self.lanes),
            timer: Arc::clone(timer),
            in_flight: Arc::clone(&self.in_flight),
            stripes: Arc::clone(&stripes),
            poll_interval: settings.poll_interval,
            retired: self.retired.clone(),
            stats: Arc::clone(&counters.listener),
        })? {
            self.parts.add(listener);
        }
        self.parts.add(heartbeat::spawn(heartbeat::Input {
            instance: instance.clone(),
            host: host.clone(),
            task_types: task_types.clone(),
            queues: self.lanes.queues().into_iter().map(str::to_owned).collect(),
            connections: connections.clone(),
            lease: settings.lease,
            timer: Arc::clone(timer),
            alive: Arc::clone(&self.alive),
            in_flight: Arc::clone(&self.in_flight),
            lanes: Arc::clone(&self.lanes),
            retired: self.retired.clone(),
            stats: Arc::clone(&counters.heartbeat),
        })?);
        let queues: Vec<String> = self.lanes.iter().map(|l| format!("{}={}", l.queue, l.handoff.capacity())).collect();
        log::info!(
            "instance {instance} starting {workers} workers (queues {}); task types: {}",
            queues.join(", "),
            task_types.join(", ")
        );
        self.parts.add(timer::spawn(timer::Input {
            connections: connections.clone(),
            task_types: task_types.clone(),
            timer: Arc::clone(timer),
            lanes: Arc::clone(&self.lanes),
            poll_interval: settings.poll_interval,
        })?);
        self.parts.add(vacuum::spawn(vacuum::Input {
            connections: connections.clone(),
            claims: Arc::clone(&counters.producer),
            shutdown: shutdown.clone(),
            stats: Arc::clone(&counters.vacuum),
        })?);
        self.parts.add(cron::spawn(cron::Input {
            connections: connections.clone(),
            shutdown: shutdown.clone(),
            declarations: settings.declarations.clone(),
        })?);
        // The completer ends once every worker's outbox is gone.
        let (inbox, outboxes) = completer::inbox(settings.flush_delay, settings.max_completion_batch, workers);
        self.parts.add(completer::spawn(completer::Input {
            connections: connections.clone(),
            inbox,
            in_flight: Arc::clone(&self.in_flight),
            timer: Arc::clone(timer),
            stats: Arc::clone(&counters.completer),
        })?);
        let watchdog = Arc::new(Watchdog::default());
        self.parts.add(watchdog::spawn(Arc::clone(&watchdog))?);
        let context = Arc::new(InstanceHandle {
            name: instance.clone(),
            stopping: shutdown.flag(),
            pool: connections.tasks().clone(),
        });
        let mut outboxes = outboxes.into_iter().enumerate();
        let mut hires = Vec::new();
        for lane in self.lanes.iter() {
            let recipe = Arc::new(Recipe {
                handoff: Arc::clone(&lane.handoff),
                registry: registry.clone(),
                instance: Arc::clone(&context),
                in_flight: Arc::clone(&self.in_flight),
                clock: Arc::clone(&self.clock),
                watchdog: Arc::clone(&watchdog),
                connections: connections.clone(),
                grace: settings.timeout_grace,
            });
            for (index, outbox) in outboxes.by_ref().take(lane.handoff.capacity()) {
                hires.push(Hire { recipe: Arc::clone(&recipe), index, outbox });
            }
        }
        // On a failure, the outboxes of the workers not started go with `hires`, so
        // that the completer can end.
        self.crew.hire_all(hires)?;
        let named = self.lanes.iter().count() > 1;
        for lane in self.lanes.iter() {
            self.parts.add(producer::spawn(producer::Input {
                instance: instance.clone(),
                name: if named { format!("producer-{}", lane.queue) } else { "producer".to_owned() },
                connections: connections.clone(),
                stripes: Arc::clone(&stripes),
                queue: lane.queue.clone(),
                task_types: task_types.clone(),
                handoff: Arc::clone(&lane.handoff),
                in_flight: Arc::clone(&self.in_flight),
                clock: Arc::clone(&self.clock),
                timer: Arc::clone(timer),
                alive: Arc::clone(&self.alive),
                shutdown: shutdown.clone(),
                poll_interval: settings.poll_interval,
                max_queue_wait: settings.max_queue_wait,
                stats: Arc::clone(&counters.producer),
            })?);
        }
        Ok(())
    }

    /// Waits for the parts to end (after a stop), stage by stage in the table's order.
    /// The heartbeat goes last: while abandoned workers may still run their tasks, it
    /// goes on in the background, until they return, so that no rescue runs their
    /// tasks beside them in a program that goes on after the stop.
    pub(crate) fn join(&mut self) {
        let mut abandoned = 0;
        for stage in [Stage::Producers, Stage::Workers, Stage::Completer, Stage::Others] {
            match stage {
                // An abandoned worker is not waited for: its task may never return.
                Stage::Workers => abandoned = self.crew.join(),
                _ => self.parts.stop(stage),
            }
        }
        if abandoned == 0 {
            // Every attempt is recorded: the instance can go.
            self.parts.stop(Stage::Heartbeat);
            return;
        }
        log::warn!(
            "instance {}: {abandoned} abandoned worker(s) still run their task; the instance stays registered until \
             they return",
            self.name
        );
        let (crew, mut rest) = (Arc::clone(&self.crew), self.parts.take());
        let retire = move || {
            crew.join_abandoned();
            rest.stop(Stage::Heartbeat);
        };
        if let Err(error) = std::thread::Builder::new().name("retire".into()).spawn(retire) {
            log::error!("could not start the thread that waits for the abandoned workers ({error}): retiring now");
            self.retired.stop();
        }
    }
}
