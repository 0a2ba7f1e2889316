//! Typed, layered configuration: defaults → TOML file → `KEEL_` environment.
//!
//! Every configuration struct derives `Deserialize` with `#[serde(default, deny_unknown_fields)]`
//! so that a missing key takes its default and an unknown one is an error. Environment
//! variables follow the key path with `__` between levels (`KEEL_REGISTRY__LISTEN`). Only
//! variables containing `__` are read: `KEEL_REQUIRE_SERVICES` and similar process flags are
//! not configuration and must not be rejected as unknown keys.

use std::fmt;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The environment prefix of every configuration variable.
pub const ENV_PREFIX: &str = "KEEL_";

/// A configuration error that names the key, the offending value and where it came from.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Loads `T` from its defaults, then `file` (when given), then the `KEEL_` environment.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, ConfigError> {
    load_from(file, std::env::vars())
}

/// Loads `T` from its defaults, then `file`, then the given environment variables.
///
/// The variables are a parameter so tests pass their own instead of touching the process
/// environment. Only `KEEL_` variables whose name contains `__` are configuration.
pub fn load_from<T: DeserializeOwned>(
    file: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut figment = Figment::new();
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError(format!(
                "configuration file {} does not exist",
                file.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    let mut vars: Vec<EnvVar> = vars.into_iter().filter_map(EnvVar::parse).collect();
    // A stable order makes a conflict between two variables resolve the same way every time.
    vars.sort_by(|a, b| a.name.cmp(&b.name));
    for var in vars {
        figment = figment.merge(var);
    }
    extract(&figment)
}

/// Loads `T` from a TOML string (and nothing else); used by tests and embedded defaults.
pub fn from_toml<T: DeserializeOwned>(toml: &str) -> Result<T, ConfigError> {
    extract(&Figment::new().merge(Toml::string(toml)))
}

fn extract<T: DeserializeOwned>(figment: &Figment) -> Result<T, ConfigError> {
    figment
        .extract::<T>()
        .map_err(|errors| describe(figment, errors))
}

/// One `KEEL_A__B=value` variable, a provider of its own so errors name the variable.
struct EnvVar {
    name: String,
    path: String,
    value: String,
}

impl EnvVar {
    fn parse((name, value): (String, String)) -> Option<Self> {
        let rest = name.strip_prefix(ENV_PREFIX)?;
        if !rest.contains("__") {
            return None;
        }
        let path = rest.to_ascii_lowercase().replace("__", ".");
        Some(Self { name, path, value })
    }
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        // Parsed as figment's `Env` does: `12` is a number, `true` a boolean, `[a, b]` an array.
        let value: Value = self
            .value
            .parse()
            .unwrap_or_else(|_| Value::from(self.value.clone()));
        match figment::util::nest(&self.path, value) {
            Value::Dict(_, dict) => Ok(Profile::Default.collect(dict)),
            _ => Err(figment::Error::from(format!(
                "environment variable {} names no configuration key",
                self.name
            ))),
        }
    }
}

fn describe(figment: &Figment, errors: figment::Error) -> ConfigError {
    let lines: Vec<String> = errors
        .into_iter()
        .map(|error| {
            let key = error.path.join(".");
            // What the key holds, with every string that may be a credential redacted:
            // the value printed and serde's message (which repeats a refused string) alike.
            let mut secrets = Vec::new();
            let value = if key.is_empty() {
                None
            } else {
                figment.find_value(&key).ok().map(|value| {
                    let value = redacted(&key, value, &mut secrets);
                    match value {
                        Value::String(_, s) => format!("{s:?}"),
                        other => serde_json::to_string(&other).unwrap_or_else(|_| "?".into()),
                    }
                })
            };
            let mut kind = error.kind.to_string();
            for secret in &secrets {
                kind = kind
                    .replace(&format!("{secret:?}"), REDACTED)
                    .replace(secret.as_str(), REDACTED);
            }
            let source = error
                .metadata
                .as_ref()
                .map(|metadata| match &metadata.source {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {})", metadata.name),
                })
                .unwrap_or_default();
            match (key.is_empty(), value) {
                (true, _) => format!("invalid configuration: {kind}{source}"),
                (false, Some(value)) => {
                    format!("invalid configuration key `{key}` = {value}{source}: {kind}")
                }
                (false, None) => format!("invalid configuration key `{key}`{source}: {kind}"),
            }
        })
        .collect();
    ConfigError(lines.join("\n"))
}

/// `value` (found at `key`) with every string that may be a credential replaced by
/// [`REDACTED`], each such string added to `secrets`. A configuration error is printed
/// before the configuration is typed, so [`Secret`] cannot hide these yet.
fn redacted(key: &str, value: Value, secrets: &mut Vec<String>) -> Value {
    match value {
        Value::String(tag, text) if may_be_secret(key, &text) => {
            secrets.push(text);
            Value::String(tag, REDACTED.to_owned())
        }
        Value::Dict(tag, dict) => Value::Dict(
            tag,
            dict.into_iter()
                .map(|(name, value)| {
                    let value = redacted(&name, value, secrets);
                    (name, value)
                })
                .collect(),
        ),
        Value::Array(tag, values) => Value::Array(
            tag,
            values
                .into_iter()
                .map(|value| redacted(key, value, secrets))
                .collect(),
        ),
        other => other,
    }
}

/// Whether the string `text` at `key` may be a credential: the value of a key named like
/// one (`password`, `client_secret`, `admin_token`, `key_encryption_key`, …), or a URL
/// carrying a user and password or a `password=` parameter (database, broker and Redis
/// URLs).
fn may_be_secret(key: &str, text: &str) -> bool {
    let name = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    let named = ["password", "secret", "token", "key"]
        .iter()
        .any(|word| name.contains(word));
    let authority = text
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(rest));
    named
        || authority.is_some_and(|authority| authority.contains('@'))
        || text.contains("password=")
}

/// Renders a configuration as TOML for `keel config`; [`Secret`] values print redacted.
pub fn to_toml<T: Serialize>(config: &T) -> Result<String, ConfigError> {
    toml::to_string_pretty(config).map_err(|error| ConfigError(error.to_string()))
}

// === impl Secret ===

/// A configuration value that never shows: `Debug`, `Display` and `Serialize` print
/// `<redacted>`. Read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

/// What a secret prints as.
pub const REDACTED: &str = "<redacted>";

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value itself; call only where it is used, never to print it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[derive(Debug, Default, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Root {
        server: Server,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Server {
        listen: SocketAddr,
        workers: u16,
        token: Option<Secret<String>>,
    }

    impl Default for Server {
        fn default() -> Self {
            Self {
                listen: SocketAddr::from(([127, 0, 0, 1], 8500)),
                workers: 4,
                token: None,
            }
        }
    }

    fn load_layers(file_toml: &str, vars: &[(&str, &str)]) -> Result<Root, ConfigError> {
        let dir = std::env::temp_dir().join(format!("keel-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keel.toml");
        std::fs::write(&path, file_toml).expect("write config");
        let vars = vars
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()));
        let result = load_from(Some(&path), vars);
        std::fs::remove_dir_all(&dir).ok();
        result
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config: Root = load_from(None, Vec::new()).expect("defaults load");
        assert_eq!(config, Root::default());
    }

    #[test]
    fn file_overrides_defaults_and_keeps_the_rest() {
        let config = load_layers("[server]\nworkers = 9\n", &[]).expect("loads");
        assert_eq!(config.server.workers, 9);
        assert_eq!(config.server.listen, Server::default().listen);
    }

    #[test]
    fn later_layer_overrides_file() {
        let config = load_layers("[server]\nworkers = 9\n", &[("KEEL_SERVER__WORKERS", "12")])
            .expect("loads");
        assert_eq!(config.server.workers, 12);
    }

    #[test]
    fn process_flags_without_a_path_are_not_configuration() {
        let config = load_layers("", &[("KEEL_REQUIRE_SERVICES", "1"), ("PATH", "/bin")])
            .expect("flags are ignored");
        assert_eq!(config, Root::default());
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        let error = load_layers("", &[("KEEL_SERVER__WORKERS", "many")]).expect_err("bad value");
        let text = error.to_string();
        assert!(text.contains("KEEL_SERVER__WORKERS"), "{text}");
        assert!(text.contains("many"), "{text}");
        assert!(text.contains("server.workers"), "{text}");
    }

    #[test]
    fn unknown_environment_key_is_rejected() {
        let error = load_layers("", &[("KEEL_SERVER__WOKERS", "3")]).expect_err("unknown key");
        assert!(error.to_string().contains("wokers"), "{error}");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let error = from_toml::<Root>("[server]\nwokers = 9\n").expect_err("unknown key");
        assert!(error.to_string().contains("wokers"), "{error}");
    }

    #[test]
    fn bad_value_names_key_and_value() {
        let error =
            from_toml::<Root>("[server]\nlisten = \"not-an-address\"\n").expect_err("bad value");
        let text = error.to_string();
        assert!(text.contains("server.listen"), "{text}");
        assert!(text.contains("not-an-address"), "{text}");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Connections {
        #[serde(rename = "bus")]
        _bus: Bus,
        #[serde(default, rename = "admin")]
        _admin: Option<Admin>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Bus {
        InProcess,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Admin {
        #[serde(rename = "port")]
        _port: u16,
    }

    #[test]
    fn errors_never_print_what_may_be_a_credential() {
        // serde repeats a refused string in its message ("unknown variant `…`").
        let error = from_toml::<Connections>("bus = \"amqp://app:S3cret@mq:5672/%2f\"\n")
            .expect_err("not a variant");
        let text = error.to_string();
        assert!(!text.contains("S3cret"), "{text}");
        assert!(text.contains("`bus`") && text.contains(REDACTED), "{text}");

        // A wrong key beside a secret prints its table with the secret redacted.
        let error = from_toml::<Connections>(
            "bus = \"in_process\"\n[admin]\nport = 1\nadmin_token = \"hunter2\"\n",
        )
        .expect_err("unknown key");
        let text = error.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("admin_token"), "{text}");

        // A value that is no credential still prints, to say what was wrong.
        let error =
            from_toml::<Connections>("bus = \"kafka://broker:9092\"\n").expect_err("not a variant");
        assert!(error.to_string().contains("kafka://broker:9092"), "{error}");
    }

    #[test]
    fn credentials_are_told_by_key_name_or_url() {
        for (key, text) in [
            ("auth.key_encryption_key", "abc"),
            ("gateway.admin_token", "abc"),
            ("db.password", "abc"),
            ("catalog.bus", "amqp://app:pw@mq/%2f"),
            ("cache", "redis://:pw@r:6379/0"),
            ("database", "postgres://db/shop?password=pw"),
        ] {
            assert!(may_be_secret(key, text), "{key} = {text}");
        }
        for (key, text) in [
            ("server.listen", "127.0.0.1:80"),
            ("catalog.bus", "amqp://mq:5672/%2f"),
            ("routes.upstream", "http://svc/a@b"),
        ] {
            assert!(!may_be_secret(key, text), "{key} = {text}");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let error = load_from::<Root>(Some(Path::new("/nonexistent/keel.toml")), Vec::new())
            .expect_err("missing");
        assert!(error.to_string().contains("does not exist"));
    }

    #[test]
    fn secrets_never_print() {
        let config: Root =
            from_toml("[server]\ntoken = \"hunter2\"\n").expect("loads with a secret");
        assert_eq!(
            config.server.token.as_ref().map(|t| t.expose().as_str()),
            Some("hunter2")
        );
        let printed = to_toml(&config).expect("renders");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains(REDACTED));
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
