//! The etcd backend against a real etcd: TTLs as leases, replicas sharing one state, a
//! replica dying, active checks moving, restarts losing nothing.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use http::StatusCode;
use keel_registry::client::{InstancesQuery, RegistryClient};
use keel_registry::model::{CheckSpec, Status};
use keel_registry::server::{Backend, EtcdConfig};
use keel_registry::{RegistryConfig, RegistryServer};
use keel_runtime::Shutdown;
use keel_testkit::{Service, TestServer};

use crate::helpers::*;

fn etcd_config(prefix: &str) -> RegistryConfig {
    RegistryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: Backend::Etcd,
        etcd: EtcdConfig {
            prefix: prefix.to_owned(),
            replica_ttl: Duration::from_secs(2),
            ..EtcdConfig::default()
        },
        sweep_interval: Duration::from_millis(50),
        ..RegistryConfig::default()
    }
}

async fn replica(prefix: &str) -> TestServer {
    let shutdown = Shutdown::new();
    let server = RegistryServer::build(etcd_config(prefix), &shutdown)
        .await
        .unwrap();
    keel_testkit::spawn(server)
}

fn prefix() -> String {
    format!("/{}", keel_testkit::unique_name("keel-test-registry"))
}

async fn status_of(client: &RegistryClient, service: &str) -> Option<Status> {
    client
        .instances(service, &InstancesQuery::default())
        .await
        .ok()?
        .instances
        .first()
        .map(|i| i.status)
}

#[tokio::test]
async fn ttl_expiry_and_removal_through_leases() {
    if !keel_testkit::require(Service::Etcd) {
        return;
    }
    let registry = replica(&prefix()).await;
    let client = RegistryClient::new(&registry.url, None).unwrap();
    let instance = client
        .register(&registration(
            "billing",
            "billing-1",
            vec![ttl_check(1_000, Some(1_000))],
        ))
        .await
        .unwrap();
    assert_eq!(instance.status, Status::Passing);
    // A heartbeat renews the lease.
    client
        .heartbeat("billing", "billing-1", &Default::default())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(6), || async {
            status_of(&client, "billing").await == Some(Status::Critical)
        })
        .await,
        "critical once the lease expires"
    );
    // A heartbeat revives it…
    let revived = client
        .heartbeat("billing", "billing-1", &Default::default())
        .await
        .unwrap();
    assert_eq!(revived.status, Status::Passing);
    // …and without more, it expires again and is removed after deregister_after.
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(&client, "billing").await.is_none()
        })
        .await,
        "removed after its deregister-after deadline"
    );
}

#[tokio::test]
async fn replicas_share_state_and_a_survivor_serves_everything() {
    if !keel_testkit::require(Service::Etcd) {
        return;
    }
    let prefix = prefix();
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    let client_a = RegistryClient::new(&a.url, None).unwrap();
    let client_b = RegistryClient::new(&b.url, None).unwrap();

    for n in 0..3 {
        client_a
            .register(&registration(
                "orders",
                &format!("orders-{n}"),
                vec![ttl_check(5_000, None)],
            ))
            .await
            .unwrap();
    }
    let on_a = client_a
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async {
            client_b
                .instances("orders", &InstancesQuery::default())
                .await
                .is_ok_and(|on_b| on_b.instances.len() == 3 && on_b.index == on_a.index)
        })
        .await,
        "replica B sees A's writes with the same index"
    );

    // A watcher on B wakes on a change made through A.
    let index = on_a.index;
    let watcher = client_b.clone();
    let blocked = tokio::spawn(async move {
        let answer = watcher
            .instances(
                "orders",
                &InstancesQuery {
                    index: Some(index),
                    wait: Some(Duration::from_secs(10)),
                    ..InstancesQuery::default()
                },
            )
            .await
            .unwrap();
        (answer, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let changed_at = Instant::now();
    client_a.deregister("orders", "orders-0").await.unwrap();
    let (answer, answered_at) = blocked.await.unwrap();
    assert_eq!(answer.instances.len(), 2);
    let latency = answered_at.duration_since(changed_at);
    assert!(
        latency < Duration::from_millis(100),
        "across replicas in {latency:?}"
    );

    let (status, _, ready) = get_json(&format!("{}/health/ready", b.url)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["checks"][0]["name"], "etcd");

    // A dies; B keeps serving every instance, takes heartbeats and answers watches.
    let index = answer.index;
    a.kill().await;
    let found = client_b
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();
    assert_eq!(found.instances.len(), 2);
    client_b
        .heartbeat("orders", "orders-1", &Default::default())
        .await
        .unwrap();
    let watcher = client_b.clone();
    let blocked = tokio::spawn(async move {
        watcher
            .instances(
                "orders",
                &InstancesQuery {
                    index: Some(index),
                    wait: Some(Duration::from_secs(10)),
                    ..InstancesQuery::default()
                },
            )
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    client_b
        .register(&registration("orders", "orders-9", vec![]))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), blocked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.instances.len(), 3);

    // A replica started later on the same etcd finds everything: nothing was lost.
    let c = replica(&prefix).await;
    let client_c = RegistryClient::new(&c.url, None).unwrap();
    let found = client_c
        .instances("orders", &InstancesQuery::default())
        .await
        .unwrap();
    let ids: Vec<_> = found.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["orders-1", "orders-2", "orders-9"]);
}

type ProbeState = (Arc<AtomicU16>, Arc<Mutex<Vec<String>>>);

/// The probed service: answers with a switchable status and records which replica probed.
struct Probed {
    code: Arc<AtomicU16>,
    probers: Arc<Mutex<Vec<String>>>,
    port: u16,
}

async fn probed_service() -> Probed {
    let code = Arc::new(AtomicU16::new(200));
    let probers = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route(
            "/health",
            get(
                |State((code, probers)): State<ProbeState>, headers: http::HeaderMap| async move {
                    let replica = headers
                        .get("x-keel-replica")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?")
                        .to_owned();
                    probers.lock().unwrap().push(replica);
                    StatusCode::from_u16(code.load(Ordering::SeqCst)).unwrap()
                },
            ),
        )
        .with_state((Arc::clone(&code), Arc::clone(&probers)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Probed {
        code,
        probers,
        port,
    }
}

impl Probed {
    /// The distinct replicas that probed during `window`.
    async fn probers_during(&self, window: Duration) -> Vec<String> {
        self.probers.lock().unwrap().clear();
        tokio::time::sleep(window).await;
        let mut seen = self.probers.lock().unwrap().clone();
        seen.sort();
        seen.dedup();
        seen
    }
}

async fn replica_id(url: &str) -> String {
    let (_, _, status) = get_json(&format!("{url}/v1/status")).await;
    status["replica"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_active_check_runs_on_one_replica_and_moves_when_it_dies() {
    if !keel_testkit::require(Service::Etcd) {
        return;
    }
    let probed = probed_service().await;
    let prefix = prefix();
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    // Both replicas have seen each other's membership before the check arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client_a = RegistryClient::new(&a.url, None).unwrap();
    let check = CheckSpec {
        http: Some(format!("http://127.0.0.1:{}/health", probed.port)),
        interval: Some(Duration::from_millis(100)),
        timeout: Some(Duration::from_millis(100)),
        ..CheckSpec::default()
    };
    client_a
        .register(&registration("search", "search-1", vec![check]))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            status_of(&client_a, "search").await == Some(Status::Passing)
        })
        .await
    );

    let owners = probed.probers_during(Duration::from_secs(1)).await;
    assert_eq!(owners.len(), 1, "exactly one replica probes: {owners:?}");
    let owner = owners[0].clone();
    let (a_id, b_id) = (replica_id(&a.url).await, replica_id(&b.url).await);
    assert!(
        owner == a_id || owner == b_id,
        "{owner} is one of {a_id}, {b_id}"
    );

    // The owner dies; the survivor takes the check over once the owner's lease lapses.
    let (survivor, survivor_id) = if owner == a_id {
        a.kill().await;
        (b, b_id)
    } else {
        b.kill().await;
        (a, a_id)
    };
    let client = RegistryClient::new(&survivor.url, None).unwrap();
    assert!(
        eventually(Duration::from_secs(6), || async {
            probed.probers_during(Duration::from_millis(300)).await == [survivor_id.clone()]
        })
        .await,
        "the surviving replica probes the check"
    );
    probed.code.store(500, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || async {
            status_of(&client, "search").await == Some(Status::Critical)
        })
        .await,
        "and its results are shown"
    );
}

#[tokio::test]
async fn an_unreachable_etcd_stops_the_start_with_a_clear_error() {
    let mut config = etcd_config("/keel-test-unreachable");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    config.etcd.endpoints = vec![format!("http://127.0.0.1:{port}")];
    config.etcd.connect_timeout = Duration::from_millis(500);
    config.etcd.request_timeout = Duration::from_millis(500);
    let error = match RegistryServer::build(config, &Shutdown::new()).await {
        Ok(_) => panic!("built against an unreachable etcd"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("etcd"), "{error}");
    assert!(error.contains(&port.to_string()), "{error}");
}

#[tokio::test]
async fn maintenance_is_shared_across_replicas_with_its_reason() {
    if !keel_testkit::require(Service::Etcd) {
        return;
    }
    let prefix = prefix();
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    let client_a = RegistryClient::new(&a.url, None).unwrap();
    let client_b = RegistryClient::new(&b.url, None).unwrap();
    client_a
        .register(&registration(
            "orders",
            "orders-1",
            vec![ttl_check(10_000, None)],
        ))
        .await
        .unwrap();
    let response = http()
        .put(format!(
            "{}/v1/agent/service/maintenance/orders-1?enable=true&reason=upgrading",
            a.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        eventually(Duration::from_secs(2), || async {
            client_b
                .instances("orders", &InstancesQuery::default())
                .await
                .is_ok_and(|found| {
                    found.instances.first().is_some_and(|instance| {
                        instance.status == Status::Critical
                            && instance.maintenance() == Some("upgrading")
                    })
                })
        })
        .await,
        "replica B shows the maintenance with its reason"
    );
    // Heartbeats keep the TTL check passing without ending the maintenance.
    let beat = client_b
        .heartbeat("orders", "orders-1", &Default::default())
        .await
        .unwrap();
    assert_eq!(beat.status, Status::Critical);
    let response = http()
        .put(format!(
            "{}/v1/agent/service/maintenance/orders-1?enable=false",
            b.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        eventually(Duration::from_secs(2), || async {
            status_of(&client_a, "orders").await == Some(Status::Passing)
        })
        .await
    );
}

#[tokio::test]
async fn a_list_watch_ignores_writes_outside_the_registry_prefix() {
    if !keel_testkit::require(Service::Etcd) {
        return;
    }
    let ours = replica(&prefix()).await;
    // Another registry on the same etcd: its writes move etcd's revision, not our catalog.
    let theirs = replica(&prefix()).await;
    let other = RegistryClient::new(&theirs.url, None).unwrap();
    let (_, headers, _) = get_json(&format!("{}/v1/services", ours.url)).await;
    let index: u64 = headers["x-keel-index"].to_str().unwrap().parse().unwrap();
    let url = format!("{}/v1/services?index={index}&wait=1s", ours.url);
    let blocked = tokio::spawn(async move {
        let started = Instant::now();
        get_json(&url).await;
        started.elapsed()
    });
    for n in 0..5 {
        other
            .register(&registration("elsewhere", &format!("e-{n}"), vec![]))
            .await
            .unwrap();
    }
    let waited = blocked.await.unwrap();
    assert!(
        waited >= Duration::from_millis(900),
        "answered after {waited:?}: woken by another prefix's writes"
    );
    // And the next read still blocks: the index it answered with is current.
    let (_, headers, _) = get_json(&format!("{}/v1/services", ours.url)).await;
    let index: u64 = headers["x-keel-index"].to_str().unwrap().parse().unwrap();
    let started = Instant::now();
    get_json(&format!(
        "{}/v1/services?index={index}&wait=500ms",
        ours.url
    ))
    .await;
    assert!(started.elapsed() >= Duration::from_millis(400));
}
