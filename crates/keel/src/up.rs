//! `keel up`: every component in one process on the embedded profile.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use keel_auth::{AuthServer, Seeded};
use keel_gateway::GatewayServer;
use keel_registry::RegistryServer;
use keel_runtime::{Server, Shutdown, telemetry};
use tokio::task::JoinSet;

use crate::config::KeelConfig;

/// Time the shutdown hooks (deregistration, telemetry flush) get once servers have drained.
const HOOKS_DEADLINE: Duration = Duration::from_secs(5);

pub async fn run(config: KeelConfig, file: Option<&Path>) -> anyhow::Result<()> {
    let guard = telemetry::init(&config.telemetry, "keel", &instance_id())?;
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();

    // Bind everything before serving anything, so a taken port stops the start cleanly.
    let registry = RegistryServer::build(config.registry, &shutdown).await?;
    let routes = config.gateway.routes.len();
    // In front of everything registered, unless the configuration says otherwise.
    // The registry is in this process: the gateway follows it wherever it listens.
    let mut gateway_config = config.gateway;
    gateway_config.discovery_routes.get_or_insert(true);
    gateway_config.registry = format!("http://{}", registry.local_addr());
    let source = KeelConfig::gateway_source(file);
    let gateway = GatewayServer::build_with_source(gateway_config, source, &shutdown).await?;
    let auth = AuthServer::build(config.auth, &shutdown).await?;
    let seeded = auth.admin().seed_demo().await?;
    // The shop's services: registered with this registry (so the gateway routes
    // /catalog/… to them), trusting this authorization server, on one in-process bus.
    let bus = keel_sdk::Bus::in_process("keel");
    let shop = |mut service: keel_sdk::ServiceConfig| {
        service
            .registry
            .get_or_insert_with(|| format!("http://{}", registry.local_addr()));
        service
            .auth
            .get_or_insert_with(|| keel_sdk::service::ServiceAuthConfig {
                issuer: auth.issuer().to_owned(),
                audiences: vec!["keel-api".to_owned()],
            });
        service
    };
    let catalog = keel_catalog::build(&shop(config.catalog), Some(&bus), &shutdown).await?;
    let inventory = keel_inventory::build(&shop(config.inventory), Some(&bus), &shutdown).await?;
    let payments = keel_payments::build(
        &shop(config.payments),
        &config.payment_provider,
        Some(&bus),
        &shutdown,
    )
    .await?;
    let orders = keel_orders::build(
        &shop(config.orders),
        &config.orders_settings,
        Some(&bus),
        &shutdown,
    )
    .await?;
    let auth_what = format!(
        "authorization server: issuer {}, /.well-known/openid-configuration, /token",
        auth.issuer()
    );

    let gateway_what = format!(
        "API gateway: {routes} configured route(s), then /<service>/… for every registered service"
    );
    if let Some(seeded) = seeded {
        print_seeded(&seeded);
    }
    print_table(&[
        (
            registry.name(),
            registry.local_addr(),
            "service registry: /v1/services, Consul /v1/health, Eureka /eureka/apps",
        ),
        (gateway.name(), gateway.local_addr(), &gateway_what),
        (
            "gateway admin",
            gateway.admin_addr(),
            "gateway admin API: /v1/routes, /v1/upstreams, /v1/reload (token)",
        ),
        (auth.name(), auth.local_addr(), &auth_what),
        (
            "catalog",
            catalog.local_addr(),
            "shop catalog: /products (through the gateway: /catalog/products)",
        ),
        (
            "inventory",
            inventory.local_addr(),
            "shop inventory: /stock/{sku} (through the gateway: /inventory/stock/{sku})",
        ),
        (
            "payments",
            payments.local_addr(),
            "shop payments, simulated provider: /payments (through the gateway: /payments/payments)",
        ),
        (
            "orders",
            orders.local_addr(),
            "shop orders and the order saga: /orders (through the gateway: /orders/orders)",
        ),
    ]);

    let mut servers = JoinSet::new();
    servers.spawn(run_server(registry, shutdown.clone()));
    servers.spawn(run_server(gateway, shutdown.clone()));
    servers.spawn(run_server(auth, shutdown.clone()));
    servers.spawn(run_server(catalog, shutdown.clone()));
    servers.spawn(run_server(inventory, shutdown.clone()));
    servers.spawn(run_server(payments, shutdown.clone()));
    servers.spawn(run_server(orders, shutdown.clone()));
    let result = supervise(servers, &shutdown).await;
    shutdown.run_hooks(HOOKS_DEADLINE).await;
    guard.shutdown();
    result
}

/// Runs one component alone (`keel registry`, `keel gateway`) until a signal.
pub async fn serve_alone<S: Server>(
    telemetry_config: &telemetry::TelemetryConfig,
    shutdown: Shutdown,
    server: S,
) -> anyhow::Result<()> {
    let guard = telemetry::init(
        telemetry_config,
        &format!("keel-{}", server.name()),
        &instance_id(),
    )?;
    shutdown.trigger_on_signals();
    let mut servers = JoinSet::new();
    servers.spawn(run_server(server, shutdown.clone()));
    let result = supervise(servers, &shutdown).await;
    shutdown.run_hooks(HOOKS_DEADLINE).await;
    guard.shutdown();
    result
}

/// Runs a server; its name tags any error.
pub async fn run_server<S: Server>(server: S, shutdown: Shutdown) -> anyhow::Result<()> {
    let name = server.name().to_owned();
    server
        .run(shutdown)
        .await
        .with_context(|| format!("{name} stopped with an error"))
}

/// Waits for every server; the first to fail stops the others.
pub async fn supervise(
    mut servers: JoinSet<anyhow::Result<()>>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(joined) = servers.join_next().await {
        let result = joined
            .map_err(anyhow::Error::from)
            .and_then(|result| result);
        if let Err(error) = result {
            tracing::error!(error = %format!("{error:#}"), "a component failed; stopping the others");
            shutdown.trigger();
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn print_table(rows: &[(&str, SocketAddr, &str)]) {
    println!("Keel is up (embedded profile). Ctrl-C stops it.\n");
    println!("  {:<14} {:<24} WHAT", "COMPONENT", "URL");
    for (name, addr, what) in rows {
        println!("  {name:<14} {:<24} {what}", format!("http://{addr}"));
    }
    println!();
}

/// The demo credentials, shown once: on the first start of an empty database.
fn print_seeded(seeded: &Seeded) {
    println!("First start: demo credentials (shown this once; keep them):");
    println!(
        "  user admin      password {}   (roles keel-admin, admin)",
        seeded.admin_password
    );
    println!(
        "  user customer   password {}   (role customer)",
        seeded.customer_password
    );
    println!(
        "  client {}   secret {}   (roles admin, customer)",
        seeded.client_id, seeded.client_secret
    );
    println!(
        "  an access token: KEEL_CLIENT_SECRET=… keel token --client {}",
        seeded.client_id
    );
    println!("  the shop's tour: KEEL_CLIENT_SECRET=… keel demo\n");
}

/// An id for this process's log lines and traces.
pub fn instance_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}
