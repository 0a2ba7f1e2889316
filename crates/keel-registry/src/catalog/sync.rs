//! Driving the catalog from a shared backend (etcd) instead of local writes.
//!
//! With a shared backend the catalog is each replica's read model: the backend's watch
//! stream sets instances exactly as stored, at the backend's revision, so every replica
//! reports the same indexes. Writes are computed on a [`Catalog::scratch`] copy holding only
//! the instance concerned (the same rules as a local write), then stored.

use std::time::{Duration, Instant};

use super::{Catalog, CatalogError, Changes, CheckTiming, Entry, ServiceEntry, aggregate};
use crate::model::{CheckKind, Instance, Registration, Status, is_maintenance_check};

impl Catalog {
    /// A catalog holding only `instance`, without limits, to compute what an operation
    /// does to it.
    pub fn scratch(instance: Option<&Instance>, now: Instant) -> Catalog {
        let mut catalog = Catalog::new(usize::MAX, usize::MAX);
        if let Some(instance) = instance {
            catalog.sync_instance(instance.clone(), instance.modify_index, now);
        }
        catalog
    }

    /// Refuses a registration that would conflict with what the catalog holds (an id under
    /// another service without `move_service`, a check id owned by another instance) or
    /// exceed its limits.
    pub fn admit(
        &self,
        registration: &Registration,
        move_service: bool,
    ) -> Result<(), CatalogError> {
        let Registration { service, id, spec } = registration;
        for check in &spec.checks {
            check.kind().map_err(CatalogError::Invalid)?;
        }
        let check_ids = super::check_ids(id, &spec.checks);
        for (n, check_id) in check_ids.iter().enumerate() {
            if check_ids[..n].contains(check_id) {
                return Err(CatalogError::Invalid(format!(
                    "check id {check_id:?} is used twice"
                )));
            }
            if let Some(owner) = self.check_owner.get(check_id)
                && owner != id
            {
                return Err(CatalogError::Conflict(format!(
                    "check id {check_id:?} belongs to instance {owner:?}"
                )));
            }
        }
        let current = self.instance_service.get(id);
        if let Some(current) = current
            && current != service
            && !move_service
        {
            return Err(CatalogError::Conflict(format!(
                "instance id {id:?} is registered under service {current:?}"
            )));
        }
        if current != Some(service) {
            let in_service = self
                .services
                .get(service)
                .map_or(0, |entry| entry.instances.len());
            if in_service >= self.max_instances_per_service {
                return Err(CatalogError::Limit(format!(
                    "service {service:?} has the maximum of {} instances",
                    self.max_instances_per_service
                )));
            }
            if current.is_none() && self.instance_service.len() >= self.max_instances {
                return Err(CatalogError::Limit(format!(
                    "the registry holds its maximum of {} instances",
                    self.max_instances
                )));
            }
        }
        Ok(())
    }

    /// Sets `instance` exactly as given (checks, statuses, outputs) at `index`; moves the
    /// service's index only when something differs.
    pub fn sync_instance(&mut self, mut instance: Instance, index: u64, now: Instant) -> Changes {
        let mut changes = Changes::default();
        let kinds: Result<Vec<CheckKind>, String> = instance
            .checks
            .iter()
            .map(|check| check.spec.kind())
            .collect();
        let Ok(kinds) = kinds else {
            // Written by a registry after validation; anything else is not ours to serve.
            tracing::warn!(instance = %instance.id, "stored instance has an invalid check; ignored");
            return changes;
        };
        self.index = self.index.max(index);
        if let Some(previous) = self.instance_service.get(&instance.id).cloned()
            && previous != instance.service
        {
            changes.merge(self.sync_remove(&instance.id, index, now));
        }
        instance.status = aggregate(&instance.checks);
        let existing = self
            .services
            .get(&instance.service)
            .and_then(|entry| entry.instances.get(&instance.id));
        if let Some(existing) = existing {
            let mut same = existing.instance.clone();
            same.create_index = instance.create_index;
            same.modify_index = instance.modify_index;
            if same == instance {
                return changes;
            }
        }
        let spec_changed = existing.is_none_or(|existing| {
            existing
                .instance
                .checks
                .iter()
                .map(|c| &c.spec)
                .ne(instance.checks.iter().map(|c| &c.spec))
        });
        let timings = instance
            .checks
            .iter()
            .map(|check| {
                let before = existing.and_then(|existing| {
                    existing
                        .instance
                        .checks
                        .iter()
                        .position(|c| c.id == check.id)
                        .map(|n| (&existing.instance.checks[n], &existing.timings[n]))
                });
                let critical_since = match before {
                    Some((old, timing)) if old.status == Status::Critical => timing.critical_since,
                    _ => None,
                };
                CheckTiming {
                    renewed: now,
                    critical_since: (check.status == Status::Critical)
                        .then(|| critical_since.unwrap_or(now)),
                }
            })
            .collect();
        instance.create_index = existing.map_or(index, |existing| existing.instance.create_index);
        instance.modify_index = index;
        self.forget_checks(&instance.id);
        for check in &instance.checks {
            self.check_owner
                .insert(check.id.clone(), instance.id.clone());
        }
        self.instance_service
            .insert(instance.id.clone(), instance.service.clone());
        let entry = self
            .services
            .entry(instance.service.clone())
            .or_insert_with(|| ServiceEntry {
                index,
                changed_at: now,
                instances: Default::default(),
            });
        entry.index = index;
        entry.changed_at = now;
        entry.instances.insert(
            instance.id.clone(),
            Entry {
                instance: instance.clone(),
                kinds,
                timings,
            },
        );
        changes.services.insert(instance.service.clone(), index);
        if spec_changed {
            changes.registered.push(instance);
        }
        changes
    }

    /// Removes an instance at `index`; nothing happens for an unknown id.
    pub fn sync_remove(&mut self, id: &str, index: u64, now: Instant) -> Changes {
        self.index = self.index.max(index);
        self.forget_checks(id);
        let Some(service) = self.instance_service.remove(id) else {
            return Changes::default();
        };
        if let Some(entry) = self.services.get_mut(&service) {
            entry.instances.remove(id);
            entry.index = index;
            entry.changed_at = now;
        }
        let mut changes = Changes::default();
        changes.services.insert(service, index);
        changes.removed.push(id.to_owned());
        changes
    }

    /// Moves the global index forward (a backend revision that changed nothing we show).
    pub fn advance_to(&mut self, index: u64) {
        self.index = self.index.max(index);
    }

    /// Instances critical for longer than a check's deregister-after deadline; a shared
    /// backend deletes them from the store and learns of the removal from its watch.
    pub fn overdue(&self, now: Instant) -> Vec<String> {
        self.services
            .values()
            .flat_map(|service| service.instances.values())
            .filter(|entry| {
                entry
                    .instance
                    .checks
                    .iter()
                    .zip(&entry.timings)
                    .any(|(check, timing)| {
                        matches!(
                            (check.spec.deregister_after, timing.critical_since),
                            (Some(after), Some(since)) if now.saturating_duration_since(since) >= after
                        )
                    })
            })
            .map(|entry| entry.instance.id.clone())
            .collect()
    }

    /// TTL durations of an instance's checks by check id, for the backend's leases.
    pub fn ttl_checks(instance: &Instance) -> Vec<(String, Duration)> {
        instance
            .checks
            .iter()
            .filter(|check| !is_maintenance_check(&check.id))
            .filter_map(|check| check.spec.ttl.map(|ttl| (check.id.clone(), ttl)))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::InstanceFilter;
    use crate::model::{CheckSpec, InstanceSpec, Scheme};

    fn registration(id: &str) -> Registration {
        Registration {
            service: "web".into(),
            id: id.into(),
            spec: InstanceSpec {
                address: "127.0.0.1".into(),
                port: 80,
                scheme: Scheme::Http,
                tags: vec![],
                version: None,
                zone: None,
                weight: 1,
                meta: BTreeMap::new(),
                checks: vec![CheckSpec {
                    ttl: Some(Duration::from_secs(10)),
                    deregister_after: Some(Duration::from_secs(30)),
                    ..CheckSpec::default()
                }],
            },
        }
    }

    /// Instance `id` of service `web`, with a TTL check that is deregistered after 30 s.
    pub(crate) fn computed(id: &str) -> Instance {
        let now = Instant::now();
        let mut scratch = Catalog::scratch(None, now);
        scratch
            .register(registration(id), false, now)
            .expect("scratch register")
            .0
    }

    #[test]
    fn synced_instances_take_the_backend_revision_as_index() {
        let mut catalog = Catalog::new(10, 10);
        let t0 = Instant::now();
        let changes = catalog.sync_instance(computed("web-1"), 500, t0);
        assert_eq!(changes.services["web"], 500);
        assert_eq!(catalog.index(), 500);
        assert_eq!(catalog.service_index("web"), Some(500));
        let unchanged = catalog.sync_instance(computed("web-1"), 501, t0);
        assert!(unchanged.services.is_empty(), "same state, no change");
        assert_eq!(catalog.service_index("web"), Some(500));

        let mut critical = computed("web-1");
        critical.checks[0].status = Status::Critical;
        critical.checks[0].output = "TTL expired".into();
        let changes = catalog.sync_instance(critical, 502, t0);
        assert_eq!(changes.services["web"], 502);
        let shown = catalog.instances("web", &InstanceFilter::default());
        assert_eq!(shown.instances[0].status, Status::Critical);
        assert_eq!(shown.instances[0].create_index, 500);
        assert_eq!(shown.instances[0].modify_index, 502);
    }

    #[test]
    fn overdue_lists_instances_critical_past_their_deadline() {
        let mut catalog = Catalog::new(10, 10);
        let t0 = Instant::now();
        let mut critical = computed("web-1");
        critical.checks[0].status = Status::Critical;
        catalog.sync_instance(critical, 2, t0);
        assert!(catalog.overdue(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(catalog.overdue(t0 + Duration::from_secs(30)), vec!["web-1"]);
        let changes = catalog.sync_remove("web-1", 3, t0);
        assert_eq!(changes.removed, vec!["web-1"]);
        assert!(catalog.overdue(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn admit_refuses_conflicts_and_limits_without_changing_anything() {
        let mut catalog = Catalog::new(1, 10);
        let t0 = Instant::now();
        catalog.sync_instance(computed("web-1"), 2, t0);
        let mut other = registration("web-1");
        other.service = "api".into();
        assert!(matches!(
            catalog.admit(&other, false),
            Err(CatalogError::Conflict(_))
        ));
        assert!(catalog.admit(&other, true).is_ok());
        assert!(matches!(
            catalog.admit(&registration("web-2"), false),
            Err(CatalogError::Limit(_))
        ));
        assert!(catalog.admit(&registration("web-1"), false).is_ok());
        assert_eq!(catalog.index(), 2);
    }
}
