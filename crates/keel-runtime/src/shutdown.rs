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

    /// Fires the signal on SIGTERM or SIGINT (Ctrl-C).
    pub fn trigger_on_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received, draining");
            this.trigger();
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

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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
