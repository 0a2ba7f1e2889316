//! The client library: registrar and live view, including across a registry restart.

use std::time::Duration;

use keel_registry::client::{DiscoveryView, Registrar, RegistryClient, ttl_registration};
use keel_registry::{RegistryConfig, RegistryServer};
use keel_runtime::Shutdown;

use crate::helpers::*;

#[tokio::test]
async fn registrar_and_view_survive_a_registry_restart() {
    let registry = spawn_registry().await;
    let addr = registry.addr;
    let client = RegistryClient::new(&registry.url, None).unwrap();

    let app = Shutdown::new();
    Registrar::spawn(
        client.clone(),
        ttl_registration(
            "orders",
            "orders-1",
            "127.0.0.1",
            8104,
            Duration::from_secs(3),
        ),
        Duration::from_millis(200),
        &app,
    );
    let view = DiscoveryView::new(client.clone(), &app);
    view.watch("orders");
    assert!(
        eventually(Duration::from_secs(3), || async {
            view.instances("orders").len() == 1
        })
        .await,
        "the view sees the registered instance"
    );

    // The registry dies and loses everything (memory backend).
    registry.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        view.instances("orders").len(),
        1,
        "the view serves its last answer while the registry is away"
    );

    // A new registry on the same address: the registrar re-registers, the view resumes.
    let shutdown = Shutdown::new();
    let config = RegistryConfig {
        listen: addr,
        sweep_interval: Duration::from_millis(50),
        ..RegistryConfig::default()
    };
    let restarted = keel_testkit::spawn(RegistryServer::build(config, &shutdown).await.unwrap());
    assert!(
        eventually(Duration::from_secs(5), || async {
            client
                .instances("orders", &Default::default())
                .await
                .is_ok_and(|found| found.instances.len() == 1)
        })
        .await,
        "the registrar registered again"
    );
    let mut changes = view.subscribe();
    changes.borrow_and_update();
    // A second instance proves the view is watching the new registry, not replaying.
    client
        .register(&registration("orders", "orders-2", vec![]))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            view.instances("orders").len() == 2
        })
        .await,
        "the view resumed watching"
    );

    // Shutdown hooks deregister.
    app.trigger();
    app.run_hooks(Duration::from_secs(2)).await;
    let found = client
        .instances("orders", &Default::default())
        .await
        .unwrap();
    let ids: Vec<_> = found.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["orders-2"]);
    restarted.stop().await;
    shutdown.trigger();
}

/// A registry that cannot be reached is reported with the cause, not only reqwest's
/// "error sending request".
#[tokio::test]
async fn an_unreachable_registry_is_reported_with_the_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let error = RegistryClient::new(&url, None)
        .unwrap()
        .services()
        .await
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("registry unreachable"), "{error}");
    assert!(
        error.to_lowercase().contains("connection refused"),
        "{error}"
    );
}
