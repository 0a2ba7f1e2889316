//! Eureka's register and renew requests, as Keel registrations and check updates.
//!
//! What Eureka sends and Keel does not model (host name, VIP addresses, page URLs, the other
//! port, the data center, the reported status, the client's dirty timestamp) is kept in the
//! instance's metadata under `eureka.*` keys, so a Eureka client reads back what it
//! registered (see [`super::documents`]). Those keys count against the registration's
//! metadata limits.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::status::{EurekaStatus, registered_status};
use crate::model::{
    CheckSpec, Instance, InstanceSpec, Registration, Scheme, Status, is_maintenance_check,
};

/// Eureka's default lease, when a client sends none.
pub(super) const DEFAULT_LEASE: Duration = Duration::from_secs(90);
/// The longest lease Keel's TTL checks can carry.
pub(super) const MAX_LEASE_SECS: u64 = 24 * 3600;
pub(super) const DEFAULT_RENEWAL_SECS: u64 = 30;
pub(super) const DEFAULT_SECURE_PORT: u16 = 443;
pub(super) const DEFAULT_PORT: u16 = 80;
pub(super) const DEFAULT_DATA_CENTER: &str = "MyOwn";

// Metadata keys for what Eureka sends and Keel does not model.
pub(super) const HOST_NAME: &str = "eureka.hostName";
pub(super) const VIP_ADDRESS: &str = "eureka.vipAddress";
pub(super) const SECURE_VIP_ADDRESS: &str = "eureka.secureVipAddress";
pub(super) const HOME_PAGE_URL: &str = "eureka.homePageUrl";
pub(super) const STATUS_PAGE_URL: &str = "eureka.statusPageUrl";
pub(super) const HEALTH_CHECK_URL: &str = "eureka.healthCheckUrl";
pub(super) const SECURE_HEALTH_CHECK_URL: &str = "eureka.secureHealthCheckUrl";
pub(super) const APP_GROUP_NAME: &str = "eureka.appGroupName";
pub(super) const ASG_NAME: &str = "eureka.asgName";
/// The secure port when both ports are enabled (the plain one is the instance's port).
pub(super) const SECURE_PORT: &str = "eureka.securePort";
/// Only when not `MyOwn`.
pub(super) const DATA_CENTER: &str = "eureka.dataCenter";
/// The status the instance registered with, only when not `UP`.
pub(super) const STATUS: &str = "eureka.status";
pub(super) const LAST_DIRTY: &str = "eureka.lastDirtyTimestamp";
/// Only when not Eureka's default of 30 seconds.
pub(super) const RENEWAL_INTERVAL: &str = "eureka.renewalIntervalInSecs";

/// The keys this module owns; a client's own `eureka.*` metadata passes through untouched.
pub(super) const OWN_KEYS: [&str; 14] = [
    HOST_NAME,
    VIP_ADDRESS,
    SECURE_VIP_ADDRESS,
    HOME_PAGE_URL,
    STATUS_PAGE_URL,
    HEALTH_CHECK_URL,
    SECURE_HEALTH_CHECK_URL,
    APP_GROUP_NAME,
    ASG_NAME,
    SECURE_PORT,
    DATA_CENTER,
    STATUS,
    LAST_DIRTY,
    RENEWAL_INTERVAL,
];

/// The string fields kept verbatim, by their Eureka name.
pub(super) const KEPT_FIELDS: [(&str, &str); 9] = [
    ("hostName", HOST_NAME),
    ("vipAddress", VIP_ADDRESS),
    ("secureVipAddress", SECURE_VIP_ADDRESS),
    ("homePageUrl", HOME_PAGE_URL),
    ("statusPageUrl", STATUS_PAGE_URL),
    ("healthCheckUrl", HEALTH_CHECK_URL),
    ("secureHealthCheckUrl", SECURE_HEALTH_CHECK_URL),
    ("appGroupName", APP_GROUP_NAME),
    ("asgName", ASG_NAME),
];

/// The Keel service of a Eureka application: its name in lower case (Eureka shows names in
/// upper case and matches them without regard to case).
pub(super) fn service_name(app: &str) -> String {
    app.to_ascii_lowercase()
}

// === registration ===

/// A registration from a Eureka register body (`{"instance": {…}}`, or the same read from
/// XML) posted to `/eureka/apps/{app}`. The error names the offending field.
///
/// - the path's application is the service (an `app` field must agree with it);
/// - `instanceId`, else `hostName`, is the id (Eureka's own fallback);
/// - `ipAddr`, else `hostName`, is the address clients connect to;
/// - the enabled port is the port: the plain one when it is enabled (with `http`; an also
///   enabled secure port is kept in metadata), the secure one otherwise (with `https`);
/// - `metadata` is the metadata; its `version` and `zone` become Keel's own fields;
/// - the lease (`leaseInfo.durationInSecs`, 90 s by default) is a TTL check of that
///   duration that evicts the instance once it has been expired that long too, as Eureka
///   evicts expired leases;
/// - a reported status other than `UP` adds a second TTL check of the same duration that
///   carries it ([`EurekaStatus::keel_status`]) but never evicts: Eureka keeps a `DOWN`
///   instance that still renews its lease, and so does Keel.
pub(super) fn registration(app: &str, document: &Value) -> Result<Registration, String> {
    let instance = document.get("instance").and_then(Value::as_object).ok_or(
        "the body must be an instance document: {\"instance\": {…}} or <instance>…</instance>",
    )?;
    if let Some(named) = text(instance, "app")?
        && !named.eq_ignore_ascii_case(app)
    {
        return Err(format!(
            "the instance's app {named:?} is not the application {app:?} of the path"
        ));
    }
    let host_name = text(instance, "hostName")?;
    let id = text(instance, "instanceId")?
        .or_else(|| host_name.clone())
        .ok_or("the instance has neither an instanceId nor a hostName")?;
    let address = text(instance, "ipAddr")?
        .or_else(|| host_name.clone())
        .ok_or("the instance has neither an ipAddr nor a hostName")?;

    let mut meta = metadata(instance)?;
    let version = meta.remove("version");
    let zone = meta.remove("zone");
    for (field, key) in KEPT_FIELDS {
        if let Some(value) = text(instance, field)? {
            meta.insert(key.into(), value);
        }
    }

    let plain = port(instance, "port", true)?;
    let secure = port(instance, "securePort", false)?;
    let (port, scheme) = match (plain, secure) {
        (Some((port, true)), secure) => {
            if let Some((secure, true)) = secure {
                meta.insert(SECURE_PORT.into(), secure.to_string());
            }
            (port, Scheme::Http)
        }
        (_, Some((secure, true))) => (secure, Scheme::Https),
        // Neither is enabled: the plain port is the best guess.
        (Some((port, false)), _) => (port, Scheme::Http),
        (None, Some((secure, false))) => (secure, Scheme::Https),
        (None, None) => return Err("the instance has no port".into()),
    };

    let lease_info = match instance.get("leaseInfo") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(lease)) => lease.clone(),
        // `<leaseInfo/>` reads as an empty string.
        Some(Value::String(text)) if text.trim().is_empty() => Map::new(),
        Some(_) => return Err("leaseInfo must be an object".into()),
    };
    let lease = match number(&lease_info, "durationInSecs")? {
        // Eureka falls back to its default for a lease of 0.
        None | Some(0) => DEFAULT_LEASE,
        Some(seconds) if seconds > MAX_LEASE_SECS => {
            return Err(format!(
                "leaseInfo.durationInSecs must be at most {MAX_LEASE_SECS} (24h)"
            ));
        }
        Some(seconds) => Duration::from_secs(seconds),
    };
    if let Some(renewal) = number(&lease_info, "renewalIntervalInSecs")?
        && renewal != DEFAULT_RENEWAL_SECS
    {
        meta.insert(RENEWAL_INTERVAL.into(), renewal.to_string());
    }

    // Eureka reads an unknown status as UNKNOWN.
    let status = text(instance, "status")?
        .map(|name| EurekaStatus::from_name(&name).unwrap_or(EurekaStatus::Unknown))
        .unwrap_or(EurekaStatus::Up);
    if status != EurekaStatus::Up {
        meta.insert(STATUS.into(), status.as_str().into());
    }
    if let Some(data_center) = data_center(instance)?
        && data_center != DEFAULT_DATA_CENTER
    {
        meta.insert(DATA_CENTER.into(), data_center);
    }
    if let Some(dirty) = number(instance, "lastDirtyTimestamp")? {
        meta.insert(LAST_DIRTY.into(), dirty.to_string());
    }

    let mut checks = vec![CheckSpec {
        ttl: Some(lease),
        deregister_after: Some(lease),
        ..CheckSpec::default()
    }];
    if status != EurekaStatus::Up {
        checks.push(CheckSpec {
            ttl: Some(lease),
            initial_status: Some(status.keel_status()),
            ..CheckSpec::default()
        });
    }
    Ok(Registration {
        service: service_name(app),
        id,
        spec: InstanceSpec {
            address,
            port,
            scheme,
            tags: Vec::new(),
            version,
            zone,
            weight: 1,
            meta,
            checks,
        },
    })
}

/// A field as text: strings as they are, numbers and booleans spelled out (Eureka's
/// encoders differ on which is which); absent, null or empty is `None`.
fn text(object: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            let text = text.trim();
            Ok((!text.is_empty()).then(|| text.to_owned()))
        }
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(Value::Bool(flag)) => Ok(Some(flag.to_string())),
        Some(_) => Err(format!("{field} must be text")),
    }
}

/// A field as a whole number, written as a number or as a string.
fn number(object: &Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match text(object, field)? {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| format!("{field} {text:?} must be a whole number")),
    }
}

/// A port wrapper, `{"$": 8080, "@enabled": "true"}` (or a bare number): the port and
/// whether it is enabled, `enabled_by_default` when unsaid.
fn port(
    object: &Map<String, Value>,
    field: &str,
    enabled_by_default: bool,
) -> Result<Option<(u16, bool)>, String> {
    let (number, enabled) = match object.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(wrapper)) => (
            text(wrapper, "$")?,
            match text(wrapper, "@enabled")? {
                None => enabled_by_default,
                Some(flag) => flag.eq_ignore_ascii_case("true"),
            },
        ),
        Some(_) => (text(object, field)?, enabled_by_default),
    };
    let Some(number) = number else {
        return Ok(None);
    };
    let port = number
        .parse::<u16>()
        .map_err(|_| format!("{field} {number:?} is not a port number"))?;
    Ok(Some((port, enabled)))
}

/// `metadata` as a map of strings, without the `@class` marker Eureka's encoders add.
fn metadata(instance: &Map<String, Value>) -> Result<BTreeMap<String, String>, String> {
    let entries = match instance.get("metadata") {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(entries)) => entries,
        // `<metadata/>` reads as an empty string.
        Some(Value::String(text)) if text.trim().is_empty() => return Ok(BTreeMap::new()),
        Some(_) => return Err("metadata must be an object".into()),
    };
    let mut meta = BTreeMap::new();
    for key in entries.keys().filter(|key| key.as_str() != "@class") {
        let value = match entries.get(key) {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Number(number)) => number.to_string(),
            Some(Value::Bool(flag)) => flag.to_string(),
            _ => return Err(format!("metadata {key:?} must be text")),
        };
        meta.insert(key.clone(), value);
    }
    Ok(meta)
}

/// `dataCenterInfo.name`.
fn data_center(instance: &Map<String, Value>) -> Result<Option<String>, String> {
    match instance.get("dataCenterInfo") {
        Some(Value::Object(info)) => text(info, "name"),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.trim().is_empty() => Ok(None),
        Some(_) => Err("dataCenterInfo must be an object".into()),
    }
}

// === renewal ===

/// What a Eureka renewal sets each TTL check of `instance` to: the lease (the check that
/// evicts) passing, any other TTL check the status the instance registered with. A renewal
/// does not change the status, as with Eureka, whose clients register again when theirs
/// changes; the maintenance check is no TTL check to renew.
pub(super) fn renewal(instance: &Instance) -> Vec<(String, Status)> {
    let reported = registered_status(instance).keel_status();
    instance
        .checks
        .iter()
        .filter(|check| check.spec.ttl.is_some() && !is_maintenance_check(&check.id))
        .map(|check| {
            let status = if check.spec.deregister_after.is_some() {
                Status::Passing
            } else {
                reported
            };
            (check.id.clone(), status)
        })
        .collect()
}

/// Whether a renewal's `lastDirtyTimestamp` is newer than the registration's: the client
/// changed since it registered, and a 404 makes it register again (Eureka's rule).
pub(super) fn is_stale(instance: &Instance, last_dirty: Option<&str>) -> bool {
    let registered = instance
        .meta
        .get(LAST_DIRTY)
        .and_then(|dirty| dirty.parse::<u64>().ok());
    let renewing = last_dirty.and_then(|dirty| dirty.parse::<u64>().ok());
    matches!((registered, renewing), (Some(registered), Some(renewing)) if renewing > registered)
}

#[cfg(test)]
pub(super) mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{CheckState, maintenance_check_id};

    /// A register body as Spring Cloud Netflix sends it (shared with the other tests here).
    pub(in crate::api::eureka) fn spring_body() -> Value {
        json!({"instance": {
            "instanceId": "host-1:orders:8080",
            "hostName": "host-1.example",
            "app": "ORDERS",
            "ipAddr": "10.0.0.7",
            "status": "UP",
            "overriddenStatus": "UNKNOWN",
            "port": {"$": 8080, "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "countryId": 1,
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn"
            },
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90},
            "metadata": {"management.port": "8080", "zone": "eu-1a", "version": "2.0.1"},
            "homePageUrl": "http://host-1.example:8080/",
            "statusPageUrl": "http://host-1.example:8080/actuator/info",
            "healthCheckUrl": "http://host-1.example:8080/actuator/health",
            "vipAddress": "orders",
            "secureVipAddress": "orders",
            "isCoordinatingDiscoveryServer": "false",
            "lastUpdatedTimestamp": "1700000000000",
            "lastDirtyTimestamp": "1700000000000"
        }})
    }

    /// What the catalog would make of a registration, without a catalog.
    pub(in crate::api::eureka) fn instance_of(registration: Registration) -> Instance {
        let checks: Vec<CheckState> = registration
            .spec
            .checks
            .iter()
            .enumerate()
            .map(|(n, spec)| CheckState {
                id: format!("service:{}:{}", registration.id, n + 1),
                spec: spec.clone(),
                status: spec.initial_status.unwrap_or(Status::Passing),
                output: String::new(),
            })
            .collect();
        let status = checks
            .iter()
            .map(|check| check.status)
            .max()
            .unwrap_or(Status::Passing);
        Instance {
            service: registration.service,
            id: registration.id,
            address: registration.spec.address,
            port: registration.spec.port,
            scheme: registration.spec.scheme,
            tags: registration.spec.tags,
            version: registration.spec.version,
            zone: registration.spec.zone,
            weight: registration.spec.weight,
            meta: registration.spec.meta,
            status,
            checks,
            create_index: 5,
            modify_index: 5,
        }
    }

    #[test]
    fn a_spring_registration_maps_to_keel() {
        let registration = registration("ORDERS", &spring_body()).expect("maps");
        assert_eq!(registration.service, "orders");
        assert_eq!(registration.id, "host-1:orders:8080");
        let spec = &registration.spec;
        assert_eq!(spec.address, "10.0.0.7");
        assert_eq!((spec.port, spec.scheme), (8080, Scheme::Http));
        assert_eq!(spec.version.as_deref(), Some("2.0.1"));
        assert_eq!(spec.zone.as_deref(), Some("eu-1a"));
        assert_eq!(spec.meta["management.port"], "8080");
        assert_eq!(spec.meta[HOST_NAME], "host-1.example");
        assert_eq!(
            spec.meta[HEALTH_CHECK_URL],
            "http://host-1.example:8080/actuator/health"
        );
        assert_eq!(spec.meta[LAST_DIRTY], "1700000000000");
        assert!(!spec.meta.contains_key(STATUS), "UP is the default");
        assert!(
            !spec.meta.contains_key(SECURE_PORT),
            "the secure port is disabled"
        );
        assert_eq!(
            spec.checks,
            vec![CheckSpec {
                ttl: Some(Duration::from_secs(90)),
                deregister_after: Some(Duration::from_secs(90)),
                ..CheckSpec::default()
            }]
        );
        assert_eq!(
            registration.validate(&crate::model::RegistrationLimits::default()),
            Ok(())
        );
    }

    #[test]
    fn ports_pick_the_scheme() {
        let with = |port: Value, secure: Value| {
            let mut body = spring_body();
            body["instance"]["port"] = port;
            body["instance"]["securePort"] = secure;
            registration("orders", &body).map(|r| (r.spec.port, r.spec.scheme, r.spec.meta))
        };
        let (port, scheme, _) = with(
            json!({"$": "8443", "@enabled": false}),
            json!({"$": 8443, "@enabled": true}),
        )
        .expect("https");
        assert_eq!((port, scheme), (8443, Scheme::Https));
        let (port, scheme, meta) = with(
            json!({"$": 8080, "@enabled": "true"}),
            json!({"$": 8443, "@enabled": "true"}),
        )
        .expect("both");
        assert_eq!((port, scheme), (8080, Scheme::Http));
        assert_eq!(meta[SECURE_PORT], "8443");
        let (port, _, _) = with(json!(9000), Value::Null).expect("bare number");
        assert_eq!(port, 9000);
        assert!(with(json!({"$": 70000}), Value::Null).is_err());
        assert!(with(Value::Null, Value::Null).is_err());
    }

    #[test]
    fn reported_statuses_map_to_checks_that_do_not_evict() {
        for (name, keel) in [
            ("STARTING", Status::Warning),
            ("UNKNOWN", Status::Warning),
            ("whatever", Status::Warning),
            ("DOWN", Status::Critical),
            ("OUT_OF_SERVICE", Status::Critical),
        ] {
            let mut body = spring_body();
            body["instance"]["status"] = json!(name);
            let registration = registration("orders", &body).expect(name);
            let checks = &registration.spec.checks;
            assert_eq!(checks.len(), 2, "{name}");
            assert!(checks[0].deregister_after.is_some());
            assert_eq!(checks[1].deregister_after, None);
            assert_eq!(checks[1].initial_status, Some(keel), "{name}");
        }
    }

    #[test]
    fn malformed_documents_name_the_field() {
        let cases = [
            (json!({"nope": {}}), "instance document"),
            (json!({"instance": {"app": "PAYMENTS"}}), "app"),
            (
                json!({"instance": {"ipAddr": "10.0.0.1", "port": 80}}),
                "instanceId",
            ),
            (
                json!({"instance": {"instanceId": "a", "port": 80}}),
                "ipAddr",
            ),
            (
                json!({"instance": {"hostName": "a", "port": {"$": "x"}}}),
                "port",
            ),
            (
                json!({"instance": {"hostName": "a", "port": 80, "metadata": {"k": {"x": 1}}}}),
                "metadata",
            ),
            (
                json!({"instance": {"hostName": "a", "port": 80, "leaseInfo": {"durationInSecs": "soon"}}}),
                "durationInSecs",
            ),
            (
                json!({"instance": {"hostName": "a", "port": 80, "leaseInfo": {"durationInSecs": 100000}}}),
                "durationInSecs",
            ),
            (
                json!({"instance": {"hostName": ["a"], "port": 80}}),
                "hostName",
            ),
        ];
        for (body, needle) in cases {
            let error = registration("orders", &body).expect_err(needle);
            assert!(error.contains(needle), "{error:?} should name {needle}");
        }
    }

    #[test]
    fn renewals_keep_the_registered_status_and_skip_maintenance() {
        let mut body = spring_body();
        body["instance"]["status"] = json!("DOWN");
        let mut instance = instance_of(registration("orders", &body).expect("maps"));
        instance.checks.push(CheckState {
            id: maintenance_check_id(&instance.id),
            spec: CheckSpec {
                ttl: Some(Duration::from_secs(60)),
                ..CheckSpec::default()
            },
            status: Status::Critical,
            output: String::new(),
        });
        let id = &instance.id;
        assert_eq!(
            renewal(&instance),
            vec![
                (format!("service:{id}:1"), Status::Passing),
                (format!("service:{id}:2"), Status::Critical),
            ]
        );
        assert!(!is_stale(&instance, Some("1700000000000")));
        assert!(!is_stale(&instance, None));
        assert!(!is_stale(&instance, Some("garbage")));
        assert!(is_stale(&instance, Some("1700000000001")));
    }
}
