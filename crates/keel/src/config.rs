//! The whole configuration: one section per component, plus telemetry.

use std::path::Path;

use keel_gateway::GatewayConfig;
use keel_registry::RegistryConfig;
use keel_runtime::config::{self, ConfigError};
use keel_runtime::telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeelConfig {
    pub telemetry: TelemetryConfig,
    pub registry: RegistryConfig,
    pub gateway: GatewayConfig,
}

impl KeelConfig {
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        config::load(file)
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
    fn a_secret_is_redacted_when_printed() {
        let parsed: KeelConfig =
            config::from_toml("[registry]\nacl_token = \"s3cret-token\"\n").expect("parses");
        let printed = config::to_toml(&parsed).expect("renders");
        assert!(!printed.contains("s3cret-token"));
        assert!(printed.contains("acl_token = \"<redacted>\""));
    }
}
