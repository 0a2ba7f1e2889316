//! The registry's state machine: instances, their checks, and the change index.
//!
//! Pure and synchronous: every operation takes `now`, so TTL expiry and deregistration
//! deadlines are tested without sleeping. Every change bumps one global index and records it
//! as the changed service's index; blocking queries wait for a service's index to pass the
//! one they hold, so a change to one service never wakes the watchers of another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

pub(crate) mod sync;

use crate::model::{
    CheckKind, CheckState, Instance, Registration, ServiceInstances, ServiceList, ServiceSummary,
    Status, truncate_output,
};
use crate::model::{CheckSpec, is_maintenance_check, maintenance_check_id};

/// Why a catalog operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Limit(String),
}

/// Filters of an instance query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    pub passing_only: bool,
    pub tag: Option<String>,
    pub zone: Option<String>,
}

/// What an operation changed: the services whose index moved, with their new index.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub services: BTreeMap<String, u64>,
    /// Instances removed (deregistered or evicted), whose probes must stop.
    pub removed: Vec<String>,
    /// Instances (re)registered whose active checks must (re)start.
    pub registered: Vec<Instance>,
}

impl Changes {
    pub fn merge(&mut self, other: Changes) {
        self.services.extend(other.services);
        self.removed.extend(other.removed);
        self.registered.extend(other.registered);
    }
}

/// Outcome of a sweep: the changes plus the instances evicted (for metrics and logs).
#[derive(Debug, Default)]
pub struct Sweep {
    pub changes: Changes,
    pub expired: usize,
    pub evicted: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct CheckTiming {
    /// Last TTL renewal (or registration) time.
    renewed: Instant,
    critical_since: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Entry {
    instance: Instance,
    kinds: Vec<CheckKind>,
    timings: Vec<CheckTiming>,
}

#[derive(Debug, Clone)]
struct ServiceEntry {
    index: u64,
    changed_at: Instant,
    instances: BTreeMap<String, Entry>,
}

/// Counts of instances per status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatusCounts {
    pub passing: usize,
    pub warning: usize,
    pub critical: usize,
}

/// How long an emptied service keeps its index so that watchers see its removal.
const EMPTY_SERVICE_RETENTION: Duration = Duration::from_secs(600);

/// The registry's whole state.
#[derive(Debug)]
pub struct Catalog {
    index: u64,
    services: BTreeMap<String, ServiceEntry>,
    instance_service: HashMap<String, String>,
    check_owner: HashMap<String, String>,
    max_instances_per_service: usize,
    max_instances: usize,
}

impl Catalog {
    pub fn new(max_instances_per_service: usize, max_instances: usize) -> Self {
        Self {
            index: 1,
            services: BTreeMap::new(),
            instance_service: HashMap::new(),
            check_owner: HashMap::new(),
            max_instances_per_service,
            max_instances,
        }
    }

    /// The global change index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The index of `service`'s last change, if the catalog knows the service.
    pub fn service_index(&self, service: &str) -> Option<u64> {
        self.services.get(service).map(|entry| entry.index)
    }

    /// When `service` last changed (for change-to-watcher latency).
    pub fn changed_at(&self, service: &str) -> Option<Instant> {
        self.services.get(service).map(|entry| entry.changed_at)
    }

    pub fn status_counts(&self) -> StatusCounts {
        let mut counts = StatusCounts::default();
        for entry in self.services.values().flat_map(|s| s.instances.values()) {
            match entry.instance.status {
                Status::Passing => counts.passing += 1,
                Status::Warning => counts.warning += 1,
                Status::Critical => counts.critical += 1,
            }
        }
        counts
    }

    /// Registers or re-registers an instance.
    ///
    /// `move_service`: an id already registered under another service moves to the new one
    /// (Consul's behaviour); when false that is a conflict (the native API's).
    /// Re-registering the same spec keeps check states and counts as a renewal.
    pub fn register(
        &mut self,
        registration: Registration,
        move_service: bool,
        now: Instant,
    ) -> Result<(Instance, Changes), CatalogError> {
        self.admit(&registration, move_service)?;
        let Registration { service, id, spec } = registration;
        let kinds = spec
            .checks
            .iter()
            .map(|check| check.kind().map_err(CatalogError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let check_ids = check_ids(&id, &spec.checks);

        let mut changes = Changes::default();
        if let Some(current) = self.instance_service.get(&id).cloned() {
            if current != service {
                changes.merge(self.remove(&id, now)?);
            } else if let Some(entry) = self.entry_mut(&service, &id)
                && same_registration(entry, &spec, &check_ids)
            {
                for timing in &mut entry.timings {
                    timing.renewed = now;
                }
                let instance = entry.instance.clone();
                // Expired TTL checks revive through a heartbeat, not a re-registration.
                return Ok((instance, changes));
            }
        }
        let create_index = self
            .services
            .get(&service)
            .and_then(|entry| entry.instances.get(&id))
            .map(|entry| entry.instance.create_index);

        let index = self.next_index();
        let checks: Vec<CheckState> = spec
            .checks
            .iter()
            .zip(&kinds)
            .zip(&check_ids)
            .map(|((check, kind), check_id)| {
                let status = check.initial_status.unwrap_or(match kind {
                    CheckKind::Ttl { .. } => Status::Passing,
                    CheckKind::Http { .. } | CheckKind::Tcp { .. } => Status::Critical,
                });
                CheckState {
                    id: check_id.clone(),
                    spec: check.clone(),
                    status,
                    output: String::new(),
                }
            })
            .collect();
        let timings = checks
            .iter()
            .map(|check| CheckTiming {
                renewed: now,
                critical_since: (check.status == Status::Critical).then_some(now),
            })
            .collect();
        let mut instance = Instance {
            service: service.clone(),
            id: id.clone(),
            address: spec.address,
            port: spec.port,
            scheme: spec.scheme,
            tags: spec.tags,
            version: spec.version,
            zone: spec.zone,
            weight: spec.weight,
            meta: spec.meta,
            status: Status::Passing,
            checks,
            create_index: create_index.unwrap_or(index),
            modify_index: index,
        };
        let (kinds, timings) = self.keep_maintenance(&id, &mut instance, kinds, timings, now);
        instance.status = aggregate(&instance.checks);

        // Forget check ids the previous registration of this instance had.
        self.forget_checks(&id);
        for check_id in &check_ids {
            self.check_owner.insert(check_id.clone(), id.clone());
        }
        self.instance_service.insert(id.clone(), service.clone());
        let entry = self
            .services
            .entry(service.clone())
            .or_insert_with(|| ServiceEntry {
                index,
                changed_at: now,
                instances: BTreeMap::new(),
            });
        entry.index = index;
        entry.changed_at = now;
        entry.instances.insert(
            id,
            Entry {
                instance: instance.clone(),
                kinds,
                timings,
            },
        );
        changes.services.insert(service, index);
        changes.registered.push(instance.clone());
        Ok((instance, changes))
    }

    /// Removes an instance.
    pub fn deregister(&mut self, id: &str, now: Instant) -> Result<Changes, CatalogError> {
        self.remove(id, now)
    }

    /// Renews every TTL check of an instance, optionally setting their status and output.
    pub fn heartbeat(
        &mut self,
        id: &str,
        status: Option<Status>,
        output: Option<String>,
        now: Instant,
    ) -> Result<(Instance, Changes), CatalogError> {
        let service = self
            .instance_service
            .get(id)
            .cloned()
            .ok_or_else(|| CatalogError::NotFound(format!("no instance {id:?}")))?;
        let ttl_checks: Vec<String> = self
            .entry_mut(&service, id)
            .map(|entry| {
                entry
                    .instance
                    .checks
                    .iter()
                    .zip(&entry.kinds)
                    .filter(|(check, kind)| {
                        // Maintenance ends only through `set_maintenance`, never a heartbeat.
                        matches!(kind, CheckKind::Ttl { .. }) && !is_maintenance_check(&check.id)
                    })
                    .map(|(check, _)| check.id.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut changes = Changes::default();
        for check_id in ttl_checks {
            let status = status.unwrap_or(Status::Passing);
            // The heartbeat's note, or none: as Consul's pass, a heartbeat without one
            // clears what the check said before ("TTL expired" on a revived check).
            let output = Some(output.clone().unwrap_or_default());
            changes.merge(self.update_check(&check_id, status, output, now)?.1);
        }
        let instance = self
            .entry_mut(&service, id)
            .map(|entry| entry.instance.clone())
            .ok_or_else(|| CatalogError::NotFound(format!("no instance {id:?}")))?;
        Ok((instance, changes))
    }

    /// Sets a check's status (a TTL pass/warn/fail, or an active probe's result).
    /// The index moves only when the status or output changes.
    pub fn update_check(
        &mut self,
        check_id: &str,
        status: Status,
        output: Option<String>,
        now: Instant,
    ) -> Result<(Instance, Changes), CatalogError> {
        let not_found = || CatalogError::NotFound(format!("no check {check_id:?}"));
        // Only `set_maintenance` switches a maintenance check (a synced catalog owns it too).
        if is_maintenance_check(check_id) {
            return Err(not_found());
        }
        let owner = self
            .check_owner
            .get(check_id)
            .cloned()
            .ok_or_else(not_found)?;
        let service = self
            .instance_service
            .get(&owner)
            .cloned()
            .ok_or_else(not_found)?;
        let next = self.index + 1;
        let entry = self.entry_mut(&service, &owner).ok_or_else(not_found)?;
        let position = entry
            .instance
            .checks
            .iter()
            .position(|check| check.id == check_id)
            .ok_or_else(not_found)?;
        entry.timings[position].renewed = now;
        let check = &mut entry.instance.checks[position];
        let output = output.map(truncate_output);
        let changed = check.status != status
            || output
                .as_ref()
                .is_some_and(|output| output != &check.output);
        if !changed {
            return Ok((entry.instance.clone(), Changes::default()));
        }
        if check.status != status {
            entry.timings[position].critical_since = (status == Status::Critical).then_some(now);
        }
        check.status = status;
        if let Some(output) = output {
            check.output = output;
        }
        entry.instance.status = aggregate(&entry.instance.checks);
        entry.instance.modify_index = next;
        let instance = entry.instance.clone();
        self.index = next;
        let mut changes = Changes::default();
        changes.services.insert(service.clone(), next);
        if let Some(service_entry) = self.services.get_mut(&service) {
            service_entry.index = next;
            service_entry.changed_at = now;
        }
        Ok((instance, changes))
    }

    /// Turns overdue TTL checks critical and evicts instances critical for longer than
    /// their deregister-after deadline.
    pub fn sweep(&mut self, now: Instant) -> Sweep {
        let mut expired = Vec::new();
        let mut evict = Vec::new();
        for (service, entry) in &self.services {
            for (id, instance) in &entry.instances {
                for ((check, kind), timing) in instance
                    .instance
                    .checks
                    .iter()
                    .zip(&instance.kinds)
                    .zip(&instance.timings)
                {
                    if let CheckKind::Ttl { ttl } = kind
                        && check.status != Status::Critical
                        && now.saturating_duration_since(timing.renewed) > *ttl
                    {
                        expired.push(check.id.clone());
                    }
                    if let (Some(after), Some(since)) =
                        (check.spec.deregister_after, timing.critical_since)
                        && now.saturating_duration_since(since) >= after
                    {
                        evict.push((service.clone(), id.clone()));
                        break;
                    }
                }
            }
        }
        let mut sweep = Sweep {
            expired: expired.len(),
            ..Sweep::default()
        };
        for check_id in expired {
            if let Ok((_, changes)) = self.update_check(
                &check_id,
                Status::Critical,
                Some("TTL expired".to_owned()),
                now,
            ) {
                sweep.changes.merge(changes);
            }
        }
        for (service, id) in evict {
            if let Ok(changes) = self.remove(&id, now) {
                sweep.changes.merge(changes);
                sweep.evicted.push((service, id));
            }
        }
        self.forget_empty_services(now);
        sweep
    }

    /// Drops services emptied long enough ago that no watcher can still need their index.
    pub fn forget_empty_services(&mut self, now: Instant) {
        self.services.retain(|_, entry| {
            !entry.instances.is_empty()
                || now.saturating_duration_since(entry.changed_at) < EMPTY_SERVICE_RETENTION
        });
    }

    /// Every service with at least one instance, by name.
    pub fn services(&self) -> ServiceList {
        let services = self
            .services
            .iter()
            .filter(|(_, entry)| !entry.instances.is_empty())
            .map(|(name, entry)| {
                let tags: BTreeSet<&String> = entry
                    .instances
                    .values()
                    .flat_map(|e| &e.instance.tags)
                    .collect();
                ServiceSummary {
                    name: name.clone(),
                    instances: entry.instances.len(),
                    passing: entry
                        .instances
                        .values()
                        .filter(|e| e.instance.status == Status::Passing)
                        .count(),
                    tags: tags.into_iter().cloned().collect(),
                }
            })
            .collect();
        ServiceList {
            index: self.index,
            services,
        }
    }

    /// The instances of `service` matching `filter`, ordered by id.
    ///
    /// The index is the service's own; a service never seen answers with the global index,
    /// so a blocking query on it wakes when the service appears.
    pub fn instances(&self, service: &str, filter: &InstanceFilter) -> ServiceInstances {
        let entry = self.services.get(service);
        let instances = entry
            .map(|entry| {
                entry
                    .instances
                    .values()
                    .map(|e| &e.instance)
                    .filter(|i| !filter.passing_only || i.status == Status::Passing)
                    .filter(|i| filter.tag.as_ref().is_none_or(|tag| i.tags.contains(tag)))
                    .filter(|i| {
                        filter
                            .zone
                            .as_ref()
                            .is_none_or(|zone| i.zone.as_ref() == Some(zone))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        ServiceInstances {
            index: entry.map_or(self.index, |entry| entry.index),
            service: service.to_owned(),
            instances,
        }
    }

    /// The instance that owns a check, if any.
    pub fn check_owner(&self, check_id: &str) -> Option<&str> {
        self.check_owner.get(check_id).map(String::as_str)
    }

    /// Looks an instance up by id.
    pub fn instance(&self, id: &str) -> Option<&Instance> {
        let service = self.instance_service.get(id)?;
        self.services
            .get(service)?
            .instances
            .get(id)
            .map(|entry| &entry.instance)
    }

    fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn entry_mut(&mut self, service: &str, id: &str) -> Option<&mut Entry> {
        self.services.get_mut(service)?.instances.get_mut(id)
    }

    /// Forgets the check ids that `id`'s current registration owns: a lookup of its own
    /// checks, not a scan of every instance's (registration time must not grow with the
    /// catalog).
    fn forget_checks(&mut self, id: &str) {
        let Some(entry) = self
            .instance_service
            .get(id)
            .and_then(|service| self.services.get(service))
            .and_then(|service| service.instances.get(id))
        else {
            return;
        };
        for check in &entry.instance.checks {
            if self
                .check_owner
                .get(&check.id)
                .is_some_and(|owner| owner == id)
            {
                self.check_owner.remove(&check.id);
            }
        }
    }

    fn remove(&mut self, id: &str, now: Instant) -> Result<Changes, CatalogError> {
        self.forget_checks(id);
        let service = self
            .instance_service
            .remove(id)
            .ok_or_else(|| CatalogError::NotFound(format!("no instance {id:?}")))?;
        let index = self.next_index();
        if let Some(entry) = self.services.get_mut(&service) {
            entry.instances.remove(id);
            entry.index = index;
            entry.changed_at = now;
        }
        let mut changes = Changes::default();
        changes.services.insert(service, index);
        changes.removed.push(id.to_owned());
        Ok(changes)
    }
}

/// Consul's check ids: `service:<id>` for one check, `service:<id>:<n>` for several.
fn check_ids(instance_id: &str, checks: &[crate::model::CheckSpec]) -> Vec<String> {
    checks
        .iter()
        .enumerate()
        .map(|(n, check)| match &check.id {
            Some(id) => id.clone(),
            None if checks.len() == 1 => format!("service:{instance_id}"),
            None => format!("service:{instance_id}:{}", n + 1),
        })
        .collect()
}

fn same_registration(
    entry: &Entry,
    spec: &crate::model::InstanceSpec,
    check_ids: &[String],
) -> bool {
    let current = &entry.instance;
    current.address == spec.address
        && current.port == spec.port
        && current.scheme == spec.scheme
        && current.tags == spec.tags
        && current.version == spec.version
        && current.zone == spec.zone
        && current.weight == spec.weight
        && current.meta == spec.meta
        && registered_checks(current).count() == spec.checks.len()
        && registered_checks(current)
            .zip(&spec.checks)
            .zip(check_ids)
            .all(|((state, spec), id)| &state.spec == spec && &state.id == id)
}

/// An instance is as healthy as its worst check.
fn aggregate(checks: &[CheckState]) -> Status {
    checks
        .iter()
        .map(|check| check.status)
        .max()
        .unwrap_or(Status::Passing)
}

// === maintenance ===

/// The TTL a maintenance check's spec carries. The check is critical from the start and no
/// heartbeat renews it, so the TTL never fires; it is there so that everything that derives
/// a check's kind from its spec (validation, a shared backend's sync) accepts the check.
const MAINTENANCE_TTL: Duration = Duration::from_secs(24 * 3600);

impl Catalog {
    /// Puts an instance in maintenance (`Some(reason)`) or takes it out of it (`None`), the
    /// way Consul's maintenance mode does: a synthetic critical check
    /// `_service_maintenance:<id>` whose output is the reason keeps the instance out of
    /// passing queries without touching the checks it registered. It outlives
    /// re-registrations (Eureka's status overrides do too) and ends with the instance.
    ///
    /// The index moves only when something changes, so watchers wake once per switch.
    pub fn set_maintenance(
        &mut self,
        id: &str,
        reason: Option<String>,
        now: Instant,
    ) -> Result<(Instance, Changes), CatalogError> {
        let not_found = || CatalogError::NotFound(format!("no instance {id:?}"));
        let service = self
            .instance_service
            .get(id)
            .cloned()
            .ok_or_else(not_found)?;
        let next = self.index + 1;
        let entry = self.entry_mut(&service, id).ok_or_else(not_found)?;
        let check_id = maintenance_check_id(id);
        let position = entry
            .instance
            .checks
            .iter()
            .position(|check| check.id == check_id);
        match (reason.map(truncate_output), position) {
            (None, None) => return Ok((entry.instance.clone(), Changes::default())),
            (Some(reason), Some(n)) => {
                if entry.instance.checks[n].output == reason {
                    return Ok((entry.instance.clone(), Changes::default()));
                }
                entry.instance.checks[n].output = reason;
            }
            (Some(reason), None) => {
                let (check, kind, timing) = maintenance_check(check_id, reason, now);
                entry.instance.checks.push(check);
                entry.kinds.push(kind);
                entry.timings.push(timing);
            }
            (None, Some(n)) => {
                entry.instance.checks.remove(n);
                // Kinds and timings run alongside the checks; guard rather than trust it.
                if n < entry.kinds.len() {
                    entry.kinds.remove(n);
                }
                if n < entry.timings.len() {
                    entry.timings.remove(n);
                }
            }
        }
        entry.instance.status = aggregate(&entry.instance.checks);
        entry.instance.modify_index = next;
        let instance = entry.instance.clone();
        self.index = next;
        if let Some(service_entry) = self.services.get_mut(&service) {
            service_entry.index = next;
            service_entry.changed_at = now;
        }
        let mut changes = Changes::default();
        changes.services.insert(service, next);
        Ok((instance, changes))
    }

    /// Appends the maintenance check that `id`'s current registration in the same service
    /// has, if any, to its re-registration `instance`; `kinds` and `timings` grow alongside.
    fn keep_maintenance(
        &self,
        id: &str,
        instance: &mut Instance,
        mut kinds: Vec<CheckKind>,
        mut timings: Vec<CheckTiming>,
        now: Instant,
    ) -> (Vec<CheckKind>, Vec<CheckTiming>) {
        let current = self
            .services
            .get(&instance.service)
            .and_then(|entry| entry.instances.get(id));
        if let Some(current) = current
            && let Some(check) = current
                .instance
                .checks
                .iter()
                .find(|check| is_maintenance_check(&check.id))
        {
            let (check, kind, timing) =
                maintenance_check(check.id.clone(), check.output.clone(), now);
            instance.checks.push(check);
            kinds.push(kind);
            timings.push(timing);
        }
        (kinds, timings)
    }
}

/// A maintenance check with its kind and timing, critical from `now`.
fn maintenance_check(
    id: String,
    reason: String,
    now: Instant,
) -> (CheckState, CheckKind, CheckTiming) {
    let check = CheckState {
        id,
        spec: CheckSpec {
            ttl: Some(MAINTENANCE_TTL),
            initial_status: Some(Status::Critical),
            ..CheckSpec::default()
        },
        status: Status::Critical,
        output: reason,
    };
    let timing = CheckTiming {
        renewed: now,
        critical_since: Some(now),
    };
    (
        check,
        CheckKind::Ttl {
            ttl: MAINTENANCE_TTL,
        },
        timing,
    )
}

/// The checks an instance registered, without its maintenance check.
fn registered_checks(instance: &Instance) -> impl Iterator<Item = &CheckState> {
    instance
        .checks
        .iter()
        .filter(|check| !is_maintenance_check(&check.id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CheckSpec, InstanceSpec, Scheme};

    fn spec(checks: Vec<CheckSpec>) -> InstanceSpec {
        InstanceSpec {
            address: "127.0.0.1".into(),
            port: 9000,
            scheme: Scheme::Http,
            tags: vec!["blue".into()],
            version: None,
            zone: Some("a".into()),
            weight: 1,
            meta: BTreeMap::new(),
            checks,
        }
    }

    fn ttl(seconds: u64, deregister_after: Option<u64>) -> CheckSpec {
        CheckSpec {
            ttl: Some(Duration::from_secs(seconds)),
            deregister_after: deregister_after.map(Duration::from_secs),
            ..CheckSpec::default()
        }
    }

    fn reg(service: &str, id: &str, checks: Vec<CheckSpec>) -> Registration {
        Registration {
            service: service.into(),
            id: id.into(),
            spec: spec(checks),
        }
    }

    fn catalog() -> Catalog {
        Catalog::new(100, 1000)
    }

    #[test]
    fn register_moves_only_that_services_index() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        let (_, changes) = catalog
            .register(reg("web", "web-1", vec![]), false, t0)
            .expect("register");
        let web_index = changes.services["web"];
        let (_, changes) = catalog
            .register(reg("api", "api-1", vec![]), false, t0)
            .expect("register");
        assert!(changes.services.contains_key("api"));
        assert!(!changes.services.contains_key("web"));
        assert_eq!(catalog.service_index("web"), Some(web_index));
        assert!(catalog.index() > web_index);
    }

    #[test]
    fn ttl_expiry_turns_critical_then_evicts_after_deadline() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![ttl(10, Some(30))]), false, t0)
            .expect("register");
        assert_eq!(
            catalog.instance("web-1").map(|i| i.status),
            Some(Status::Passing)
        );

        let sweep = catalog.sweep(t0 + Duration::from_secs(9));
        assert_eq!(sweep.expired, 0);

        let sweep = catalog.sweep(t0 + Duration::from_secs(11));
        assert_eq!(sweep.expired, 1);
        let instance = catalog.instance("web-1").expect("still there");
        assert_eq!(instance.status, Status::Critical);
        assert_eq!(instance.checks[0].output, "TTL expired");

        let sweep = catalog.sweep(t0 + Duration::from_secs(40));
        assert!(sweep.evicted.is_empty(), "critical for 29s only");
        let sweep = catalog.sweep(t0 + Duration::from_secs(41));
        assert_eq!(sweep.evicted, vec![("web".into(), "web-1".into())]);
        assert!(catalog.instance("web-1").is_none());
        assert_eq!(sweep.changes.removed, vec!["web-1".to_string()]);
    }

    #[test]
    fn heartbeat_renews_and_revives() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![ttl(10, None)]), false, t0)
            .expect("register");
        catalog
            .heartbeat("web-1", None, None, t0 + Duration::from_secs(8))
            .expect("heartbeat");
        assert_eq!(catalog.sweep(t0 + Duration::from_secs(15)).expired, 0);
        assert_eq!(catalog.sweep(t0 + Duration::from_secs(19)).expired, 1);
        let index = catalog.service_index("web");
        let (instance, changes) = catalog
            .heartbeat("web-1", None, None, t0 + Duration::from_secs(20))
            .expect("revive");
        assert_eq!(instance.status, Status::Passing);
        assert_eq!(instance.checks[0].output, "", "no longer says it expired");
        assert!(catalog.service_index("web") > index);
        assert!(!changes.services.is_empty());
    }

    #[test]
    fn a_plain_renewal_does_not_move_the_index() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![ttl(10, None)]), false, t0)
            .expect("register");
        let index = catalog.index();
        let (_, changes) = catalog
            .heartbeat("web-1", None, None, t0 + Duration::from_secs(1))
            .expect("heartbeat");
        assert_eq!(catalog.index(), index);
        assert!(changes.services.is_empty());
    }

    #[test]
    fn unknown_heartbeat_is_not_found() {
        let mut catalog = catalog();
        let error = catalog
            .heartbeat("ghost", None, None, Instant::now())
            .expect_err("unknown");
        assert!(matches!(error, CatalogError::NotFound(_)));
    }

    #[test]
    fn reregistering_the_same_spec_keeps_state_and_index() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![ttl(10, None)]), false, t0)
            .expect("register");
        let index = catalog.index();
        let (instance, changes) = catalog
            .register(reg("web", "web-1", vec![ttl(10, None)]), false, t0)
            .expect("again");
        assert_eq!(catalog.index(), index);
        assert!(changes.services.is_empty());
        assert_eq!(instance.create_index, index);
    }

    #[test]
    fn id_under_another_service_conflicts_or_moves() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "x-1", vec![]), false, t0)
            .expect("register");
        let error = catalog
            .register(reg("api", "x-1", vec![]), false, t0)
            .expect_err("conflict");
        assert!(matches!(error, CatalogError::Conflict(_)));
        let (_, changes) = catalog
            .register(reg("api", "x-1", vec![]), true, t0)
            .expect("moves");
        assert!(changes.services.contains_key("web") && changes.services.contains_key("api"));
        assert!(
            catalog
                .instances("web", &InstanceFilter::default())
                .instances
                .is_empty()
        );
        assert_eq!(catalog.services().services.len(), 1);
    }

    #[test]
    fn filters_and_order() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        for id in ["web-3", "web-1", "web-2"] {
            catalog
                .register(reg("web", id, vec![ttl(10, None)]), false, t0)
                .expect("register");
        }
        catalog
            .update_check("service:web-2", Status::Critical, None, t0)
            .expect("fail");
        let all = catalog.instances("web", &InstanceFilter::default());
        let ids: Vec<_> = all.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["web-1", "web-2", "web-3"]);
        let passing = catalog.instances(
            "web",
            &InstanceFilter {
                passing_only: true,
                ..InstanceFilter::default()
            },
        );
        assert_eq!(passing.instances.len(), 2);
        let none = catalog.instances(
            "web",
            &InstanceFilter {
                tag: Some("green".into()),
                ..InstanceFilter::default()
            },
        );
        assert!(none.instances.is_empty());
        let zone = catalog.instances(
            "web",
            &InstanceFilter {
                zone: Some("a".into()),
                ..InstanceFilter::default()
            },
        );
        assert_eq!(zone.instances.len(), 3);
    }

    #[test]
    fn limits_are_enforced() {
        let mut catalog = Catalog::new(2, 3);
        let t0 = Instant::now();
        catalog
            .register(reg("a", "a-1", vec![]), false, t0)
            .expect("1");
        catalog
            .register(reg("a", "a-2", vec![]), false, t0)
            .expect("2");
        let error = catalog
            .register(reg("a", "a-3", vec![]), false, t0)
            .expect_err("per service");
        assert!(matches!(error, CatalogError::Limit(_)));
        catalog
            .register(reg("b", "b-1", vec![]), false, t0)
            .expect("3");
        let error = catalog
            .register(reg("c", "c-1", vec![]), false, t0)
            .expect_err("total");
        assert!(matches!(error, CatalogError::Limit(_)));
    }

    #[test]
    fn active_checks_start_critical_and_worst_check_wins() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        let http = CheckSpec {
            http: Some("http://127.0.0.1:1/health".into()),
            interval: Some(Duration::from_secs(1)),
            ..CheckSpec::default()
        };
        let (instance, _) = catalog
            .register(reg("web", "web-1", vec![ttl(10, None), http]), false, t0)
            .expect("register");
        assert_eq!(instance.checks[0].id, "service:web-1:1");
        assert_eq!(instance.checks[1].id, "service:web-1:2");
        assert_eq!(instance.status, Status::Critical);
        let (instance, _) = catalog
            .update_check("service:web-1:2", Status::Warning, Some("slow".into()), t0)
            .expect("probe");
        assert_eq!(instance.status, Status::Warning);
    }

    #[test]
    fn emptied_services_leave_the_list_but_keep_their_index_for_a_while() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![]), false, t0)
            .expect("register");
        catalog.deregister("web-1", t0).expect("deregister");
        assert!(catalog.services().services.is_empty());
        let index = catalog.service_index("web").expect("kept");
        assert_eq!(
            catalog.instances("web", &InstanceFilter::default()).index,
            index
        );
        catalog.sweep(t0 + EMPTY_SERVICE_RETENTION + Duration::from_secs(1));
        assert_eq!(catalog.service_index("web"), None);
    }

    #[test]
    fn maintenance_adds_a_critical_check_and_moves_the_index_once() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![ttl(10, Some(30))]), false, t0)
            .expect("register");
        let before = catalog.service_index("web").expect("index");

        let (instance, changes) = catalog
            .set_maintenance("web-1", Some("deploying".into()), t0)
            .expect("enable");
        assert_eq!(instance.status, Status::Critical);
        assert_eq!(instance.maintenance(), Some("deploying"));
        let check = &instance.checks[1];
        assert_eq!(check.id, "_service_maintenance:web-1");
        assert_eq!(check.output, "deploying");
        assert!(
            check.spec.validate().is_ok(),
            "a shared backend re-validates it"
        );
        let during = changes.services["web"];
        assert!(during > before);
        assert_eq!(catalog.service_index("web"), Some(during));
        let passing = InstanceFilter {
            passing_only: true,
            ..InstanceFilter::default()
        };
        assert!(catalog.instances("web", &passing).instances.is_empty());

        // The same reason again changes nothing; a new reason is a change.
        let (_, changes) = catalog
            .set_maintenance("web-1", Some("deploying".into()), t0)
            .expect("again");
        assert!(changes.services.is_empty());
        let (instance, changes) = catalog
            .set_maintenance("web-1", Some("rollback".into()), t0)
            .expect("new reason");
        assert_eq!(instance.maintenance(), Some("rollback"));
        assert!(changes.services["web"] > during);

        let (instance, changes) = catalog.set_maintenance("web-1", None, t0).expect("disable");
        assert_eq!(instance.status, Status::Passing);
        assert_eq!(instance.maintenance(), None);
        assert_eq!(instance.checks.len(), 1);
        assert!(!changes.services.is_empty());
        assert_eq!(catalog.instances("web", &passing).instances.len(), 1);
        let (_, changes) = catalog
            .set_maintenance("web-1", None, t0)
            .expect("disable again");
        assert!(changes.services.is_empty());
    }

    #[test]
    fn maintenance_survives_heartbeats_sweeps_and_reregistration() {
        let mut catalog = catalog();
        let t0 = Instant::now();
        catalog
            .register(reg("web", "web-1", vec![ttl(10, Some(30))]), false, t0)
            .expect("register");
        catalog
            .set_maintenance("web-1", Some("drain".into()), t0)
            .expect("enable");

        let (instance, _) = catalog
            .heartbeat("web-1", None, None, t0 + Duration::from_secs(5))
            .expect("heartbeat");
        assert_eq!(instance.checks[0].status, Status::Passing);
        assert_eq!(instance.maintenance(), Some("drain"));
        assert_eq!(instance.status, Status::Critical);
        assert!(matches!(
            catalog.update_check("_service_maintenance:web-1", Status::Passing, None, t0),
            Err(CatalogError::NotFound(_))
        ));

        // Renewed in time: the sweeper neither expires nor evicts anything.
        catalog
            .heartbeat("web-1", None, None, t0 + Duration::from_secs(40))
            .expect("heartbeat");
        let sweep = catalog.sweep(t0 + Duration::from_secs(45));
        assert_eq!((sweep.expired, sweep.evicted.len()), (0, 0));

        // The same spec again is a renewal that keeps the maintenance check.
        let index = catalog.index();
        let (instance, changes) = catalog
            .register(reg("web", "web-1", vec![ttl(10, Some(30))]), false, t0)
            .expect("same spec");
        assert!(changes.services.is_empty());
        assert_eq!(catalog.index(), index);
        assert_eq!(instance.maintenance(), Some("drain"));

        // A changed spec is a new registration, still under maintenance.
        let (instance, _) = catalog
            .register(reg("web", "web-1", vec![ttl(20, Some(30))]), false, t0)
            .expect("new spec");
        assert_eq!(instance.checks.len(), 2);
        assert_eq!(instance.maintenance(), Some("drain"));
        assert_eq!(instance.status, Status::Critical);

        // Deregistration ends it, and the next registration starts without it.
        catalog.deregister("web-1", t0).expect("deregister");
        let (instance, _) = catalog
            .register(reg("web", "web-1", vec![]), false, t0)
            .expect("register again");
        assert_eq!(instance.maintenance(), None);
        assert!(matches!(
            catalog.set_maintenance("ghost", Some("x".into()), t0),
            Err(CatalogError::NotFound(_))
        ));
    }
}
