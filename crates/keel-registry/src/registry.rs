//! The registry service: the catalog behind a lock, watchers woken per service, active
//! health probes, the sweeper that expires TTLs, and the registry's metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::catalog::{Catalog, CatalogError, Changes, InstanceFilter};
use crate::checks;
use crate::model::{
    CheckKind, Instance, Registration, RegistrationLimits, ServiceInstances, ServiceList, Status,
};

/// Limits that protect the registry from runaway or hostile clients.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryLimits {
    pub max_instances_per_service: usize,
    pub max_instances: usize,
    /// Open blocking queries and event streams, together.
    pub max_watches: usize,
    pub registration: RegistrationLimits,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            max_instances_per_service: 5_000,
            max_instances: 50_000,
            max_watches: 10_000,
            registration: RegistrationLimits::default(),
        }
    }
}

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("at most {0} watches may be open at once")]
    TooManyWatches(usize),
}

/// A handle on the registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    catalog: Mutex<Catalog>,
    /// One channel per watched service carrying its index; created by the first watcher.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The global index, for watchers of the service list.
    global: watch::Sender<u64>,
    probes: Mutex<HashMap<String, Vec<AbortHandle>>>,
    open_watches: AtomicUsize,
    limits: RegistryLimits,
    http: reqwest::Client,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for handles in lock(&self.probes).values() {
            handles.iter().for_each(AbortHandle::abort);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Holds one of the limited watch slots until dropped.
pub struct WatchPermit {
    registry: Registry,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.registry
            .inner
            .open_watches
            .fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("keel_registry_watches_open").decrement(1.0);
    }
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Self {
        let catalog = Catalog::new(limits.max_instances_per_service, limits.max_instances);
        let (global, _) = watch::channel(catalog.index());
        describe_metrics();
        Self {
            inner: Arc::new(Inner {
                catalog: Mutex::new(catalog),
                watchers: Mutex::new(HashMap::new()),
                global,
                probes: Mutex::new(HashMap::new()),
                open_watches: AtomicUsize::new(0),
                limits,
                http: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap_or_default(),
            }),
        }
    }

    pub fn limits(&self) -> &RegistryLimits {
        &self.inner.limits
    }

    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        lock(&self.inner.catalog)
    }

    // === writes ===

    /// Registers (or re-registers) an instance; see [`Catalog::register`] for `move_service`.
    pub fn register(
        &self,
        registration: Registration,
        move_service: bool,
    ) -> Result<Instance, RegistryError> {
        registration
            .validate(&self.inner.limits.registration)
            .map_err(CatalogError::Invalid)?;
        let result = self
            .catalog()
            .register(registration, move_service, Instant::now());
        let (instance, changes) = result?;
        metrics::counter!("keel_registry_registrations_total").increment(1);
        self.apply(changes);
        Ok(instance)
    }

    pub fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        let changes = self.catalog().deregister(id, Instant::now())?;
        metrics::counter!("keel_registry_deregistrations_total").increment(1);
        self.apply(changes);
        Ok(())
    }

    /// Renews an instance's TTL checks, optionally with a status and output.
    pub fn heartbeat(
        &self,
        id: &str,
        status: Option<Status>,
        output: Option<String>,
    ) -> Result<Instance, RegistryError> {
        let result = self.catalog().heartbeat(id, status, output, Instant::now());
        let (instance, changes) = result?;
        metrics::counter!("keel_registry_heartbeats_total").increment(1);
        self.apply(changes);
        Ok(instance)
    }

    /// Sets one check's status (Consul's `/v1/agent/check/*`, and active probe results).
    pub fn update_check(
        &self,
        check_id: &str,
        status: Status,
        output: Option<String>,
    ) -> Result<Instance, RegistryError> {
        let result = self
            .catalog()
            .update_check(check_id, status, output, Instant::now());
        let (instance, changes) = result?;
        self.apply(changes);
        Ok(instance)
    }

    /// Expires TTLs and evicts long-critical instances; the server runs this periodically.
    pub fn sweep(&self) {
        let (sweep, counts) = {
            let mut catalog = self.catalog();
            let sweep = catalog.sweep(Instant::now());
            (sweep, catalog.status_counts())
        };
        for (service, id) in &sweep.evicted {
            tracing::info!(%service, instance = %id, "instance evicted after its deregister-after deadline");
        }
        metrics::counter!("keel_registry_ttl_expirations_total").increment(sweep.expired as u64);
        metrics::counter!("keel_registry_evictions_total").increment(sweep.evicted.len() as u64);
        for (state, count) in [
            ("passing", counts.passing),
            ("warning", counts.warning),
            ("critical", counts.critical),
        ] {
            metrics::gauge!("keel_registry_instances", "state" => state).set(count as f64);
        }
        self.apply(sweep.changes);
        // Channels nobody listens to any more are dropped so watched-once names don't pile up.
        lock(&self.inner.watchers).retain(|_, sender| sender.receiver_count() > 0);
    }

    /// Wakes the watchers of changed services and starts or stops active probes.
    fn apply(&self, changes: Changes) {
        if changes.services.is_empty() && changes.removed.is_empty() {
            return;
        }
        {
            let watchers = lock(&self.inner.watchers);
            for (service, index) in &changes.services {
                if let Some(sender) = watchers.get(service) {
                    sender.send_replace(*index);
                }
            }
        }
        self.inner.global.send_replace(self.catalog().index());
        let mut probes = lock(&self.inner.probes);
        for id in &changes.removed {
            if let Some(handles) = probes.remove(id) {
                handles.iter().for_each(AbortHandle::abort);
            }
        }
        for instance in changes.registered {
            if let Some(handles) = probes.remove(&instance.id) {
                handles.iter().for_each(AbortHandle::abort);
            }
            let handles: Vec<AbortHandle> = instance
                .checks
                .iter()
                .filter_map(|check| {
                    let kind = check.spec.kind().ok()?;
                    matches!(kind, CheckKind::Http { .. } | CheckKind::Tcp { .. }).then(|| {
                        checks::spawn_probe(
                            self.downgrade(),
                            self.inner.http.clone(),
                            check.id.clone(),
                            kind,
                        )
                    })
                })
                .collect();
            if !handles.is_empty() {
                probes.insert(instance.id.clone(), handles);
            }
        }
    }

    /// A weak handle for background tasks, so they end when the registry is dropped.
    pub(crate) fn downgrade(&self) -> WeakRegistry {
        WeakRegistry(Arc::downgrade(&self.inner))
    }

    // === reads ===

    pub fn services(&self) -> ServiceList {
        self.catalog().services()
    }

    pub fn instances(&self, service: &str, filter: &InstanceFilter) -> ServiceInstances {
        self.catalog().instances(service, filter)
    }

    pub fn instance(&self, id: &str) -> Option<Instance> {
        self.catalog().instance(id).cloned()
    }

    pub fn check_owner(&self, check_id: &str) -> Option<Instance> {
        let catalog = self.catalog();
        let owner = catalog.check_owner(check_id)?;
        catalog.instance(owner).cloned()
    }

    pub fn index(&self) -> u64 {
        self.catalog().index()
    }

    // === watches ===

    /// Takes a watch slot, or fails when all are in use.
    pub fn watch_permit(&self) -> Result<WatchPermit, RegistryError> {
        let max = self.inner.limits.max_watches;
        let taken =
            self.inner
                .open_watches
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                    (open < max).then_some(open + 1)
                });
        match taken {
            Ok(_) => {
                metrics::gauge!("keel_registry_watches_open").increment(1.0);
                Ok(WatchPermit {
                    registry: self.clone(),
                })
            }
            Err(_) => Err(RegistryError::TooManyWatches(max)),
        }
    }

    /// Subscribes to `service`'s index.
    fn subscribe(&self, service: &str) -> watch::Receiver<u64> {
        let mut watchers = lock(&self.inner.watchers);
        match watchers.get(service) {
            Some(sender) => sender.subscribe(),
            None => {
                let index = self
                    .catalog()
                    .instances(service, &InstanceFilter::default())
                    .index;
                let (sender, receiver) = watch::channel(index);
                watchers.insert(service.to_owned(), sender);
                receiver
            }
        }
    }

    /// Waits until `service`'s index passes `index`, or `wait` elapses.
    ///
    /// Returns at once for index 0 (a first read) and for an index ahead of the registry's
    /// (a client that knew a previous incarnation), as Consul's clients expect.
    pub async fn wait_for_service(&self, service: &str, index: u64, wait: Duration) {
        let mut receiver = self.subscribe(service);
        let current = *receiver.borrow_and_update();
        if index == 0 || current > index || index > self.index() {
            return;
        }
        let changed = tokio::time::timeout(wait, async {
            loop {
                if receiver.changed().await.is_err() {
                    return;
                }
                if *receiver.borrow_and_update() > index {
                    return;
                }
            }
        })
        .await;
        if changed.is_ok()
            && let Some(at) = self.catalog().changed_at(service)
        {
            metrics::histogram!("keel_registry_watch_latency_seconds")
                .record(at.elapsed().as_secs_f64());
        }
    }

    /// Waits until the global index passes `index` (the service list), or `wait` elapses.
    pub async fn wait_for_any(&self, index: u64, wait: Duration) {
        let mut receiver = self.inner.global.subscribe();
        // Anything but the current index (older, or from a previous incarnation) answers now.
        if index != *receiver.borrow_and_update() {
            return;
        }
        let _ = tokio::time::timeout(wait, async {
            while receiver.changed().await.is_ok() {
                if *receiver.borrow_and_update() > index {
                    return;
                }
            }
        })
        .await;
    }
}

/// A registry handle that does not keep the registry alive.
#[derive(Clone)]
pub(crate) struct WeakRegistry(std::sync::Weak<Inner>);

impl WeakRegistry {
    pub(crate) fn upgrade(&self) -> Option<Registry> {
        self.0.upgrade().map(|inner| Registry { inner })
    }
}

fn describe_metrics() {
    metrics::describe_gauge!(
        "keel_registry_instances",
        "Registered instances by health state."
    );
    metrics::describe_counter!(
        "keel_registry_registrations_total",
        "Accepted registrations."
    );
    metrics::describe_counter!(
        "keel_registry_deregistrations_total",
        "Explicit deregistrations."
    );
    metrics::describe_counter!("keel_registry_heartbeats_total", "Accepted heartbeats.");
    metrics::describe_counter!(
        "keel_registry_ttl_expirations_total",
        "TTL checks turned critical for want of a heartbeat."
    );
    metrics::describe_counter!(
        "keel_registry_evictions_total",
        "Instances removed after being critical past their deregister-after deadline."
    );
    metrics::describe_gauge!(
        "keel_registry_watches_open",
        "Open blocking queries and event streams."
    );
    metrics::describe_histogram!(
        "keel_registry_watch_latency_seconds",
        "Time from a change to a watcher being answered."
    );
}
