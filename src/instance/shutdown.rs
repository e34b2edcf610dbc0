//! The instance's one stop. [`RunningEngine::shutdown`](crate::RunningEngine::shutdown)
//! and [`StopHandle::stop`](crate::StopHandle::stop) set it; every thread notices it
//! at once, however it waits: the threads that only pause sleep on it, and the parts
//! that wait on a condvar of their own (the hand-off, the timer) register a waker.
//!
//! The completer is not stopped: it ends once the last worker has ended (see
//! [`completer`](super::completer)), so that every outcome is recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::instance::lock;

type Waker = Box<dyn Fn() + Send + Sync>;

/// The stop token of one instance; clones share it.
#[derive(Clone, Default)]
pub(crate) struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set once, never cleared; shared with every task's context.
    stopped: Arc<AtomicBool>,
    /// What sleepers wait on: a stop sets the flag, then takes this mutex before it
    /// notifies, so that a sleeper that has just checked the flag is already waiting.
    sleep: Mutex<()>,
    condvar: Condvar,
    wakers: Mutex<Vec<Waker>>,
}

impl Shutdown {
    /// Stops the instance; returns true for the call that did it.
    pub(crate) fn stop(&self) -> bool {
        if self.inner.stopped.swap(true, Ordering::SeqCst) {
            return false;
        }
        drop(lock(&self.inner.sleep));
        self.inner.condvar.notify_all();
        for waker in lock(&self.inner.wakers).iter() {
            waker();
        }
        true
    }

    /// Tells whether the instance is stopping.
    pub(crate) fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Sleeps up to `timeout`; returns true, at once, when the instance stops.
    pub(crate) fn sleep(&self, timeout: Duration) -> bool {
        let guard = lock(&self.inner.sleep);
        let stopped = &self.inner.stopped;
        let _guard = self
            .inner
            .condvar
            .wait_timeout_while(guard, timeout, |_| !stopped.load(Ordering::SeqCst))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.is_stopped()
    }

    /// Calls `waker` when the instance stops (at once if it has), for a part that waits
    /// on its own condvar.
    pub(crate) fn on_stop(&self, waker: impl Fn() + Send + Sync + 'static) {
        let mut wakers = lock(&self.inner.wakers);
        if self.is_stopped() {
            drop(wakers);
            waker();
        } else {
            wakers.push(Box::new(waker));
        }
    }

    /// The flag itself, for the tasks' contexts.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.inner.stopped)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn a_stop_ends_a_sleep_at_once_and_only_the_first_call_stops() {
        let shutdown = Shutdown::default();
        let (started, ended) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                started.0.send(()).unwrap();
                ended.0.send(shutdown.sleep(Duration::from_secs(3600))).unwrap();
            });
        }
        started.1.recv().unwrap();
        // Most likely asleep by now; if not, the flag alone ends the sleep.
        std::thread::sleep(Duration::from_millis(50));
        assert!(shutdown.stop());
        assert!(!shutdown.stop());
        let woke = ended.1.recv_timeout(Duration::from_secs(20));
        assert_eq!(woke, Ok(true), "the sleep did not end with the stop");
        assert!(shutdown.sleep(Duration::from_secs(3600)), "a sleep after the stop waited");
    }

    #[test]
    fn wakers_run_once_at_the_stop_or_at_once_when_registered_after_it() {
        let shutdown = Shutdown::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        shutdown.on_stop(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        shutdown.stop();
        shutdown.stop();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let counter = Arc::clone(&calls);
        shutdown.on_stop(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(shutdown.flag().load(Ordering::SeqCst));
    }
}
