//! The whole configuration: one section per component, plus telemetry.

use std::path::{Path, PathBuf};

use keel_auth::AuthConfig;
use keel_gateway::GatewayConfig;
use keel_gateway::server::ConfigSource;
use keel_registry::RegistryConfig;
use keel_runtime::config::{self, ConfigError};
use keel_runtime::telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeelConfig {
    pub runtime: RuntimeConfig,
    pub telemetry: TelemetryConfig,
    pub registry: RegistryConfig,
    pub gateway: GatewayConfig,
    pub auth: AuthConfig,
    /// The reference shop's services (`keel up` fills in the registry and issuer).
    pub catalog: keel_sdk::ServiceConfig,
    pub inventory: keel_sdk::ServiceConfig,
    pub payments: keel_sdk::ServiceConfig,
    /// The simulated provider payments are made with.
    pub payment_provider: keel_payments::provider::ProviderConfig,
    pub orders: keel_sdk::ServiceConfig,
    /// Where orders finds the catalog, and how long the order saga's steps may take.
    pub orders_settings: keel_orders::OrdersOptions,
}

/// `[runtime]`: the async runtime the process runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run requests; unset = one per core (or `TOKIO_WORKER_THREADS`). With
    /// one, the process runs on a single-threaded event loop (as an NGINX worker does),
    /// which saves the work-stealing scheduler's cross-thread handoffs.
    pub worker_threads: Option<usize>,
    /// A PEM file of certificate authorities trusted, beside the system's roots, by every
    /// HTTPS client the process makes (the issuer's metadata and keys, the registry,
    /// services, the trace collector): a private CA's certificate. `SSL_CERT_FILE` instead
    /// replaces the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: a PEM certificate chain (leaf first) that every HTTPS client the
    /// process makes presents to servers asking for one (`client_ca` of a server's
    /// `[….http.tls]` or of `[gateway.tls]`), with its private key in `client_key`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RuntimeConfig {
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let threads = match self.worker_threads {
            Some(threads) => Some(threads),
            None => env_worker_threads()?,
        };
        match threads {
            Some(1) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Some(n) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n.max(1))
                .enable_all()
                .build(),
            None => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
        }
    }
}

/// `TOKIO_WORKER_THREADS`, when set. tokio reads it again and panics on what it cannot
/// use: refused here first.
fn env_worker_threads() -> std::io::Result<Option<usize>> {
    let Ok(value) = std::env::var("TOKIO_WORKER_THREADS") else {
        return Ok(None);
    };
    match value.trim().parse::<usize>() {
        Ok(threads) if threads > 0 => Ok(Some(threads)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("TOKIO_WORKER_THREADS={value:?} is not a number of threads above 0"),
        )),
    }
}

impl KeelConfig {
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        config::load(file)
    }

    /// How `keel gateway` and `keel up` reload the gateway's routes: the same file and
    /// environment, read again. Without a file there is nothing to watch.
    pub fn gateway_source(file: Option<&Path>) -> Option<ConfigSource> {
        let path = file?.to_path_buf();
        let load_path = path.clone();
        Some(ConfigSource {
            path,
            load: Box::new(move || {
                Self::load(Some(&load_path))
                    .map(|config| config.gateway)
                    .map_err(|error| error.to_string())
            }),
        })
    }

    /// `keel config`: the effective configuration as TOML, secrets redacted.
    pub fn print(&self) -> anyhow::Result<()> {
        print!("{}", config::to_toml(self)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_round_trip_through_toml() {
        let printed = config::to_toml(&KeelConfig::default()).expect("renders");
        let parsed: KeelConfig = config::from_toml(&printed).expect("parses back");
        assert_eq!(parsed, KeelConfig::default());
    }

    #[test]
    fn a_route_using_every_action_round_trips() {
        let toml = r#"
            [[gateway.routes]]
            name = "orders"
            match = { path_template = "/api/orders/{id}", methods = ["GET"] }
            upstreams = ["http://127.0.0.1:9000", { url = "http://127.0.0.1:9001", weight = 3 }]
            rewrite = "/orders/{id}"
            balance = { hash = { cookie = "session" } }
            retry = { attempts = 1, per_try_timeout = "250ms" }
            outlier = { consecutive_failures = 3 }
            circuit_breaker = { max_concurrent = 10 }

            [[gateway.routes]]
            name = "old"
            match = { path_prefix = "/old" }
            redirect = { location = "/new", status = 301 }
        "#;
        let parsed: KeelConfig = config::from_toml(toml).expect("parses");
        let printed = config::to_toml(&parsed).expect("renders");
        let again: KeelConfig = config::from_toml(&printed).expect("parses back");
        assert_eq!(again, parsed);
        assert_eq!(parsed.gateway.routes[0].upstreams[1].weight(), 3);
    }

    #[test]
    fn a_secret_is_redacted_when_printed() {
        let parsed: KeelConfig =
            config::from_toml("[registry]\nacl_token = \"s3cret-token\"\n").expect("parses");
        let printed = config::to_toml(&parsed).expect("renders");
        assert!(!printed.contains("s3cret-token"));
        assert!(printed.contains("acl_token = \"<redacted>\""));
    }
}
