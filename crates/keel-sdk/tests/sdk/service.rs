//! The bootstrap: two instances of one service side by side, registered (with the
//! registry's ACL token), healthy, with their standard endpoints; deregistered on
//! shutdown; stopped when a worker dies.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keel_registry::client::InstancesQuery;
use keel_runtime::{Secret, Shutdown};
use keel_sdk::service::{RunningService, Service, ServiceConfig};
use keel_testkit::TestSqlite;

use crate::helpers::{MIGRATIONS, eventually, registry};

async fn catalog(config: &ServiceConfig, shutdown: &Shutdown) -> RunningService {
    let service = Service::connect("catalog", config, &MIGRATIONS, None, shutdown)
        .await
        .unwrap();
    let router = Router::new().route("/products", get(|| async { "[]" }));
    service
        .http(router)
        .openapi(serde_json::json!({"openapi": "3.1.0", "info": {"title": "catalog"}}))
        .bind()
        .await
        .unwrap()
}

#[tokio::test]
async fn instances_run_side_by_side_registered_healthy_and_leave_on_shutdown() {
    let registry_shutdown = Shutdown::new();
    // A registry that takes writes with its ACL token only.
    let (_registry, registry_client) = registry(&registry_shutdown, Some("acl-s3cret")).await;
    let file = TestSqlite::new("keel-sdk-service");
    let config = ServiceConfig {
        database: Some(Secret::new(file.url())),
        registry: Some(registry_client.base_url().to_owned()),
        registry_token: Some(Secret::new("acl-s3cret".to_owned())),
        heartbeat: Duration::from_secs(1),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let instances = [
        catalog(&config, &shutdown).await,
        catalog(&config, &shutdown).await,
    ];
    let ids: Vec<String> = instances
        .iter()
        .map(|i| i.instance_id().to_owned())
        .collect();
    assert_ne!(ids[0], ids[1]);
    let urls: Vec<String> = instances
        .iter()
        .map(|i| format!("http://{}", i.local_addr()))
        .collect();
    let runs: Vec<_> = instances
        .into_iter()
        .map(|instance| tokio::spawn(instance.run(shutdown.clone())))
        .collect();

    let http = keel_testkit::http();
    for url in &urls {
        let get = |path: &str| http.get(format!("{url}{path}")).send();
        assert_eq!(get("/products").await.unwrap().text().await.unwrap(), "[]");
        let ready = get("/health/ready").await.unwrap();
        assert_eq!(ready.status(), 200);
        let ready: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(ready["checks"][0]["name"], "database", "{ready}");
        let openapi: serde_json::Value = get("/openapi.json").await.unwrap().json().await.unwrap();
        assert_eq!(openapi["info"]["title"], "catalog");
        assert_eq!(get("/health/live").await.unwrap().status(), 200);
    }
    let passing = || async {
        let query = InstancesQuery {
            passing: true,
            ..InstancesQuery::default()
        };
        registry_client
            .instances("catalog", &query)
            .await
            .map(|answer| answer.instances.len())
            .unwrap_or(0)
    };
    eventually(
        "both registered and passing",
        Duration::from_secs(10),
        || async { passing().await == 2 },
    )
    .await;
    // The pool gauges appear once housekeeping has run.
    let metrics = http
        .get(format!("{}/metrics", urls[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("db_client_connections_usage{pool_name=\"catalog\""),
        "{metrics}"
    );

    shutdown.trigger();
    // Deregistered as the drain begins, not after it: callers stop picking an instance
    // before it stops accepting.
    eventually(
        "deregistered before the hooks run",
        Duration::from_secs(5),
        || async { passing().await == 0 },
    )
    .await;
    for run in runs {
        run.await.unwrap().unwrap();
    }
    shutdown.run_hooks(Duration::from_secs(5)).await;
    assert_eq!(passing().await, 0, "deregistered on shutdown");
}

#[tokio::test]
async fn a_worker_that_dies_stops_the_service() {
    let file = TestSqlite::new("keel-sdk-service");
    let config = ServiceConfig {
        database: Some(Secret::new(file.url())),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    // Not "catalog": the gauges are process-wide, and the test above looks for its own.
    let service = Service::connect("importer", &config, &MIGRATIONS, None, &shutdown)
        .await
        .unwrap()
        .worker("importer", |_| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("the importer broke");
        })
        .bind()
        .await
        .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), service.run(shutdown.clone()))
        .await
        .expect("the service stops by itself")
        .unwrap_err();
    assert!(
        error.to_string().contains("worker importer panicked"),
        "{error}"
    );
    assert!(shutdown.is_triggered());
}

/// A service with TLS registers as `https`, and callers that trust its CA reach it through
/// the registry over HTTPS.
#[tokio::test]
async fn a_service_with_tls_registers_as_https_and_is_called_so() {
    let registry_shutdown = Shutdown::new();
    let (_registry, registry_client) = registry(&registry_shutdown, None).await;
    let ca = keel_testkit::tls::TestCa::new();
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-sdk-service-tls"));
    let (cert, key) = ca.server_files(&dir);
    keel_runtime::http_client::trust_pem(ca.pem().as_bytes()).unwrap();
    let file = TestSqlite::new("keel-sdk-service-tls");
    let config = ServiceConfig {
        database: Some(Secret::new(file.url())),
        registry: Some(registry_client.base_url().to_owned()),
        heartbeat: Duration::from_secs(1),
        http: keel_runtime::HttpServerConfig {
            tls: Some(keel_runtime::http::ServerTlsConfig {
                cert,
                key,
                client_ca: None,
            }),
            ..keel_runtime::HttpServerConfig::default()
        },
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let service = catalog(&config, &shutdown).await;
    assert!(keel_runtime::Server::url(&service).starts_with("https://"));
    tokio::spawn(service.run(shutdown.clone()));
    eventually(
        "registered with scheme https",
        Duration::from_secs(5),
        || {
            let registry_client = registry_client.clone();
            async move {
                registry_client
                    .instances("catalog", &InstancesQuery::default())
                    .await
                    .is_ok_and(|found| {
                        found
                            .instances
                            .iter()
                            .any(|i| i.base_url().starts_with("https://"))
                    })
            }
        },
    )
    .await;

    let view = keel_registry::client::DiscoveryView::new(registry_client.clone(), &shutdown);
    view.watch("catalog");
    eventually("the view sees it", Duration::from_secs(5), || {
        let view = view.clone();
        async move { !view.instances("catalog").is_empty() }
    })
    .await;
    let client = keel_sdk::client::ServiceClient::new(
        "catalog",
        keel_sdk::client::Instances::Registry(view),
        keel_sdk::client::ClientOptions::default(),
    )
    .unwrap();
    let answer = client
        .call(keel_sdk::client::Call::new(http::Method::GET, "/products"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    shutdown.trigger();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Refuses every deposit: straight to the dead letters.
struct Refuse;

impl keel_sdk::Handler<crate::helpers::Deposited> for Refuse {
    async fn handle(
        &self,
        _: &mut keel_sdk::Tx,
        _: keel_sdk::Received<crate::helpers::Deposited>,
    ) -> Result<(), keel_sdk::HandlerError> {
        Err(keel_sdk::HandlerError::reject("closed"))
    }
}

#[tokio::test]
async fn admins_list_and_replay_a_groups_dead_letters_over_http() {
    let issuer = keel_jwt::testing::TestIssuer::start().await;
    let file = TestSqlite::new("keel-sdk-service");
    let config = ServiceConfig {
        database: Some(Secret::new(file.url())),
        auth: Some(keel_sdk::service::ServiceAuthConfig {
            issuer: issuer.issuer().to_owned(),
            audiences: vec![keel_jwt::testing::AUDIENCE.to_owned()],
        }),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let service = Service::connect("ledger", &config, &MIGRATIONS, None, &shutdown)
        .await
        .unwrap();
    let bus = service.bus().clone();
    let consumer = bus
        .consumer("ledger", service.db())
        .on::<crate::helpers::Deposited, _>(Refuse)
        .start()
        .await
        .unwrap();
    let stats = consumer.stats();
    let running = service.consumer(consumer).bind().await.unwrap();
    let base = format!("http://{}", running.local_addr());
    tokio::spawn(running.run(shutdown.clone()));
    bus.publish(&crate::helpers::deposit("a", 1, 5))
        .await
        .unwrap();
    eventually("dead-lettered", Duration::from_secs(5), || async {
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;

    let admin = issuer.mint(serde_json::json!({"scope": "keel-admin", "roles": ["admin"]}));
    let customer = issuer.mint(serde_json::json!({"scope": "keel-admin", "roles": ["customer"]}));
    // The role without the scope: an admin's token given to some other client.
    let unscoped = issuer.mint(serde_json::json!({"roles": ["admin"]}));
    let http = keel_testkit::http();
    let list = |token: Option<&str>, group: &str| {
        let mut request = http.get(format!("{base}/admin/dead-letters/{group}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(list(None, "ledger").await.unwrap().status(), 401);
    assert_eq!(list(Some(&customer), "ledger").await.unwrap().status(), 403);
    assert_eq!(list(Some(&unscoped), "ledger").await.unwrap().status(), 403);
    let replay = |token: &str| {
        http.post(format!("{base}/admin/dead-letters/ledger/replay"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(replay(&customer).await.unwrap().status(), 403);
    assert_eq!(replay(&unscoped).await.unwrap().status(), 403);
    assert_eq!(list(Some(&admin), "billing").await.unwrap().status(), 404);
    let letters: serde_json::Value = list(Some(&admin), "ledger")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(letters[0]["error"], "closed", "{letters}");
    let id = letters[0]["id"].as_str().unwrap().to_owned();

    let replayed: serde_json::Value = http
        .post(format!("{base}/admin/dead-letters/ledger/replay?id={id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["replayed"], 1);
    eventually(
        "refused again after the replay",
        Duration::from_secs(5),
        || async {
            stats
                .dead_lettered
                .load(std::sync::atomic::Ordering::Relaxed)
                == 2
        },
    )
    .await;
    shutdown.trigger();
}

#[tokio::test]
async fn services_sharing_a_redis_prefix_keep_their_caches_apart() {
    use keel_sdk::cache::{Cache, CacheOptions};
    use keel_testkit::{Service as Backing, require, unique_name};
    if !require(Backing::Redis) {
        return;
    }
    let file = TestSqlite::new("keel-sdk-service");
    // One deployment's prefix for both, as an operator would write it once.
    let config = ServiceConfig {
        database: Some(Secret::new(file.url())),
        cache: Some(keel_sdk::service::CacheConfig {
            redis: Secret::new(format!("redis://{}", Backing::Redis.addr())),
            prefix: Some(format!("{}:", unique_name("keel-deployment"))),
            timeout: Duration::from_millis(500),
        }),
        ..ServiceConfig::default()
    };
    let shutdown = Shutdown::new();
    let mut seen = Vec::new();
    for name in ["shelf", "till"] {
        let service = Service::connect(name, &config, &MIGRATIONS, None, &shutdown)
            .await
            .unwrap();
        // The same cache name and version in both services, holding different things.
        let cache: Cache<String> =
            Cache::new("items", 1, CacheOptions::default(), service.cache_redis());
        let value = cache
            .get_or_load("42", || async {
                Ok::<_, std::convert::Infallible>(Some(format!("{name}'s item")))
            })
            .await
            .unwrap()
            .unwrap();
        seen.push((*value).clone());
    }
    assert_eq!(seen, ["shelf's item", "till's item"]);
}
