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

/// The shop's services, which `--replicas` may multiply.
const SHOP: [&str; 4] = ["catalog", "inventory", "payments", "orders"];

#[derive(Debug, Default, clap::Args)]
pub struct UpArgs {
    /// Run several instances of a shop service, each registered (the gateway balances
    /// them): `--replicas orders=3`; repeatable. The first keeps the configured port, the
    /// others take free ones.
    #[arg(long = "replicas", value_name = "SERVICE=N", value_parser = replicas)]
    pub replicas: Vec<(String, usize)>,
}

impl UpArgs {
    fn of(&self, service: &str) -> usize {
        self.replicas
            .iter()
            .rev()
            .find(|(name, _)| name == service)
            .map_or(1, |(_, count)| *count)
    }
}

fn replicas(text: &str) -> Result<(String, usize), String> {
    let (service, count) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: SERVICE=N, as in orders=3"))?;
    if !SHOP.contains(&service) {
        return Err(format!("{service:?}: one of {}", SHOP.join(", ")));
    }
    match count.parse::<usize>() {
        Ok(count @ 1..=16) => Ok((service.to_owned(), count)),
        _ => Err(format!("{count:?}: 1 to 16 instances")),
    }
}

/// Builds `count` instances of a service from `config`: the first on its configured
/// address, the others on free ports of the same host.
async fn instances<F>(
    count: usize,
    config: &keel_sdk::ServiceConfig,
    build: F,
) -> anyhow::Result<Vec<keel_sdk::service::RunningService>>
where
    F: AsyncFn(
        &keel_sdk::ServiceConfig,
    ) -> Result<keel_sdk::service::RunningService, keel_sdk::service::ServiceError>,
{
    let mut built = Vec::new();
    for index in 0..count {
        let mut config = config.clone();
        if index > 0 {
            let host = config
                .listen
                .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |listen| listen.ip());
            config.listen = Some(SocketAddr::new(host, 0));
        }
        built.push(build(&config).await?);
    }
    Ok(built)
}

/// Why some replicas cannot work: instances of one service must share its database, and
/// catalog instances their cache (or a write on one leaves the others' copies stale).
fn check_replicas(config: &KeelConfig, args: &UpArgs) -> anyhow::Result<()> {
    for (service, settings) in [
        ("catalog", &config.catalog),
        ("inventory", &config.inventory),
        ("payments", &config.payments),
        ("orders", &config.orders),
    ] {
        if args.of(service) < 2 {
            continue;
        }
        let memory = settings.database.as_ref().is_some_and(|url| {
            keel_sdk::data::sqlite_path(url.expose()).is_none()
                && url.expose().starts_with("sqlite:")
        });
        if memory {
            anyhow::bail!(
                "--replicas {service}: an in-memory database cannot be shared by instances"
            );
        }
        if service == "catalog" && settings.cache.is_none() {
            anyhow::bail!(
                "--replicas catalog: instances need a shared cache ([catalog.cache] redis = …), or a write on one leaves the others' cached copies stale"
            );
        }
    }
    Ok(())
}

/// Two components given one port would meet at the second bind as "address in use",
/// worded as if another process held it: refused here first, naming both keys. Port 0
/// (a free port each) never clashes; an unspecified address (`0.0.0.0`) clashes with every
/// address on its port.
fn check_ports(config: &KeelConfig) -> anyhow::Result<()> {
    let mut listens = vec![
        ("registry.listen", config.registry.listen),
        ("gateway.listen", config.gateway.listen),
        ("gateway.admin_listen", config.gateway.admin_listen),
        ("auth.listen", config.auth.listen),
    ];
    if let Some(tls) = &config.gateway.tls {
        listens.push(("gateway.tls.listen", tls.listen));
    }
    for (key, service, default) in [
        (
            "catalog.listen",
            &config.catalog,
            keel_catalog::DEFAULT_LISTEN,
        ),
        (
            "inventory.listen",
            &config.inventory,
            keel_inventory::DEFAULT_LISTEN,
        ),
        (
            "payments.listen",
            &config.payments,
            keel_payments::DEFAULT_LISTEN,
        ),
        ("orders.listen", &config.orders, keel_orders::DEFAULT_LISTEN),
    ] {
        listens.push((key, service.listen.unwrap_or(default)));
    }
    for (index, (key, addr)) in listens.iter().enumerate() {
        let clash = listens[..index].iter().find(|(_, other)| {
            addr.port() != 0
                && other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        });
        if let Some((other_key, other)) = clash {
            anyhow::bail!(
                "{other_key} ({other}) and {key} ({addr}) share a port: give each component its own"
            );
        }
    }
    Ok(())
}

/// Which profile `config` amounts to: embedded when everything is on SQLite and in process.
fn profile(config: &KeelConfig) -> &'static str {
    let sqlite = |url: Option<&str>| url.is_none_or(|url| url.starts_with("sqlite:"));
    let embedded = sqlite(Some(config.auth.database.expose()))
        && [
            &config.catalog,
            &config.inventory,
            &config.payments,
            &config.orders,
        ]
        .iter()
        .all(|service| {
            sqlite(service.database.as_ref().map(|url| url.expose().as_str()))
                && service.bus == keel_sdk::service::BusConfig::InProcess
        });
    if embedded { "embedded" } else { "production" }
}

pub async fn run(config: KeelConfig, file: Option<&Path>, args: &UpArgs) -> anyhow::Result<()> {
    check_replicas(&config, args)?;
    check_ports(&config)?;
    let profile = profile(&config);
    let guard = telemetry::init(&config.telemetry, "keel", &instance_id())?;
    // A stop goes in tiers: the gateway first, draining what it accepted while the
    // services behind it still answer; then the services and the authorization server
    // (deregistering); the registry last. A failure stops everything at once.
    let shutdown = Shutdown::new();
    let edge = shutdown.child();
    edge.trigger_on_signals();

    // Bind everything before serving anything, so a taken port stops the start cleanly.
    // The registry stops last, after the services have deregistered from it.
    let registry_shutdown = Shutdown::new();
    let registry_token = config.registry.acl_token.clone();
    let registry = RegistryServer::build(config.registry, &registry_shutdown).await?;
    let routes = config.gateway.routes.len();
    // In front of everything registered, unless the configuration says otherwise.
    // The registry is in this process: the gateway follows it wherever it listens.
    let mut gateway_config = config.gateway;
    gateway_config.discovery_routes.get_or_insert(true);
    if gateway_config.registry != keel_gateway::GatewayConfig::default().registry {
        tracing::warn!(
            configured = %gateway_config.registry,
            used = %registry.url(),
            "gateway.registry is not used by keel up: its gateway follows the registry it runs beside"
        );
    }
    gateway_config.registry = registry.url();
    let source = KeelConfig::gateway_source(file);
    let gateway = GatewayServer::build_with_source(gateway_config, source, &edge).await?;
    // The shop's services accept the tokens this authorization server issues by default.
    let audience = config.auth.default_audience.clone();
    let auth = AuthServer::build(config.auth, &shutdown).await?;
    let seeded = auth.admin().seed_demo().await?;
    // The shop's services: registered with this registry (so the gateway routes
    // /catalog/… to them), trusting this authorization server, on one in-process bus.
    let bus = keel_sdk::Bus::in_process("keel");
    let shop = |mut service: keel_sdk::ServiceConfig| {
        if service.registry.is_none() {
            service.registry = Some(registry.url());
            service.registry_token.clone_from(&registry_token);
        }
        service
            .auth
            .get_or_insert_with(|| keel_sdk::service::ServiceAuthConfig {
                issuer: auth.issuer().to_owned(),
                audiences: vec![audience.clone()],
            });
        service
    };
    let catalog = instances(args.of("catalog"), &shop(config.catalog), async |config| {
        keel_catalog::build(config, Some(&bus), &shutdown).await
    })
    .await?;
    let inventory = instances(
        args.of("inventory"),
        &shop(config.inventory),
        async |config| keel_inventory::build(config, Some(&bus), &shutdown).await,
    )
    .await?;
    let provider = &config.payment_provider;
    let payments = instances(
        args.of("payments"),
        &shop(config.payments),
        async |config| keel_payments::build(config, provider, Some(&bus), &shutdown).await,
    )
    .await?;
    let settings = &config.orders_settings;
    let orders = instances(args.of("orders"), &shop(config.orders), async |config| {
        keel_orders::build(config, settings, Some(&bus), &shutdown).await
    })
    .await?;
    let auth_what = format!(
        "authorization server: issuer {}, /.well-known/openid-configuration, /token",
        auth.issuer()
    );

    let gateway_what = format!(
        "API gateway: {routes} configured route(s), then /<service>/… for every registered service no configured route reaches"
    );
    if let Some(seeded) = seeded {
        print_seeded(&seeded);
    }
    let mut rows = vec![
        (
            registry.name(),
            registry.url(),
            "service registry: /v1/services, Consul /v1/health, Eureka /eureka/apps",
        ),
        (gateway.name(), gateway.url(), gateway_what.as_str()),
        (
            "gateway admin",
            gateway.admin_url(),
            "gateway admin API: /v1/routes, /v1/upstreams, /v1/reload (token)",
        ),
        (auth.name(), auth.url(), auth_what.as_str()),
    ];
    for (services, what) in [
        (
            &catalog,
            "shop catalog: /products (through the gateway: /catalog/products)",
        ),
        (
            &inventory,
            "shop inventory: /stock/{sku} (through the gateway: /inventory/stock/{sku})",
        ),
        (
            &payments,
            "shop payments, simulated provider: /payments (through the gateway: /payments/payments)",
        ),
        (
            &orders,
            "shop orders and the order saga: /orders (through the gateway: /orders/orders)",
        ),
    ] {
        for service in services {
            rows.push((service.name(), service.url(), what));
        }
    }
    print_table(profile, &rows);

    let registry = tokio::spawn({
        let (everything, own) = (shutdown.clone(), registry_shutdown.clone());
        async move {
            let result = run_server(registry, own.clone()).await;
            // A registry that stopped by itself stops the rest.
            if !own.is_triggered() {
                everything.trigger();
            }
            result
        }
    });
    let mut servers = JoinSet::new();
    servers.spawn({
        let everything = shutdown.clone();
        async move {
            let result = run_server(gateway, edge).await;
            everything.trigger();
            result
        }
    });
    servers.spawn(run_server(auth, shutdown.clone()));
    for service in [catalog, inventory, payments, orders].into_iter().flatten() {
        servers.spawn(run_server(service, shutdown.clone()));
    }
    let result = supervise(servers, &shutdown).await;
    // Deregistrations among the hooks: the registry still answers them.
    shutdown.run_hooks(HOOKS_DEADLINE).await;
    registry_shutdown.trigger();
    let registry = registry
        .await
        .map_err(anyhow::Error::from)
        .and_then(|result| result);
    registry_shutdown.run_hooks(HOOKS_DEADLINE).await;
    guard.shutdown();
    result.and(registry)
}

/// Builds and runs one component alone (`keel registry`, `keel gateway`, `keel auth`)
/// until a signal. Logging starts first, so that what the build warns of is seen.
pub async fn serve_alone<S: Server>(
    telemetry_config: &telemetry::TelemetryConfig,
    name: &str,
    build: impl AsyncFnOnce(&Shutdown) -> anyhow::Result<S>,
) -> anyhow::Result<()> {
    let guard = telemetry::init(telemetry_config, &format!("keel-{name}"), &instance_id())?;
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let result = match build(&shutdown).await {
        Ok(server) => {
            let mut servers = JoinSet::new();
            servers.spawn(run_server(server, shutdown.clone()));
            let result = supervise(servers, &shutdown).await;
            shutdown.run_hooks(HOOKS_DEADLINE).await;
            result
        }
        Err(error) => Err(error),
    };
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

fn print_table(profile: &str, rows: &[(&str, String, &str)]) {
    println!("Keel is up ({profile} profile). Ctrl-C stops it.\n");
    println!("  {:<14} {:<24} WHAT", "COMPONENT", "URL");
    for (name, url, what) in rows {
        println!("  {name:<14} {url:<24} {what}");
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
