//! The one lifecycle of an instance's parts. Each part spawns from its input, as
//! `spawn(Input) -> Result<Part, Error>`, and returns a [`Part`]: its thread, the
//! [`Stage`] at which it stops, and how it is stopped. The workers are the one
//! exception in form, not in order: their [`Crew`](super::crew::Crew) spawns and joins
//! them, since an abandoned worker is replaced by a new thread while the instance runs.
//!
//! [`start`](super::assembly::start) starts the parts in this order, and
//! [`Parts::stop`] stops them stage by stage, each stage joined before the next:
//!
//! | part | starts | stops |
//! |---|---|---|
//! | heartbeat | first: it takes the instance's name (or the start fails here) and rescues what a previous run of that name left running, before anything claims | last ([`Stage::Heartbeat`]): it keeps the instance alive, so that no rescue takes its attempts, until every attempt is recorded (or its abandoned workers return), then removes its row |
//! | listener | next: after a (re)connection it looks for work as if notified, so nothing inserted while the others start is missed | [`Stage::Others`], on the shutdown |
//! | timer | | [`Stage::Others`], on the shutdown |
//! | vacuum | | [`Stage::Others`], on the shutdown |
//! | cron | | [`Stage::Others`], on the shutdown |
//! | completer | before the workers, who hand it their outcomes | [`Stage::Completer`]: it records every outcome, and ends once the last worker's outbox is gone |
//! | watchdog | before the workers, who ask it to watch their deadlines | [`Stage::Others`], told to stop once the workers have ended |
//! | workers | before the producers | [`Stage::Workers`]: they finish their tasks; abandoned ones are not waited for |
//! | producers | last, once there are workers to hand tasks to | first ([`Stage::Producers`]): they stop claiming and give back the tasks no worker started |
//!
//! Every part but the completer, the watchdog and the heartbeat stops on the instance's
//! one [`Shutdown`](super::shutdown::Shutdown); those three are stopped by their
//! [`Part`] at their stage.

use std::thread::JoinHandle;

use crate::error::Error;

/// When a part stops, in the order of the stop: each stage's parts are stopped and
/// joined before the next stage's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    /// The producers: no more claims; the tasks no worker started go back.
    Producers,
    /// The workers: the tasks in flight finish.
    Workers,
    /// The completer: every outcome is recorded.
    Completer,
    /// The listener, the timer, the vacuum, cron and the watchdog.
    Others,
    /// The heartbeat: the instance is alive until here.
    Heartbeat,
}

/// A running part: its thread, and what stops it.
pub(crate) struct Part {
    stage: Stage,
    thread: JoinHandle<()>,
    /// Stops it at its stage; `None`: it stops on the instance's shutdown.
    stop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Part {
    /// Starts `body` on a thread named `name`, to stop at `stage`.
    pub(crate) fn spawn(name: &str, stage: Stage, body: impl FnOnce() + Send + 'static) -> Result<Part, Error> {
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(body)
            .map_err(|source| Error::Io { context: format!("could not start thread {name}"), source })?;
        Ok(Part { stage, thread, stop: None })
    }

    /// Makes `stop` what stops it at its stage.
    pub(crate) fn stopped_by(mut self, stop: impl FnOnce() + Send + Sync + 'static) -> Part {
        self.stop = Some(Box::new(stop));
        self
    }

    /// Stops it (if it is not stopped by the shutdown) and waits for its thread.
    fn stop_and_join(self) {
        if let Some(stop) = self.stop {
            stop();
        }
        let name = self.thread.thread().name().unwrap_or("thread").to_owned();
        if self.thread.join().is_err() {
            log::error!("{name} ended by a panic outside any task");
        }
    }
}

/// An instance's parts but the workers.
#[derive(Default)]
pub(crate) struct Parts(Vec<Part>);

impl Parts {
    pub(crate) fn add(&mut self, part: Part) {
        self.0.push(part);
    }

    /// Stops and joins the parts of `stage`, in the order they started.
    pub(crate) fn stop(&mut self, stage: Stage) {
        let (now, later) = std::mem::take(&mut self.0).into_iter().partition(|p| p.stage == stage);
        self.0 = later;
        for part in now {
            part.stop_and_join();
        }
    }

    /// Hands over the parts of the last stages, to be stopped elsewhere.
    pub(crate) fn take(&mut self) -> Parts {
        Parts(std::mem::take(&mut self.0))
    }
}
