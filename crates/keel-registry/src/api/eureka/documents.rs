//! Keel's instances as the documents a Eureka server answers with, in Eureka's field order.

use std::collections::BTreeMap;

use super::codec::{Doc, Format};
use super::registration::{
    APP_GROUP_NAME, ASG_NAME, DATA_CENTER, DEFAULT_DATA_CENTER, DEFAULT_LEASE, DEFAULT_PORT,
    DEFAULT_RENEWAL_SECS, DEFAULT_SECURE_PORT, HEALTH_CHECK_URL, HOME_PAGE_URL, HOST_NAME,
    LAST_DIRTY, OWN_KEYS, RENEWAL_INTERVAL, SECURE_HEALTH_CHECK_URL, SECURE_PORT,
    SECURE_VIP_ADDRESS, STATUS_PAGE_URL, VIP_ADDRESS,
};
use super::status::{EurekaStatus, eureka_status};
use crate::model::{Instance, Scheme, is_maintenance_check};

/// Eureka's `actionType` of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Added,
    Modified,
}

impl Action {
    /// `ADDED` until the instance first changes, `MODIFIED` after.
    pub(super) fn of(instance: &Instance) -> Action {
        if instance.modify_index == instance.create_index {
            Action::Added
        } else {
            Action::Modified
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Action::Added => "ADDED",
            Action::Modified => "MODIFIED",
        }
    }
}

/// An instance as Eureka's server writes it, in its field order. The timestamps are the
/// client's `lastDirtyTimestamp` where it sent one (Keel keeps no wall-clock time per
/// instance) and 0 otherwise; Eureka's clients only carry them along.
pub(super) fn instance_doc(instance: &Instance, action: Action, format: Format) -> Doc {
    let meta = &instance.meta;
    let kept = |key: &str| meta.get(key).cloned();
    let (status, overridden) = eureka_status(instance);
    let (plain, plain_enabled, secure, secure_enabled) = match instance.scheme {
        Scheme::Http => {
            let secure = kept(SECURE_PORT).and_then(|port| port.parse::<u16>().ok());
            (
                instance.port,
                true,
                secure.unwrap_or(DEFAULT_SECURE_PORT),
                secure.is_some(),
            )
        }
        Scheme::Https => (DEFAULT_PORT, false, instance.port, true),
    };
    let port_doc = |port: u16, enabled: bool| {
        Doc::map(vec![
            ("$", Doc::Number(u64::from(port))),
            ("@enabled", Doc::text(enabled.to_string())),
        ])
    };
    let data_center = kept(DATA_CENTER).unwrap_or_else(|| DEFAULT_DATA_CENTER.into());
    let data_center_doc = if data_center == "Amazon" {
        Doc::map(vec![
            ("@class", Doc::text("com.netflix.appinfo.AmazonInfo")),
            ("name", Doc::text(data_center)),
            ("metadata", Doc::Map(Vec::new())),
        ])
    } else {
        Doc::map(vec![
            (
                "@class",
                Doc::text("com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"),
            ),
            ("name", Doc::text(data_center)),
        ])
    };
    let dirty = kept(LAST_DIRTY)
        .and_then(|dirty| dirty.parse::<u64>().ok())
        .unwrap_or(0);
    let renewal = kept(RENEWAL_INTERVAL)
        .and_then(|seconds| seconds.parse::<u64>().ok())
        .unwrap_or(DEFAULT_RENEWAL_SECS);
    let lease_doc = Doc::map(vec![
        ("renewalIntervalInSecs", Doc::Number(renewal)),
        ("durationInSecs", Doc::Number(lease_secs(instance))),
        ("registrationTimestamp", Doc::Number(dirty)),
        ("lastRenewalTimestamp", Doc::Number(dirty)),
        ("evictionTimestamp", Doc::Number(0)),
        ("serviceUpTimestamp", Doc::Number(dirty)),
    ]);

    let service = instance.service.clone();
    let home_page = kept(HOME_PAGE_URL).unwrap_or_else(|| format!("{}/", instance.base_url()));
    let health_check = kept(HEALTH_CHECK_URL).or_else(|| {
        instance
            .checks
            .iter()
            .find_map(|check| check.spec.http.clone())
    });
    // JSON spells it `overriddenStatus` since Eureka 1.9; XML keeps `overriddenstatus`.
    let overridden_key = match format {
        Format::Json => "overriddenStatus",
        Format::Xml => "overriddenstatus",
    };
    let mut fields = vec![
        ("instanceId", Doc::text(&instance.id)),
        (
            "hostName",
            Doc::text(kept(HOST_NAME).unwrap_or_else(|| instance.address.clone())),
        ),
        ("app", Doc::text(instance.service.to_ascii_uppercase())),
        ("ipAddr", Doc::text(&instance.address)),
        ("status", Doc::text(status.as_str())),
        (overridden_key, Doc::text(overridden.as_str())),
        ("port", port_doc(plain, plain_enabled)),
        ("securePort", port_doc(secure, secure_enabled)),
        ("countryId", Doc::Number(1)),
        ("dataCenterInfo", data_center_doc),
        ("leaseInfo", lease_doc),
        ("metadata", metadata_doc(instance)),
        ("homePageUrl", Doc::text(home_page)),
    ];
    let optional = [
        ("statusPageUrl", kept(STATUS_PAGE_URL)),
        ("healthCheckUrl", health_check),
        ("secureHealthCheckUrl", kept(SECURE_HEALTH_CHECK_URL)),
        ("appGroupName", kept(APP_GROUP_NAME)),
    ];
    fields.extend(
        optional
            .into_iter()
            .filter_map(|(key, value)| value.map(|value| (key, Doc::text(value)))),
    );
    fields.extend([
        (
            "vipAddress",
            Doc::text(kept(VIP_ADDRESS).unwrap_or_else(|| service.clone())),
        ),
        (
            "secureVipAddress",
            Doc::text(kept(SECURE_VIP_ADDRESS).unwrap_or(service)),
        ),
        ("isCoordinatingDiscoveryServer", Doc::text("false")),
        ("lastUpdatedTimestamp", Doc::text(dirty.to_string())),
        ("lastDirtyTimestamp", Doc::text(dirty.to_string())),
        ("actionType", Doc::text(action.as_str())),
    ]);
    if let Some(asg) = kept(ASG_NAME) {
        fields.push(("asgName", Doc::text(asg)));
    }
    Doc::map(fields)
}

/// The lease: the TTL of the check that evicts, else of any TTL check, else Eureka's default.
fn lease_secs(instance: &Instance) -> u64 {
    let ttl_checks = || {
        instance
            .checks
            .iter()
            .filter(|check| check.spec.ttl.is_some() && !is_maintenance_check(&check.id))
    };
    ttl_checks()
        .find(|check| check.spec.deregister_after.is_some())
        .or_else(|| ttl_checks().next())
        .and_then(|check| check.spec.ttl)
        .unwrap_or(DEFAULT_LEASE)
        .as_secs()
}

/// The instance's metadata as Eureka clients registered it: Keel's `version` and `zone`
/// back among it, this module's own keys left out, and Eureka's marker for an empty map.
fn metadata_doc(instance: &Instance) -> Doc {
    let mut meta: BTreeMap<&str, &str> = instance
        .meta
        .iter()
        .filter(|(key, _)| !OWN_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    if let Some(version) = &instance.version {
        meta.insert("version", version);
    }
    if let Some(zone) = &instance.zone {
        meta.insert("zone", zone);
    }
    if meta.is_empty() {
        return Doc::map(vec![(
            "@class",
            Doc::text("java.util.Collections$EmptyMap"),
        )]);
    }
    Doc::Map(
        meta.into_iter()
            .map(|(key, value)| (key.to_owned(), Doc::text(value)))
            .collect(),
    )
}

/// An application: its name in upper case and its instances.
pub(super) fn application_doc(
    service: &str,
    instances: &[Instance],
    action: Option<Action>,
    format: Format,
) -> Doc {
    Doc::map(vec![
        ("name", Doc::text(service.to_ascii_uppercase())),
        (
            "instance",
            Doc::List(
                instances
                    .iter()
                    .map(|instance| {
                        instance_doc(instance, action.unwrap_or(Action::of(instance)), format)
                    })
                    .collect(),
            ),
        ),
    ])
}

/// The applications document of a full fetch or a delta. `version` is `versions__delta`;
/// `action` overrides every instance's `actionType` (a delta's `MODIFIED`).
pub(super) fn applications_doc(
    applications: &[(String, Vec<Instance>)],
    version: u64,
    action: Option<Action>,
    format: Format,
) -> Doc {
    let statuses = applications
        .iter()
        .flat_map(|(_, instances)| instances)
        .map(|instance| eureka_status(instance).0);
    Doc::map(vec![
        ("versions__delta", Doc::text(version.to_string())),
        ("apps__hashcode", Doc::text(apps_hashcode(statuses))),
        (
            "application",
            Doc::List(
                applications
                    .iter()
                    .map(|(service, instances)| application_doc(service, instances, action, format))
                    .collect(),
            ),
        ),
    ])
}

/// Eureka's reconcile hash code: `STATUS_COUNT_` for each status present, sorted by status
/// name (`DOWN_1_UP_2_`); empty for no instances. A client compares it with the one of its
/// own copy after applying a delta and fetches everything when they differ.
pub(super) fn apps_hashcode(statuses: impl Iterator<Item = EurekaStatus>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for status in statuses {
        *counts.entry(status.as_str()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(status, count)| format!("{status}_{count}_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::registration::registration;
    use super::super::registration::tests::{instance_of, spring_body};
    use super::*;

    #[test]
    fn instances_round_trip_what_eureka_clients_sent() {
        let instance = instance_of(registration("orders", &spring_body()).expect("maps"));
        let json = serde_json::to_value(instance_doc(&instance, Action::Added, Format::Json))
            .expect("json");
        let sent = &spring_body()["instance"];
        for field in [
            "instanceId",
            "hostName",
            "app",
            "ipAddr",
            "status",
            "overriddenStatus",
            "port",
            "securePort",
            "countryId",
            "dataCenterInfo",
            "homePageUrl",
            "statusPageUrl",
            "healthCheckUrl",
            "vipAddress",
            "secureVipAddress",
            "isCoordinatingDiscoveryServer",
            "lastUpdatedTimestamp",
            "lastDirtyTimestamp",
        ] {
            assert_eq!(json[field], sent[field], "{field}");
        }
        assert_eq!(json["metadata"], sent["metadata"]);
        assert_eq!(json["leaseInfo"]["durationInSecs"], 90);
        assert_eq!(json["leaseInfo"]["renewalIntervalInSecs"], 30);
        assert_eq!(json["actionType"], "ADDED");
        let xml = serde_json::to_value(instance_doc(&instance, Action::Added, Format::Xml))
            .expect("xml fields");
        assert_eq!(xml["overriddenstatus"], "UNKNOWN");
    }

    #[test]
    fn a_native_instance_reads_as_a_plausible_eureka_instance() {
        let mut instance = instance_of(registration("orders", &spring_body()).expect("maps"));
        instance.meta.clear();
        instance.version = None;
        instance.zone = None;
        instance.scheme = Scheme::Https;
        let json = serde_json::to_value(instance_doc(&instance, Action::Modified, Format::Json))
            .expect("json");
        assert_eq!(json["hostName"], "10.0.0.7");
        assert_eq!(json["securePort"], json!({"$": 8080, "@enabled": "true"}));
        assert_eq!(json["port"]["@enabled"], "false");
        assert_eq!(json["homePageUrl"], "https://10.0.0.7:8080/");
        assert_eq!(json["vipAddress"], "orders");
        assert_eq!(
            json["metadata"],
            json!({"@class": "java.util.Collections$EmptyMap"})
        );
        assert_eq!(json["actionType"], "MODIFIED");
        assert!(json.get("statusPageUrl").is_none());
    }

    #[test]
    fn the_hashcode_counts_statuses_in_name_order() {
        use EurekaStatus::*;
        assert_eq!(apps_hashcode([Up, Down, Up].into_iter()), "DOWN_1_UP_2_");
        assert_eq!(
            apps_hashcode([Up, OutOfService, Starting, Unknown].into_iter()),
            "OUT_OF_SERVICE_1_STARTING_1_UNKNOWN_1_UP_1_"
        );
        assert_eq!(apps_hashcode(std::iter::empty()), "");
    }
}
