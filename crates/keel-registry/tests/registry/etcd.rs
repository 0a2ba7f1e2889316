//! The etcd backend against a real etcd: TTLs as leases, replicas sharing one state, a
//! replica dying, active checks moving, restarts losing nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
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

#[tokio::test]
async fn an_active_check_runs_on_one_replica_and_moves_when_it_dies() {
    if !keel_testkit::require(Service::Etcd) {
        return;
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let code = Arc::new(AtomicU16::new(200));
    let app = Router::new()
        .route(
            "/health",
            get(
                |State((hits, code)): State<(Arc<AtomicUsize>, Arc<AtomicU16>)>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    StatusCode::from_u16(code.load(Ordering::SeqCst)).unwrap()
                },
            ),
        )
        .with_state((Arc::clone(&hits), Arc::clone(&code)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let prefix = prefix();
    let a = replica(&prefix).await;
    let b = replica(&prefix).await;
    // Both replicas have seen each other's membership before the check arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client_a = RegistryClient::new(&a.url, None).unwrap();
    let client_b = RegistryClient::new(&b.url, None).unwrap();
    let check = CheckSpec {
        http: Some(format!("http://127.0.0.1:{port}/health")),
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
            status_of(&client_b, "search").await == Some(Status::Passing)
        })
        .await
    );

    // One replica probes: about 10 probes a second, not 20.
    hits.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_second = hits.load(Ordering::SeqCst) as f64 / 2.0;
    assert!(
        (5.0..=14.0).contains(&per_second),
        "{per_second} probes/s: the check must run on exactly one replica"
    );

    // Whichever replica ran it dies; the survivor takes the check over.
    a.kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the dead replica's lease expires
    code.store(500, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&client_b, "search").await == Some(Status::Critical)
        })
        .await,
        "the surviving replica probes the check"
    );
    hits.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(hits.load(Ordering::SeqCst) >= 5, "probes keep running");
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
