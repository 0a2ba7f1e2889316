use std::time::{Duration, Instant};

use keel_registry::model::{CheckSpec, InstanceSpec, Registration, Scheme};
use keel_registry::{RegistryConfig, RegistryServer};
use keel_runtime::Shutdown;
use keel_testkit::TestServer;
use serde_json::{Value, json};

/// A registry on port 0 with a fast sweep, configured further by `configure`.
pub async fn spawn_registry_with(configure: impl FnOnce(&mut RegistryConfig)) -> TestServer {
    let mut config = RegistryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sweep_interval: Duration::from_millis(50),
        ..RegistryConfig::default()
    };
    configure(&mut config);
    let shutdown = Shutdown::new();
    let server = RegistryServer::build(config, &shutdown).await.unwrap();
    let running = keel_testkit::spawn(server);
    // Tie the build-time shutdown (which ends open watches) to the running server's.
    let stop = running.shutdown().clone();
    tokio::spawn(async move {
        stop.wait().await;
        shutdown.trigger();
    });
    running
}

pub async fn spawn_registry() -> TestServer {
    spawn_registry_with(|_| {}).await
}

pub fn http() -> reqwest::Client {
    keel_runtime::http_client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn instance_spec(port: u16) -> InstanceSpec {
    InstanceSpec {
        address: "127.0.0.1".into(),
        port,
        scheme: Scheme::Http,
        tags: vec!["blue".into()],
        version: Some("1.0.0".into()),
        zone: Some("zone-a".into()),
        weight: 1,
        meta: Default::default(),
        checks: vec![],
    }
}

pub fn registration(service: &str, id: &str, checks: Vec<CheckSpec>) -> Registration {
    Registration {
        service: service.into(),
        id: id.into(),
        spec: InstanceSpec {
            checks,
            ..instance_spec(9000)
        },
    }
}

pub fn ttl_check(ttl_ms: u64, deregister_after_ms: Option<u64>) -> CheckSpec {
    CheckSpec {
        ttl: Some(Duration::from_millis(ttl_ms)),
        deregister_after: deregister_after_ms.map(Duration::from_millis),
        ..CheckSpec::default()
    }
}

pub async fn put_json(url: &str, body: Value) -> reqwest::Response {
    http().put(url).json(&body).send().await.unwrap()
}

pub async fn get_json(url: &str) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let response = http().get(url).send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// Polls `probe` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + within;
    while Instant::now() < until {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

pub fn simple_spec() -> Value {
    json!({"address": "127.0.0.1", "port": 9000})
}
