//! One shutdown signal per process (or per test), shared by every server and worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A cloneable shutdown signal with hooks run once everything has drained.
///
/// Servers stop accepting when it fires and drain in-flight requests; hooks (deregistration,
/// telemetry flush) run after that, in registration order, within a deadline.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    hooks: Arc<Mutex<Vec<(String, Hook)>>>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal; idempotent.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes once the signal has fired.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// An owned future that completes when the signal fires (for `with_graceful_shutdown`).
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    /// A child signal: fires with this one, and can also be fired alone (one component
    /// stopped inside `keel up`, or a replica killed in a test).
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
            hooks: Arc::clone(&self.hooks),
        }
    }

    /// Fires the signal on SIGTERM or SIGINT (Ctrl-C). A second one ends the process at
    /// once with status 130, without waiting for the drain and the hooks (a stop that hangs
    /// on a stuck request can still be cut short, as Docker's and Kubernetes' second stop
    /// does).
    pub fn trigger_on_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut signals = Signals::new();
            signals.next().await;
            tracing::info!("shutdown signal received, draining (a second signal stops at once)");
            this.trigger();
            signals.next().await;
            tracing::warn!("second shutdown signal: exiting without waiting for the drain");
            std::process::exit(130);
        });
    }

    /// Registers a hook to run after servers have drained.
    pub fn on_shutdown(&self, name: &str, hook: impl Future<Output = ()> + Send + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_owned(), Box::pin(hook)));
    }

    /// Runs the registered hooks in order; each gets what is left of `deadline`.
    pub async fn run_hooks(&self, deadline: Duration) {
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(PoisonError::into_inner));
        let until = tokio::time::Instant::now() + deadline;
        for (name, hook) in hooks {
            if tokio::time::timeout_at(until, hook).await.is_err() {
                tracing::warn!(hook = %name, "shutdown hook did not finish before the deadline");
            }
        }
    }
}

/// SIGTERM and SIGINT, registered once, so that a second signal sent while the first is
/// handled is not missed.
struct Signals {
    #[cfg(unix)]
    streams: Vec<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = [SignalKind::terminate(), SignalKind::interrupt()]
                .into_iter()
                .filter_map(|kind| {
                    signal(kind)
                        .inspect_err(|error| {
                            tracing::warn!(%error, signal = ?kind, "cannot listen for this signal");
                        })
                        .ok()
                })
                .collect();
            Self { streams }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// The next signal; never, when none could be listened for.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            if self.streams.is_empty() {
                std::future::pending::<()>().await;
            }
            let waits = self
                .streams
                .iter_mut()
                .map(|stream| Box::pin(stream.recv()));
            futures_util::future::select_all(waits).await;
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn hooks_run_in_order_and_a_slow_one_is_cut_at_the_deadline() {
        let shutdown = Shutdown::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let ran = Arc::new(AtomicUsize::new(0));
        for name in ["first", "second"] {
            let order = Arc::clone(&order);
            let ran = Arc::clone(&ran);
            shutdown.on_shutdown(name, async move {
                order.lock().expect("lock").push(name);
                ran.fetch_add(1, Ordering::SeqCst);
            });
        }
        shutdown.on_shutdown("stuck", std::future::pending());
        shutdown.trigger();
        shutdown.wait().await;
        shutdown.run_hooks(Duration::from_millis(50)).await;
        assert_eq!(*order.lock().expect("lock"), vec!["first", "second"]);
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_child_fires_with_its_parent_but_not_the_reverse() {
        let parent = Shutdown::new();
        let child = parent.child();
        child.trigger();
        assert!(!parent.is_triggered());
        let other = parent.child();
        parent.trigger();
        assert!(other.is_triggered());
    }
}
