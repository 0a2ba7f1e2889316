//! The etcd backend: instances live in etcd, so registry replicas behind one address share
//! one state and any of them can die without losing anything.
//!
//! Keys, under the configured prefix:
//! - `instances/<id>`: the instance as stored (registration, check statuses and outputs);
//! - `ttl/<check id>`: one key per TTL check, attached to a lease whose TTL is the check's.
//!   A heartbeat keeps the lease alive; when heartbeats stop, etcd deletes the key and every
//!   replica shows the check critical ("TTL expired");
//! - `replicas/<replica id>`: each live replica, under a lease it keeps alive. Active checks
//!   are spread over live replicas by rendezvous hashing, so each runs on exactly one
//!   replica and moves when that replica's lease expires.
//!
//! Every replica keeps its catalog (the read model) from one etcd watch and uses etcd's
//! revision as its index, so indexes agree across replicas and a client can move between
//! them. Writes are computed on a scratch copy of the stored instance with the same rules as
//! the memory backend, then written with a compare-and-swap on the key's revision.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use keel_runtime::Shutdown;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::catalog::{Catalog, CatalogError, Changes};
use crate::model::{Instance, Status, is_maintenance_check};
use crate::registry::{Registry, RegistryError, WeakRegistry};
use crate::server::EtcdConfig;

/// What etcd holds, as last seen through the watch.
#[derive(Default)]
struct Mirror {
    /// Stored instances with their key's mod revision.
    records: HashMap<String, (Instance, i64)>,
    /// Live TTL keys: check id → lease.
    ttl: HashMap<String, i64>,
    /// Check id → instance id, for TTL key events.
    owners: HashMap<String, String>,
    replicas: BTreeSet<String>,
}

impl Mirror {
    fn put_record(&mut self, instance: Instance, revision: i64) {
        self.drop_record(&instance.id);
        for check in &instance.checks {
            self.owners.insert(check.id.clone(), instance.id.clone());
        }
        self.records
            .insert(instance.id.clone(), (instance, revision));
    }

    fn drop_record(&mut self, id: &str) {
        if let Some((old, _)) = self.records.remove(id) {
            for check in &old.checks {
                self.owners.remove(&check.id);
            }
        }
    }

    /// The instance as replicas show it: the stored record, with TTL checks whose key is
    /// gone shown critical.
    fn effective(&self, id: &str) -> Option<Instance> {
        let (record, _) = self.records.get(id)?;
        let mut instance = record.clone();
        for check in &mut instance.checks {
            // The maintenance check's TTL spec is a formality; it has no lease.
            if check.spec.ttl.is_some()
                && !is_maintenance_check(&check.id)
                && !self.ttl.contains_key(&check.id)
            {
                check.status = Status::Critical;
                check.output = "TTL expired".to_owned();
            }
        }
        Some(instance)
    }
}

/// The etcd side of a registry replica.
pub(crate) struct EtcdStore {
    client: Client,
    prefix: String,
    replica: String,
    replica_ttl: Duration,
    mirror: Mutex<Mirror>,
    applied: watch::Sender<u64>,
    /// Whether the watch is live (readiness); while it is not, reads serve the last state.
    watching: AtomicBool,
}

/// How long a write waits to see itself in the watch before answering anyway.
const READ_YOUR_WRITE: Duration = Duration::from_secs(5);
/// Attempts of a compare-and-swap write racing other replicas.
const CAS_ATTEMPTS: usize = 5;

fn etcd_error(error: etcd_client::Error) -> RegistryError {
    RegistryError::Unavailable(format!("etcd: {error}"))
}

impl EtcdStore {
    pub(crate) async fn connect(config: &EtcdConfig) -> Result<Arc<Self>, String> {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout);
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|error| {
                format!("cannot connect to etcd at {:?}: {error}", config.endpoints)
            })?;
        let store = Arc::new(Self {
            client,
            prefix: config.prefix.trim_end_matches('/').to_owned(),
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            replica_ttl: config.replica_ttl,
            mirror: Mutex::default(),
            applied: watch::channel(0).0,
            watching: AtomicBool::new(false),
        });
        // Fail the start now, with a clear message, rather than at the first request.
        store
            .client
            .kv_client()
            .get(
                store.key("instances/"),
                Some(GetOptions::new().with_count_only().with_prefix()),
            )
            .await
            .map_err(|error| format!("etcd at {:?} does not answer: {error}", config.endpoints))?;
        Ok(store)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.mirror.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this replica runs the active check `check_id`: the live replica with the
    /// highest rendezvous score does. Alone (or before membership is known) it runs all.
    pub(crate) fn replica_id(&self) -> &str {
        &self.replica
    }

    pub(crate) fn owns(&self, check_id: &str) -> bool {
        let mirror = self.mirror();
        let best = mirror
            .replicas
            .iter()
            .max_by_key(|replica| rendezvous(replica, check_id));
        best.is_none_or(|best| best == &self.replica)
    }

    // === writes ===

    /// Runs `op` on a scratch catalog holding the stored instance `id` and stores the
    /// result, retrying when another replica wrote the instance in between.
    pub(crate) async fn write<F>(
        &self,
        registry: &Registry,
        id: &str,
        attach_ttls: bool,
        op: F,
    ) -> Result<Instance, RegistryError>
    where
        F: Fn(&mut Catalog, Instant) -> Result<(Instance, Changes), CatalogError>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let now = Instant::now();
            let stored = self.mirror().records.get(id).cloned();
            let mut scratch = Catalog::scratch(stored.as_ref().map(|(record, _)| record), now);
            let (result, _) = op(&mut scratch, now)?;
            let unchanged = stored
                .as_ref()
                .is_some_and(|(record, _)| same_state(record, &result));
            if unchanged && !attach_ttls {
                return Ok(registry.instance(&result.id).unwrap_or(result));
            }
            let expected = stored.as_ref().map_or(0, |(_, revision)| *revision);
            let mut ops = Vec::new();
            if !unchanged {
                let record = serde_json::to_vec(&result)
                    .map_err(|error| RegistryError::Unavailable(error.to_string()))?;
                ops.push(TxnOp::put(
                    self.key(&format!("instances/{id}")),
                    record,
                    None,
                ));
            }
            if attach_ttls {
                for (check_id, ttl) in Catalog::ttl_checks(&result) {
                    let lease = self.grant(ttl).await?;
                    ops.push(TxnOp::put(
                        self.key(&format!("ttl/{check_id}")),
                        "",
                        Some(PutOptions::new().with_lease(lease)),
                    ));
                }
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    self.key(&format!("instances/{id}")),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then(ops);
            let response = self.client.kv_client().txn(txn).await.map_err(etcd_error)?;
            let revision = response.header().map_or(0, |h| h.revision());
            self.wait_applied(revision).await;
            if response.succeeded() {
                return Ok(registry.instance(&result.id).unwrap_or(result));
            }
        }
        Err(RegistryError::Catalog(CatalogError::Conflict(format!(
            "instance {id:?} is being changed concurrently; try again"
        ))))
    }

    /// Deletes an instance and its TTL keys.
    pub(crate) async fn delete(&self, id: &str) -> Result<(), RegistryError> {
        let ops = {
            let mirror = self.mirror();
            let (record, _) = mirror
                .records
                .get(id)
                .ok_or_else(|| CatalogError::NotFound(format!("no instance {id:?}")))?;
            self.delete_ops(record)
        };
        self.run_delete(Txn::new().and_then(ops)).await?;
        Ok(())
    }

    /// Deletes an instance the sweep found overdue, unless it changed since this replica
    /// saw it: a write to its record (an active check's status), or a TTL key that was gone
    /// and is back (a heartbeat through another replica revived the check). Whether it was
    /// deleted; when not, the next sweep judges it again.
    pub(crate) async fn evict(&self, id: &str) -> Result<bool, RegistryError> {
        let (compares, ops) = {
            let mirror = self.mirror();
            let Some((record, revision)) = mirror.records.get(id) else {
                return Ok(false);
            };
            let mut compares = vec![Compare::mod_revision(
                self.key(&format!("instances/{id}")),
                CompareOp::Equal,
                *revision,
            )];
            compares.extend(
                Catalog::ttl_checks(record)
                    .into_iter()
                    .filter(|(check, _)| !mirror.ttl.contains_key(check))
                    .map(|(check, _)| {
                        Compare::version(self.key(&format!("ttl/{check}")), CompareOp::Equal, 0)
                    }),
            );
            (compares, self.delete_ops(record))
        };
        self.run_delete(Txn::new().when(compares).and_then(ops))
            .await
    }

    /// The deletes of an instance's record and its TTL keys.
    fn delete_ops(&self, record: &Instance) -> Vec<TxnOp> {
        let mut ops = vec![TxnOp::delete(
            self.key(&format!("instances/{}", record.id)),
            None,
        )];
        ops.extend(
            record
                .checks
                .iter()
                .map(|check| TxnOp::delete(self.key(&format!("ttl/{}", check.id)), None)),
        );
        ops
    }

    /// Runs a deleting transaction and waits to see it; whether its comparisons held.
    async fn run_delete(&self, txn: Txn) -> Result<bool, RegistryError> {
        let response = self.client.kv_client().txn(txn).await.map_err(etcd_error)?;
        self.wait_applied(response.header().map_or(0, |h| h.revision()))
            .await;
        Ok(response.succeeded())
    }

    /// Renews the TTL key of `check_id`: keeps its lease alive, or attaches the key to a
    /// fresh lease when the old one has expired (the check revives).
    pub(crate) async fn renew(&self, check_id: &str, ttl: Duration) -> Result<(), RegistryError> {
        let lease = self.mirror().ttl.get(check_id).copied();
        if let Some(lease) = lease
            && self.keep_alive(lease).await?
        {
            return Ok(());
        }
        let lease = self.grant(ttl).await?;
        let response = self
            .client
            .kv_client()
            .put(
                self.key(&format!("ttl/{check_id}")),
                "",
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(etcd_error)?;
        self.wait_applied(response.header().map_or(0, |h| h.revision()))
            .await;
        Ok(())
    }

    /// Sends one keep-alive; false when the lease no longer exists.
    async fn keep_alive(&self, lease: i64) -> Result<bool, RegistryError> {
        let (mut keeper, mut stream) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(etcd_error)?;
        keeper.keep_alive().await.map_err(etcd_error)?;
        let answer = stream.message().await.map_err(etcd_error)?;
        Ok(answer.is_some_and(|answer| answer.ttl() > 0))
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        // etcd counts whole seconds; round up so a lease never ends before the TTL.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let response = self
            .client
            .lease_client()
            .grant(i64::try_from(seconds).unwrap_or(i64::MAX), None)
            .await
            .map_err(etcd_error)?;
        Ok(response.id())
    }

    /// Waits (up to `timeout`) for the first full load from etcd, so a replica never
    /// answers from an empty catalog.
    pub(crate) async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|seen| *seen > 0))
            .await
            .is_ok()
    }

    /// Readiness: `Err` while the watch on etcd is down.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.watching.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the etcd watch is down; serving the last known state".to_owned())
        }
    }

    async fn wait_applied(&self, revision: i64) {
        let revision = u64::try_from(revision).unwrap_or(0);
        let mut applied = self.applied.subscribe();
        let _ =
            tokio::time::timeout(READ_YOUR_WRITE, applied.wait_for(|seen| *seen >= revision)).await;
    }

    // === background work ===

    /// Keeps this replica's membership alive and the catalog in step with etcd until
    /// `shutdown`; then withdraws the membership so other replicas take the checks at once.
    pub(crate) async fn run(self: Arc<Self>, registry: WeakRegistry, shutdown: Shutdown) {
        // Aborted with this task, so a killed replica's membership lapses.
        let membership = AbortOnDropHandle::new(tokio::spawn(
            Arc::clone(&self).keep_membership(shutdown.clone()),
        ));
        let mut backoff = Duration::from_millis(100);
        loop {
            let synced = tokio::select! {
                result = self.sync(&registry) => result,
                () = shutdown.wait() => break,
            };
            self.watching.store(false, Ordering::SeqCst);
            if let Err(error) = synced {
                tracing::warn!(%error, ?backoff, "etcd watch interrupted; resynchronising");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.wait() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            } else {
                backoff = Duration::from_millis(100);
            }
            if registry.upgrade().is_none() {
                break;
            }
        }
        let _ = membership.await;
    }

    async fn keep_membership(self: Arc<Self>, shutdown: Shutdown) {
        let key = self.key(&format!("replicas/{}", self.replica));
        let mut lease = None;
        let interval = self.replica_ttl / 3;
        loop {
            let alive = match lease {
                Some(id) => self.keep_alive(id).await.unwrap_or(false),
                None => false,
            };
            if !alive {
                lease = match self.grant(self.replica_ttl).await {
                    Ok(id) => {
                        let put = self
                            .client
                            .kv_client()
                            .put(key.clone(), "", Some(PutOptions::new().with_lease(id)))
                            .await;
                        put.is_ok().then_some(id)
                    }
                    Err(_) => None,
                };
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.wait() => break,
            }
        }
        if let Some(id) = lease {
            let _ = self.client.lease_client().revoke(id).await;
        }
    }

    /// Lists everything, rebuilds the catalog from it, then follows the watch until it fails.
    async fn sync(&self, registry: &WeakRegistry) -> Result<(), String> {
        let prefix = self.key("");
        let mut listing = self
            .client
            .kv_client()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|error| error.to_string())?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let affected: BTreeSet<String> = {
            let mut mirror = self.mirror();
            let before: BTreeSet<String> = mirror.records.keys().cloned().collect();
            *mirror = Mirror::default();
            for kv in listing.take_kvs() {
                self.apply_put(&mut mirror, &kv);
            }
            before
                .into_iter()
                .chain(mirror.records.keys().cloned())
                .collect()
        };
        let Some(registry_now) = registry.upgrade() else {
            return Ok(());
        };
        self.publish(&registry_now, affected, revision, true);
        // After a full load the index is the listing's revision even when nothing changed;
        // later revisions (membership, other prefixes) move it only with a change it shows.
        registry_now.advance_to(u64::try_from(revision).unwrap_or(0));
        drop(registry_now);

        let mut stream = self
            .client
            .watch_client()
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(|error| error.to_string())?;
        self.watching.store(true, Ordering::SeqCst);
        while let Some(response) = stream.message().await.map_err(|error| error.to_string())? {
            if response.canceled() {
                return Err(format!(
                    "watch cancelled: {} (compacted at {})",
                    response.cancel_reason(),
                    response.compact_revision()
                ));
            }
            let Some(registry) = registry.upgrade() else {
                return Ok(());
            };
            // Events of one revision (one transaction) are applied together, so an instance
            // and its TTL keys written at once appear at once.
            let mut events = response.events().iter().peekable();
            while let Some(first) = events.next() {
                let revision = first.kv().map_or(0, KeyValue::mod_revision);
                let mut batch = vec![first];
                while let Some(next) =
                    events.next_if(|e| e.kv().map_or(0, KeyValue::mod_revision) == revision)
                {
                    batch.push(next);
                }
                let mut affected = BTreeSet::new();
                let mut membership = false;
                {
                    let mut mirror = self.mirror();
                    for event in batch {
                        let Some(kv) = event.kv() else { continue };
                        let touched = match event.event_type() {
                            EventType::Put => self.apply_put(&mut mirror, kv),
                            EventType::Delete => self.apply_delete(&mut mirror, kv),
                        };
                        match touched {
                            Touched::Instance(id) => {
                                affected.insert(id);
                            }
                            Touched::Membership => membership = true,
                            Touched::Nothing => {}
                        }
                    }
                }
                self.publish(&registry, affected, revision, membership);
            }
            // Writes elsewhere in etcd move its revision too: they count as applied (a
            // write waiting for its revision must not wait for ours), but the catalog's
            // index moves only with changes it shows, so list watchers are not woken.
            if let Some(header) = response.header() {
                self.applied
                    .send_replace(u64::try_from(header.revision()).unwrap_or(0));
            }
        }
        Err("watch stream ended".to_owned())
    }

    /// Pushes the effective state of `affected` instances into the catalog at `revision`.
    fn publish(
        &self,
        registry: &Registry,
        affected: BTreeSet<String>,
        revision: i64,
        membership: bool,
    ) {
        let index = u64::try_from(revision).unwrap_or(0);
        let now = Instant::now();
        let states: Vec<(String, Option<Instance>)> = {
            let mirror = self.mirror();
            affected
                .into_iter()
                .map(|id| {
                    let state = mirror.effective(&id);
                    (id, state)
                })
                .collect()
        };
        let changes = registry.with_catalog(|catalog| {
            let mut changes = Changes::default();
            for (id, state) in states {
                changes.merge(match state {
                    Some(instance) => catalog.sync_instance(instance, index, now),
                    None => catalog.sync_remove(&id, index, now),
                });
            }
            changes
        });
        registry.apply(changes);
        if membership {
            registry.reconcile_probes();
        }
        self.applied.send_replace(index);
    }

    fn apply_put(&self, mirror: &mut Mirror, kv: &KeyValue) -> Touched {
        let Some(key) = self.relative(kv) else {
            return Touched::Nothing;
        };
        if let Some(id) = key.strip_prefix("instances/") {
            match serde_json::from_slice::<Instance>(kv.value()) {
                Ok(instance) if instance.id == id => {
                    mirror.put_record(instance, kv.mod_revision());
                    Touched::Instance(id.to_owned())
                }
                _ => {
                    tracing::warn!(key, "unreadable instance record in etcd; ignored");
                    Touched::Nothing
                }
            }
        } else if let Some(check) = key.strip_prefix("ttl/") {
            mirror.ttl.insert(check.to_owned(), kv.lease());
            mirror
                .owners
                .get(check)
                .map_or(Touched::Nothing, |id| Touched::Instance(id.clone()))
        } else if let Some(replica) = key.strip_prefix("replicas/") {
            mirror.replicas.insert(replica.to_owned());
            Touched::Membership
        } else {
            Touched::Nothing
        }
    }

    fn apply_delete(&self, mirror: &mut Mirror, kv: &KeyValue) -> Touched {
        let Some(key) = self.relative(kv) else {
            return Touched::Nothing;
        };
        if let Some(id) = key.strip_prefix("instances/") {
            mirror.drop_record(id);
            Touched::Instance(id.to_owned())
        } else if let Some(check) = key.strip_prefix("ttl/") {
            mirror.ttl.remove(check);
            mirror
                .owners
                .get(check)
                .map_or(Touched::Nothing, |id| Touched::Instance(id.clone()))
        } else if let Some(replica) = key.strip_prefix("replicas/") {
            mirror.replicas.remove(replica);
            Touched::Membership
        } else {
            Touched::Nothing
        }
    }

    fn relative<'a>(&self, kv: &'a KeyValue) -> Option<&'a str> {
        kv.key_str()
            .ok()?
            .strip_prefix(&self.prefix)?
            .strip_prefix('/')
    }
}

enum Touched {
    Instance(String),
    Membership,
    Nothing,
}

/// Equal apart from the indexes, which come from etcd's revisions.
fn same_state(stored: &Instance, computed: &Instance) -> bool {
    let mut stored = stored.clone();
    stored.create_index = computed.create_index;
    stored.modify_index = computed.modify_index;
    stored == *computed
}

/// Rendezvous (highest random weight) score of a replica for a check: FNV-1a, stable
/// across processes and Rust versions, unlike the standard library's hasher.
fn rendezvous(replica: &str, check_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in replica.bytes().chain([0]).chain(check_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::DeleteOptions;

    use crate::catalog::sync::tests::computed;

    /// Stores `instance`'s record as a replica would; its revision.
    async fn put_instance(store: &EtcdStore, instance: &Instance) -> i64 {
        let record = serde_json::to_vec(instance).unwrap();
        let key = store.key(&format!("instances/{}", instance.id));
        let put = store
            .client
            .kv_client()
            .put(key, record, None)
            .await
            .unwrap();
        put.header().unwrap().revision()
    }

    #[tokio::test]
    async fn an_eviction_leaves_an_instance_revived_since_the_sweep_looked() {
        if !keel_testkit::require(keel_testkit::Service::Etcd) {
            return;
        }
        let config = EtcdConfig {
            prefix: format!("/{}", keel_testkit::unique_name("keel-test-evict")),
            ..EtcdConfig::default()
        };
        // No watch runs: the mirror holds what the test puts in it, as a replica's
        // would between another replica's write and its event.
        let store = EtcdStore::connect(&config).await.unwrap();
        store.applied.send_replace(u64::MAX);
        let instance = computed("web-1");
        let check = instance.checks[0].id.clone();
        let mut kv = store.client.kv_client();
        let revision = put_instance(&store, &instance).await;
        // Seen with its TTL key gone: overdue, once its deadline passed.
        store.mirror().put_record(instance, revision);
        // Meanwhile a heartbeat through another replica brought the key back.
        kv.put(store.key(&format!("ttl/{check}")), "", None)
            .await
            .unwrap();
        assert!(!store.evict("web-1").await.unwrap());
        let stored = kv.get(store.key("instances/web-1"), None).await.unwrap();
        assert_eq!(stored.kvs().len(), 1, "the revived instance is kept");

        // Expired again (as seen): evicted, with its TTL key.
        kv.delete(store.key(&format!("ttl/{check}")), None)
            .await
            .unwrap();
        assert!(store.evict("web-1").await.unwrap());
        let left = kv
            .get(store.key(""), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert!(left.kvs().is_empty(), "{:?}", left.kvs());

        // A record changed since it was seen is not deleted either.
        let instance = computed("web-2");
        let revision = put_instance(&store, &instance).await;
        store.mirror().put_record(instance.clone(), revision);
        put_instance(&store, &instance).await;
        assert!(!store.evict("web-2").await.unwrap());
        kv.delete(store.key(""), Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
    }

    #[test]
    fn rendezvous_spreads_checks_and_moves_only_the_dead_replicas_share() {
        let replicas = ["a1", "b2", "c3"];
        fn owner(alive: &[&'static str], check: &str) -> &'static str {
            alive
                .iter()
                .max_by_key(|r| rendezvous(r, check))
                .expect("a replica")
        }
        let checks: Vec<String> = (0..300).map(|n| format!("service:web-{n}")).collect();
        let mut counts = HashMap::new();
        for check in &checks {
            *counts.entry(owner(&replicas, check)).or_insert(0) += 1;
        }
        assert!(counts.values().all(|&n| n > 50), "{counts:?}");
        // When b2 dies only its checks move.
        for check in &checks {
            let before = owner(&replicas, check);
            let after = owner(&["a1", "c3"], check);
            if before != "b2" {
                assert_eq!(before, after);
            }
        }
    }
}
