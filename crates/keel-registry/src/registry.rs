//! The registry service: the catalog behind a lock, watchers woken per service, active
//! health probes, the sweeper that expires TTLs, and the registry's metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::AbortHandle;

#[cfg(feature = "etcd")]
use crate::catalog::Sweep;
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
    /// The shared backend could not be reached; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
}

/// A handle on the registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// Where the state lives.
enum Backend {
    /// In the catalog itself.
    Memory,
    /// In etcd; the catalog is this replica's read model, fed by the watch.
    #[cfg(feature = "etcd")]
    Etcd(Arc<crate::etcd::EtcdStore>),
}

struct Inner {
    /// This replica's id, sent on probes (`x-keel-replica`) and shown by `/v1/status`.
    replica_id: String,
    backend: Backend,
    catalog: Mutex<Catalog>,
    /// One channel per watched service carrying its index; created by the first watcher.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The global index, for watchers of the service list.
    global: watch::Sender<u64>,
    probes: Mutex<HashMap<String, Vec<AbortHandle>>>,
    open_watches: AtomicUsize,
    limits: RegistryLimits,
    http: reqwest::Client,
    /// The same, not checking certificates: for checks with `tls_skip_verify`.
    http_unverified: reqwest::Client,
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
    /// A registry whose state lives in this process.
    pub fn new(limits: RegistryLimits) -> Self {
        Self::with_backend(limits, Backend::Memory)
    }

    /// A replica whose state lives in etcd; `EtcdStore::run` keeps it in step.
    #[cfg(feature = "etcd")]
    pub(crate) fn with_etcd(limits: RegistryLimits, store: Arc<crate::etcd::EtcdStore>) -> Self {
        Self::with_backend(limits, Backend::Etcd(store))
    }

    fn with_backend(limits: RegistryLimits, backend: Backend) -> Self {
        let catalog = Catalog::new(limits.max_instances_per_service, limits.max_instances);
        let (global, _) = watch::channel(catalog.index());
        describe_metrics();
        let replica_id = match &backend {
            Backend::Memory => uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            #[cfg(feature = "etcd")]
            Backend::Etcd(store) => store.replica_id().to_owned(),
        };
        let mut probe_headers = http::HeaderMap::new();
        if let Ok(value) = http::HeaderValue::from_str(&replica_id) {
            probe_headers.insert("x-keel-replica", value);
        }
        Self {
            inner: Arc::new(Inner {
                replica_id,
                backend,
                catalog: Mutex::new(catalog),
                watchers: Mutex::new(HashMap::new()),
                global,
                probes: Mutex::new(HashMap::new()),
                open_watches: AtomicUsize::new(0),
                limits,
                http: keel_runtime::http_client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .default_headers(probe_headers.clone())
                    .build()
                    .unwrap_or_default(),
                http_unverified: keel_runtime::http_client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .default_headers(probe_headers)
                    .danger_accept_invalid_certs(true)
                    .build()
                    .unwrap_or_default(),
            }),
        }
    }

    pub fn replica_id(&self) -> &str {
        &self.inner.replica_id
    }

    /// `memory` or `etcd`.
    pub fn backend_name(&self) -> &'static str {
        match self.inner.backend {
            Backend::Memory => "memory",
            #[cfg(feature = "etcd")]
            Backend::Etcd(_) => "etcd",
        }
    }

    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        lock(&self.inner.catalog)
    }

    // === writes ===

    /// Registers (or re-registers) an instance; see [`Catalog::register`] for `move_service`.
    pub async fn register(
        &self,
        registration: Registration,
        move_service: bool,
    ) -> Result<Instance, RegistryError> {
        registration
            .validate(&self.inner.limits.registration)
            .map_err(CatalogError::Invalid)?;
        if self.is_shared() {
            // The scratch copy a shared backend computes on cannot see the rest of the
            // catalog; conflicts and limits are checked against the full view first.
            self.catalog().admit(&registration, move_service)?;
        }
        let id = registration.id.clone();
        let instance = self
            .write(&id, true, |catalog, now| {
                catalog.register(registration.clone(), move_service, now)
            })
            .await?;
        metrics::counter!("keel_registry_registrations_total").increment(1);
        Ok(instance)
    }

    pub async fn deregister(&self, id: &str) -> Result<(), RegistryError> {
        match &self.inner.backend {
            Backend::Memory => {
                let changes = self.catalog().deregister(id, Instant::now())?;
                self.apply(changes);
            }
            #[cfg(feature = "etcd")]
            Backend::Etcd(store) => store.delete(id).await?,
        }
        metrics::counter!("keel_registry_deregistrations_total").increment(1);
        Ok(())
    }

    /// Removes an instance the sweep found overdue; false when a shared backend found it
    /// changed since (revived through another replica).
    async fn evict(&self, id: &str) -> Result<bool, RegistryError> {
        match &self.inner.backend {
            Backend::Memory => self.deregister(id).await.map(|()| true),
            #[cfg(feature = "etcd")]
            Backend::Etcd(store) => store.evict(id).await,
        }
    }

    /// Renews an instance's TTL checks, optionally with a status and output.
    pub async fn heartbeat(
        &self,
        id: &str,
        status: Option<Status>,
        output: Option<String>,
    ) -> Result<Instance, RegistryError> {
        let instance = self
            .write(id, false, |catalog, now| {
                catalog.heartbeat(id, status, output.clone(), now)
            })
            .await?;
        self.renew_ttls(&instance, None).await?;
        metrics::counter!("keel_registry_heartbeats_total").increment(1);
        Ok(self.instance(id).unwrap_or(instance))
    }

    /// Sets one check's status (Consul's `/v1/agent/check/*`, and active probe results).
    pub async fn update_check(
        &self,
        check_id: &str,
        status: Status,
        output: Option<String>,
    ) -> Result<Instance, RegistryError> {
        let owner = self
            .check_owner(check_id)
            .ok_or_else(|| CatalogError::NotFound(format!("no check {check_id:?}")))?;
        let instance = self
            .write(&owner.id, false, |catalog, now| {
                catalog.update_check(check_id, status, output.clone(), now)
            })
            .await?;
        self.renew_ttls(&instance, Some(check_id)).await?;
        Ok(self.instance(&owner.id).unwrap_or(instance))
    }

    /// Puts an instance in maintenance or takes it out (Consul's maintenance mode, Eureka's
    /// status override); see [`Catalog::set_maintenance`].
    pub async fn set_maintenance(
        &self,
        id: &str,
        reason: Option<String>,
    ) -> Result<Instance, RegistryError> {
        self.write(id, false, |catalog, now| {
            catalog.set_maintenance(id, reason.clone(), now)
        })
        .await
    }

    /// Whether the state lives in a backend shared by several replicas.
    fn is_shared(&self) -> bool {
        !matches!(self.inner.backend, Backend::Memory)
    }

    /// Runs a write: on the catalog itself in memory; with a shared backend on a scratch
    /// copy of the stored instance, stored, and read back once the watch has applied it
    /// (`attach_ttls`: give the instance's TTL checks fresh leases).
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    async fn write<F>(&self, id: &str, attach_ttls: bool, op: F) -> Result<Instance, RegistryError>
    where
        F: Fn(&mut Catalog, Instant) -> Result<(Instance, Changes), CatalogError>,
    {
        match &self.inner.backend {
            Backend::Memory => {
                let result = op(&mut self.catalog(), Instant::now());
                let (instance, changes) = result?;
                self.apply(changes);
                Ok(instance)
            }
            #[cfg(feature = "etcd")]
            Backend::Etcd(store) => store.write(self, id, attach_ttls, op).await,
        }
    }

    /// With a shared backend, a heartbeat or a TTL check update also renews the TTL
    /// leases (all of the instance's, or only `only`'s); in memory the write did that.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    async fn renew_ttls(
        &self,
        instance: &Instance,
        only: Option<&str>,
    ) -> Result<(), RegistryError> {
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(store) = &self.inner.backend {
            for (check_id, ttl) in Catalog::ttl_checks(instance) {
                if only.is_none_or(|only| only == check_id) {
                    store.renew(&check_id, ttl).await?;
                }
            }
        }
        Ok(())
    }

    /// Expires TTLs and evicts long-critical instances; the server runs this periodically.
    /// With a shared backend, etcd's leases expire TTLs and this replica deletes overdue
    /// instances from the store (any replica may; the delete holds only if the instance is
    /// still as this replica saw it).
    pub async fn sweep(&self) {
        let now = Instant::now();
        let (sweep, overdue, counts) = {
            let mut catalog = self.catalog();
            let (sweep, overdue) = match self.inner.backend {
                Backend::Memory => (catalog.sweep(now), Vec::<String>::new()),
                #[cfg(feature = "etcd")]
                Backend::Etcd(_) => {
                    catalog.forget_empty_services(now);
                    (Sweep::default(), catalog.overdue(now))
                }
            };
            (sweep, overdue, catalog.status_counts())
        };
        let mut evicted = sweep.evicted.len();
        for (service, id) in &sweep.evicted {
            tracing::info!(%service, instance = %id, "instance evicted after its deregister-after deadline");
        }
        for id in overdue {
            if let Ok(true) = self.evict(&id).await {
                tracing::info!(instance = %id, "instance evicted after its deregister-after deadline");
                evicted += 1;
            }
        }
        metrics::counter!("keel_registry_ttl_expirations_total").increment(sweep.expired as u64);
        metrics::counter!("keel_registry_evictions_total").increment(evicted as u64);
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

    /// Moves the index forward without a change (a shared backend's revision), keeping the
    /// service-list watchers' channel equal to the index that reads report.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn advance_to(&self, index: u64) {
        let current = {
            let mut catalog = self.catalog();
            catalog.advance_to(index);
            catalog.index()
        };
        self.inner.global.send_if_modified(|seen| {
            let moved = *seen != current;
            *seen = current;
            moved
        });
    }

    /// Runs `f` on the catalog (a shared backend's watch feeds it through this).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn with_catalog<R>(&self, f: impl FnOnce(&mut Catalog) -> R) -> R {
        f(&mut self.catalog())
    }

    /// Wakes the watchers of changed services and starts or stops active probes.
    pub(crate) fn apply(&self, changes: Changes) {
        if changes.services.is_empty() && changes.removed.is_empty() {
            return;
        }
        {
            let watchers = lock(&self.inner.watchers);
            for (service, index) in &changes.services {
                if let Some(sender) = watchers.get(service) {
                    // Never back: two writes may be applied in the other order than their
                    // indexes (the catalog's lock is released before this), and a watcher
                    // that read the later index must not be held by the earlier one.
                    sender.send_if_modified(|current| {
                        let newer = *index > *current;
                        if newer {
                            *current = *index;
                        }
                        newer
                    });
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
        for instance in &changes.registered {
            self.start_probes(&mut probes, instance);
        }
    }

    /// (Re)starts the active probes of `instance` that this replica owns.
    fn start_probes(&self, probes: &mut HashMap<String, Vec<AbortHandle>>, instance: &Instance) {
        if let Some(handles) = probes.remove(&instance.id) {
            handles.iter().for_each(AbortHandle::abort);
        }
        let handles: Vec<AbortHandle> = instance
            .checks
            .iter()
            .filter(|check| self.owns(&check.id))
            .filter_map(|check| {
                let kind = check.spec.kind().ok()?;
                let http = match kind {
                    CheckKind::Http {
                        skip_verify: true, ..
                    } => &self.inner.http_unverified,
                    CheckKind::Http { .. } | CheckKind::Tcp { .. } => &self.inner.http,
                    CheckKind::Ttl { .. } => return None,
                };
                Some(checks::spawn_probe(
                    self.downgrade(),
                    http.clone(),
                    check.id.clone(),
                    kind,
                ))
            })
            .collect();
        if !handles.is_empty() {
            probes.insert(instance.id.clone(), handles);
        }
    }

    /// Whether this replica runs the active check `check_id`.
    fn owns(&self, check_id: &str) -> bool {
        match &self.inner.backend {
            Backend::Memory => {
                let _ = check_id;
                true
            }
            #[cfg(feature = "etcd")]
            Backend::Etcd(store) => store.owns(check_id),
        }
    }

    /// Restarts every probe after the set of live replicas changed, so each active check
    /// runs on its owner.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn reconcile_probes(&self) {
        let instances: Vec<Instance> = {
            let catalog = self.catalog();
            catalog
                .services()
                .services
                .iter()
                .flat_map(|service| {
                    catalog
                        .instances(&service.name, &InstanceFilter::default())
                        .instances
                })
                .filter(|instance| instance.checks.iter().any(|c| c.spec.ttl.is_none()))
                .collect()
        };
        let mut probes = lock(&self.inner.probes);
        for instance in &instances {
            self.start_probes(&mut probes, instance);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_services_watch_index_never_steps_back() {
        let registry = Registry::new(RegistryLimits::default());
        let mut watcher = registry.subscribe("orders");
        let changes = |index: u64| Changes {
            services: [("orders".to_owned(), index)].into(),
            ..Changes::default()
        };
        registry.apply(changes(11));
        // An earlier write, applied after the later one.
        registry.apply(changes(10));
        assert_eq!(*watcher.borrow_and_update(), 11);
        registry.apply(changes(12));
        assert!(watcher.has_changed().unwrap());
        assert_eq!(*watcher.borrow_and_update(), 12);
    }
}
