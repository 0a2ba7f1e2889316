//! The registry's wire types and their validation, shared by the server, the client and
//! the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Health of a check or an instance; an instance is as healthy as its worst check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

/// How the registry learns an instance's health (the validated form of a [`CheckSpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// The instance heartbeats at least once per `ttl`.
    Ttl { ttl: Duration },
    /// The registry GETs `url`: 2xx is passing, 429 warning, anything else critical.
    Http {
        url: String,
        interval: Duration,
        timeout: Duration,
        /// An `https` URL's certificate is not checked (Consul's `TLSSkipVerify`).
        skip_verify: bool,
    },
    /// The registry opens a TCP connection to `address` (`host:port`).
    Tcp {
        address: String,
        interval: Duration,
        timeout: Duration,
    },
}

/// A health check as registered: exactly one of `ttl`, `http` or `tcp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Unique across the registry; defaults to `service:<instance id>` (Consul's scheme).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// URL probed with GET (`http://` or `https://`; the certificate checked against the
    /// system's roots and the configured CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// An `https` check's certificate is not verified (Consul's `TLSSkipVerify`): for
    /// instances with self-signed certificates. Only for `http` checks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_skip_verify: bool,
    /// `host:port` probed with a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Probe interval of an active check (default 10s).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// Probe timeout of an active check (default the smaller of 5s and the interval).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Remove the instance once this check has been critical this long.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub deregister_after: Option<Duration>,
    /// Status until the first heartbeat or probe; passing when unset for TTL checks (the
    /// registration itself is a sign of life), critical for active checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_status: Option<Status>,
}

const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What an instance registers (native API body; the service and id come from the path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub scheme: Scheme,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Relative share of traffic for weighted balancing, 1 to 10,000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
}

fn default_weight() -> u32 {
    1
}

/// A complete registration: who, where, and how its health is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub service: String,
    pub id: String,
    pub spec: InstanceSpec,
}

/// The state of one check of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckState {
    pub id: String,
    pub spec: CheckSpec,
    pub status: Status,
    #[serde(default)]
    pub output: String,
}

/// A registered instance as the registry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub scheme: Scheme,
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub weight: u32,
    pub meta: BTreeMap<String, String>,
    /// The worst status of the instance's checks; passing without checks.
    pub status: Status,
    pub checks: Vec<CheckState>,
    /// Registry index at which the instance was first registered.
    pub create_index: u64,
    /// Registry index of the instance's last change.
    pub modify_index: u64,
}

impl Instance {
    /// `scheme://address:port`, bracketing IPv6 addresses.
    pub fn base_url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("{scheme}://[{}]:{}", self.address, self.port)
        } else {
            format!("{scheme}://{}:{}", self.address, self.port)
        }
    }

    /// Why the instance is in maintenance (its maintenance check's output), if it is.
    pub fn maintenance(&self) -> Option<&str> {
        self.checks
            .iter()
            .find(|check| is_maintenance_check(&check.id))
            .map(|check| check.output.as_str())
    }
}

/// Prefix of the synthetic check that holds an instance in maintenance (Consul's own id).
/// Registered check ids start with a letter or digit, so none can take this one's place.
pub const MAINTENANCE_CHECK_PREFIX: &str = "_service_maintenance:";

/// The id of `instance_id`'s maintenance check.
pub fn maintenance_check_id(instance_id: &str) -> String {
    format!("{MAINTENANCE_CHECK_PREFIX}{instance_id}")
}

/// Whether a check is a maintenance check rather than one the instance registered.
pub fn is_maintenance_check(check_id: &str) -> bool {
    check_id.starts_with(MAINTENANCE_CHECK_PREFIX)
}

/// One line of the service list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub instances: usize,
    pub passing: usize,
    pub tags: Vec<String>,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceList {
    pub index: u64,
    pub services: Vec<ServiceSummary>,
}

/// `GET /v1/services/{service}` and each event of its watch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInstances {
    pub index: u64,
    pub service: String,
    pub instances: Vec<Instance>,
}

/// Body of a heartbeat: optional status and output (a plain renewal sends neither).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

// === validation ===

/// Size limits on what one registration may carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationLimits {
    pub max_tags: usize,
    pub max_meta_entries: usize,
    pub max_meta_value_len: usize,
    pub max_checks: usize,
}

impl Default for RegistrationLimits {
    fn default() -> Self {
        Self {
            max_tags: 64,
            max_meta_entries: 64,
            max_meta_value_len: 512,
            max_checks: 8,
        }
    }
}

const MAX_NAME_LEN: usize = 128;
const MAX_ADDRESS_LEN: usize = 253;
const MAX_OUTPUT_LEN: usize = 4096;
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_WEIGHT: u32 = 10_000;

/// Service names: letters, digits, `-`, `_`, `.`; starting with a letter or digit.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    validate_token("service name", name, &['-', '_', '.'])
}

/// Instance and check ids also allow `:` (Eureka's `host:app:port`, Consul's `service:id`).
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    validate_token(what, id, &['-', '_', '.', ':'])
}

fn validate_token(what: &str, text: &str, extra: &[char]) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if text.len() > MAX_NAME_LEN {
        return Err(format!("{what} is longer than {MAX_NAME_LEN} bytes"));
    }
    let mut chars = text.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
    {
        return Err(format!(
            "{what} {text:?} must start with a letter or digit and contain only letters, digits and {}",
            extra
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    Ok(())
}

/// Limits a check's free-text output so a chatty check cannot grow the catalog.
pub fn truncate_output(mut output: String) -> String {
    if output.len() > MAX_OUTPUT_LEN {
        let mut cut = MAX_OUTPUT_LEN;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        output.truncate(cut);
    }
    output
}

impl Registration {
    /// Checks every field; the message names the first bad one.
    pub fn validate(&self, limits: &RegistrationLimits) -> Result<(), String> {
        validate_service_name(&self.service)?;
        validate_id("instance id", &self.id)?;
        let spec = &self.spec;
        if spec.address.is_empty() || spec.address.len() > MAX_ADDRESS_LEN {
            return Err(format!("address must be 1 to {MAX_ADDRESS_LEN} bytes long"));
        }
        if spec
            .address
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#@".contains(c))
        {
            return Err(format!(
                "address {:?} must be a host name or an IP address",
                spec.address
            ));
        }
        if spec.port == 0 {
            return Err("port must be between 1 and 65535".into());
        }
        if spec.weight == 0 || spec.weight > MAX_WEIGHT {
            return Err(format!("weight must be between 1 and {MAX_WEIGHT}"));
        }
        if spec.tags.len() > limits.max_tags {
            return Err(format!("at most {} tags", limits.max_tags));
        }
        for tag in &spec.tags {
            if tag.is_empty() || tag.len() > MAX_NAME_LEN || tag.chars().any(char::is_control) {
                return Err(format!(
                    "tag {tag:?} must be 1 to {MAX_NAME_LEN} printable bytes"
                ));
            }
        }
        for (label, value) in [("version", &spec.version), ("zone", &spec.zone)] {
            if let Some(value) = value {
                validate_token(label, value, &['-', '_', '.', '+'])?;
            }
        }
        if spec.meta.len() > limits.max_meta_entries {
            return Err(format!(
                "at most {} metadata entries",
                limits.max_meta_entries
            ));
        }
        for (key, value) in &spec.meta {
            validate_token("metadata key", key, &['-', '_', '.'])?;
            if value.len() > limits.max_meta_value_len || value.chars().any(char::is_control) {
                return Err(format!(
                    "metadata value of {key:?} must be at most {} printable bytes",
                    limits.max_meta_value_len
                ));
            }
        }
        if spec.checks.len() > limits.max_checks {
            return Err(format!("at most {} checks", limits.max_checks));
        }
        for check in &spec.checks {
            check.validate()?;
        }
        Ok(())
    }
}

impl CheckSpec {
    pub fn validate(&self) -> Result<(), String> {
        self.kind().map(drop)
    }

    /// The check this spec describes, with defaults applied; the error names the bad field.
    pub fn kind(&self) -> Result<CheckKind, String> {
        if let Some(id) = &self.id {
            validate_id("check id", id)?;
        }
        let probe = || {
            let interval = self.interval.unwrap_or(DEFAULT_INTERVAL);
            let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT.min(interval));
            validate_probe(interval, timeout).map(|()| (interval, timeout))
        };
        if self.tls_skip_verify && self.http.is_none() {
            return Err("tls_skip_verify is for http checks".into());
        }
        match (self.ttl, &self.http, &self.tcp) {
            (Some(ttl), None, None) => {
                if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(24 * 3600) {
                    return Err("check ttl must be between 1s and 24h".into());
                }
                Ok(CheckKind::Ttl { ttl })
            }
            (None, Some(url), None) => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|error| format!("check url {url:?} is not a URL: {error}"))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(format!("check url {url:?} must be http:// or https://"));
                }
                let (interval, timeout) = probe()?;
                Ok(CheckKind::Http {
                    url: url.clone(),
                    interval,
                    timeout,
                    skip_verify: self.tls_skip_verify,
                })
            }
            (None, None, Some(address)) => {
                let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                });
                if !valid {
                    return Err(format!("check tcp address {address:?} must be host:port"));
                }
                let (interval, timeout) = probe()?;
                Ok(CheckKind::Tcp {
                    address: address.clone(),
                    interval,
                    timeout,
                })
            }
            _ => Err("a check has exactly one of ttl, http or tcp".into()),
        }
    }
}

fn validate_probe(interval: Duration, timeout: Duration) -> Result<(), String> {
    if interval < MIN_INTERVAL || interval > Duration::from_secs(3600) {
        return Err("check interval must be between 100ms and 1h".into());
    }
    if timeout.is_zero() || timeout > interval {
        return Err("check timeout must be positive and at most the interval".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> Registration {
        Registration {
            service: "orders".into(),
            id: "orders-1".into(),
            spec: InstanceSpec {
                address: "127.0.0.1".into(),
                port: 8104,
                scheme: Scheme::Http,
                tags: vec!["v1".into()],
                version: Some("1.2.0".into()),
                zone: Some("eu-1a".into()),
                weight: 1,
                meta: BTreeMap::new(),
                checks: vec![],
            },
        }
    }

    #[test]
    fn a_sound_registration_passes() {
        assert_eq!(
            registration().validate(&RegistrationLimits::default()),
            Ok(())
        );
    }

    #[test]
    fn hostile_fields_are_rejected_with_the_field_named() {
        let limits = RegistrationLimits::default();
        type Mutation = Box<dyn Fn(&mut Registration)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.service = "../etc".into()), "service name"),
            (Box::new(|r| r.service = "x".repeat(129)), "service name"),
            (Box::new(|r| r.id = "".into()), "instance id"),
            (Box::new(|r| r.spec.port = 0), "port"),
            (Box::new(|r| r.spec.address = "a b".into()), "address"),
            (Box::new(|r| r.spec.address = "".into()), "address"),
            (Box::new(|r| r.spec.weight = 0), "weight"),
            (Box::new(|r| r.spec.tags = vec!["t".into(); 65]), "tags"),
            (
                Box::new(|r| {
                    r.spec.meta = (0..65).map(|i| (format!("k{i}"), "v".into())).collect()
                }),
                "metadata",
            ),
            (
                Box::new(|r| {
                    r.spec.meta.insert("k".into(), "v".repeat(513));
                }),
                "metadata value",
            ),
            (
                Box::new(|r| {
                    r.spec.checks = vec![CheckSpec {
                        http: Some("file:///etc/passwd".into()),
                        ..CheckSpec::default()
                    }]
                }),
                "check url",
            ),
            (
                Box::new(|r| {
                    r.spec.checks = vec![CheckSpec {
                        ttl: Some(Duration::from_millis(10)),
                        ..CheckSpec::default()
                    }]
                }),
                "ttl",
            ),
            (
                Box::new(|r| {
                    r.spec.checks = vec![CheckSpec {
                        ttl: Some(Duration::from_secs(10)),
                        tcp: Some("127.0.0.1:80".into()),
                        ..CheckSpec::default()
                    }]
                }),
                "exactly one",
            ),
        ];
        for (mutate, needle) in cases {
            let mut bad = registration();
            mutate(&mut bad);
            let error = bad.validate(&limits).expect_err(needle);
            assert!(error.contains(needle), "{error:?} should name {needle}");
        }
    }

    #[test]
    fn check_spec_parses_from_json() {
        let spec: CheckSpec =
            serde_json::from_str(r#"{"ttl": "10s", "deregister_after": "1m"}"#).expect("ttl");
        assert_eq!(
            spec.kind(),
            Ok(CheckKind::Ttl {
                ttl: Duration::from_secs(10)
            })
        );
        assert_eq!(spec.deregister_after, Some(Duration::from_secs(60)));
        let http: CheckSpec =
            serde_json::from_str(r#"{"http": "http://127.0.0.1:1/health", "interval": "1s"}"#)
                .expect("http");
        assert_eq!(
            http.kind(),
            Ok(CheckKind::Http {
                url: "http://127.0.0.1:1/health".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                skip_verify: false,
            })
        );
        let unknown = serde_json::from_str::<CheckSpec>(r#"{"ttl": "10s", "tll": "1s"}"#);
        assert!(unknown.is_err());
        let skip: CheckSpec =
            serde_json::from_str(r#"{"ttl": "10s", "tls_skip_verify": true}"#).expect("ttl");
        assert_eq!(
            skip.kind(),
            Err("tls_skip_verify is for http checks".into())
        );
    }

    #[test]
    fn output_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(MAX_OUTPUT_LEN);
        let cut = truncate_output(long);
        assert!(cut.len() <= MAX_OUTPUT_LEN);
    }

    #[test]
    fn base_url_brackets_ipv6() {
        let mut instance = Instance {
            service: "s".into(),
            id: "i".into(),
            address: "::1".into(),
            port: 80,
            scheme: Scheme::Http,
            tags: vec![],
            version: None,
            zone: None,
            weight: 1,
            meta: BTreeMap::new(),
            status: Status::Passing,
            checks: vec![],
            create_index: 1,
            modify_index: 1,
        };
        assert_eq!(instance.base_url(), "http://[::1]:80");
        instance.address = "10.0.0.1".into();
        assert_eq!(instance.base_url(), "http://10.0.0.1:80");
    }
}
