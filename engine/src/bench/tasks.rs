//! The bench's own task types, in a registry of their own: the benchmarks do not depend
//! on the workspace's task crates (which a project replaces), and `engine run` does not
//! see these types.

use serde::{Deserialize, Serialize};
use task_engine::{Registry, Task, TaskContext, TaskError};

/// Does nothing: what the benchmarks measure is the engine's own work.
#[derive(Debug, Serialize, Deserialize)]
pub struct Noop {}

impl Task for Noop {
    const NAME: &'static str = "bench_noop";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Holds its worker until the instance stops (or the task is cancelled): a busy engine.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hold {}

impl Task for Hold {
    const NAME: &'static str = "bench_hold";
    type Output = ();

    fn run(&self, ctx: &TaskContext) -> Result<(), TaskError> {
        while !ctx.stop_requested() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }
}

/// Sleeps `ms`: a task that takes time, for the limits' benchmarks.
#[derive(Debug, Serialize, Deserialize)]
pub struct Nap {
    pub ms: u64,
}

impl Task for Nap {
    const NAME: &'static str = "bench_nap";
    type Output = ();

    fn run(&self, _ctx: &TaskContext) -> Result<(), TaskError> {
        std::thread::sleep(std::time::Duration::from_millis(self.ms));
        Ok(())
    }
}

/// The registry of the benchmarks' instances.
pub fn registry() -> Result<Registry, task_engine::Error> {
    let mut registry = Registry::default();
    registry.register::<Noop>()?;
    registry.register::<Hold>()?;
    registry.register::<Nap>()?;
    Ok(registry)
}
