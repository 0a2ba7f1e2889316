//! Bootstrap: a few lines turn a service name, its migrations and an axum `Router` into a
//! running service.
//!
//! ```ignore
//! let service = Service::connect("catalog", &config, &MIGRATIONS, None, &shutdown).await?;
//! let router = routes(service.db().clone(), service.bus().clone());
//! let consumer = service.bus().consumer("catalog", service.db()).on::<..>(..).start().await?;
//! let running = service
//!     .http(router)
//!     .openapi(openapi_document())
//!     .consumer(consumer)
//!     .bind()
//!     .await?;
//! running.run(shutdown).await?;
//! ```
//!
//! [`Service::connect`] opens the database (created and migrated), the bus, the access-token
//! verifier and the registry view, as configured; [`Service::bind`] adds `/health/live`,
//! `/health/ready` (which checks the database), `/metrics`, and whichever documents were
//! given (`/openapi.json`, ...), and binds. [`RunningService::run`] registers the instance
//! with a TTL check it heartbeats, runs the outbox relay, the consumers and the workers
//! beside the HTTP server, and on shutdown drains and stops them. The deregistration is a
//! shutdown hook: whoever owns the shutdown runs the hooks after `run` returns, whether it
//! returned well or not (see the greetings example). Several instances of one service run
//! side by side: each registers under its own id.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use keel_jwt::{Verifier, VerifierConfig};
use keel_registry::client::{DiscoveryView, Registrar, RegistryClient, ttl_registration};
use keel_runtime::http::{BindError, HttpServerConfig};
use keel_runtime::{Health, HttpServer, Problem, Secret, Shutdown};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::cache::CacheRedis;
use crate::data::{Database, DbError, Migrations};
use crate::events::{Bus, BusError, Consumer, RabbitMqOptions};

/// `[<service>]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unset: the service's own default port (a free one for services without).
    pub listen: Option<SocketAddr>,
    /// The host other services reach this instance at; the listen address's when unset
    /// (127.0.0.1 when that is unspecified).
    pub advertise: Option<String>,
    /// `postgres://…` or `sqlite://…`; `sqlite://.keel/<service>.db` when unset.
    pub database: Option<Secret<String>>,
    /// The registry to register with and discover from; none: neither.
    pub registry: Option<String>,
    /// The registry's ACL token (its `acl_token`), sent with registrations, heartbeats
    /// and deregistrations; reads need none. `keel up` passes its own registry's.
    pub registry_token: Option<Secret<String>>,
    /// Heartbeat interval; the instance's TTL is three of them.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    pub bus: BusConfig,
    /// Access tokens accepted from callers (issuer and audiences); none: no verifier.
    pub auth: Option<ServiceAuthConfig>,
    /// Redis as the caches' second level, shared by the service's instances (and their
    /// invalidations); none: each instance caches in its own memory only.
    pub cache: Option<CacheConfig>,
    pub http: HttpServerConfig,
}

/// `[<service>.cache]`: Redis behind the in-process cache level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `redis://host:6379` (or `rediss://`); redacted when printed.
    pub redis: Secret<String>,
    /// Key prefix, one per deployment (several can share a Redis); keys and the
    /// invalidation channel are under it and then the service's name, so services' caches
    /// never meet, whatever their caches are called.
    #[serde(default)]
    pub prefix: Option<String>,
    /// How long a Redis call may take before the cache does without it.
    #[serde(default = "cache_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn cache_timeout() -> Duration {
    Duration::from_millis(250)
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            listen: None,
            advertise: None,
            database: None,
            registry: None,
            registry_token: None,
            heartbeat: Duration::from_secs(10),
            bus: BusConfig::InProcess,
            auth: None,
            cache: None,
            http: HttpServerConfig::default(),
        }
    }
}

/// Which event bus a service uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BusConfig {
    InProcess,
    Rabbitmq(RabbitMqOptions),
    #[cfg(feature = "kafka")]
    Kafka(crate::events::KafkaOptions),
}

/// Whose access tokens a service accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAuthConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{service}: database: {error}")]
    Database {
        service: String,
        #[source]
        error: DbError,
    },
    #[error("{service}: event bus: {error}")]
    Bus {
        service: String,
        #[source]
        error: BusError,
    },
    #[error("{service}: {what}")]
    Config { service: String, what: String },
    #[error(transparent)]
    Bind(#[from] BindError),
}

impl ServiceError {
    /// Service `service`'s event bus failed (to connect, or to declare a consumer).
    pub fn bus(service: &str, error: BusError) -> Self {
        Self::Bus {
            service: service.to_owned(),
            error,
        }
    }
}

type Worker = Box<dyn FnOnce(Shutdown) -> BoxFuture<'static, ()> + Send>;

/// A service's connections, ready for its routes and workers to use.
pub struct Service {
    name: String,
    config: ServiceConfig,
    db: Database,
    bus: Bus,
    verifier: Option<Arc<Verifier>>,
    discovery: Option<DiscoveryView>,
    registry: Option<RegistryClient>,
    cache_redis: Option<CacheRedis>,
    health: Health,
    router: Router,
    workers: Vec<(String, Worker)>,
    /// The consumer groups of this service's consumers, whose dead letters the admin
    /// endpoints show.
    groups: Vec<String>,
}

impl Service {
    /// Connects what `config` names: the database (created if missing, `migrations` run
    /// under a lock), the bus (in process: `bus` when given, so the services of one process
    /// share it), the verifier and the registry view.
    pub async fn connect(
        name: &str,
        config: &ServiceConfig,
        migrations: &Migrations,
        in_process_bus: Option<&Bus>,
        shutdown: &Shutdown,
    ) -> Result<Self, ServiceError> {
        let url = config.database.as_ref().map_or_else(
            || format!("sqlite://.keel/{name}.db"),
            |url| url.expose().clone(),
        );
        let db =
            Database::connect(&url, migrations)
                .await
                .map_err(|error| ServiceError::Database {
                    service: name.to_owned(),
                    error,
                })?;
        let bus = match &config.bus {
            BusConfig::InProcess => {
                in_process_bus.map_or_else(|| Bus::in_process(name), |bus| bus.for_service(name))
            }
            BusConfig::Rabbitmq(options) => Bus::rabbitmq(name, options.clone())
                .await
                .map_err(|error| ServiceError::bus(name, error))?,
            #[cfg(feature = "kafka")]
            BusConfig::Kafka(options) => Bus::kafka(name, options.clone())
                .await
                .map_err(|error| ServiceError::bus(name, error))?,
        };
        let config_error = |what: String| ServiceError::Config {
            service: name.to_owned(),
            what,
        };
        if config.heartbeat < Duration::from_millis(100) {
            return Err(config_error("heartbeat must be at least 100ms".to_owned()));
        }
        let verifier = match &config.auth {
            Some(auth) => Some(Arc::new(
                Verifier::new(VerifierConfig::new(&auth.issuer, auth.audiences.clone()))
                    .map_err(|error| config_error(format!("auth: {error}")))?,
            )),
            None => None,
        };
        let registry = match &config.registry {
            Some(url) => Some(
                RegistryClient::new(url, config.registry_token.clone())
                    .map_err(|error| config_error(format!("registry: {error}")))?,
            ),
            None => None,
        };
        let discovery = registry
            .as_ref()
            .map(|client| DiscoveryView::new(client.clone(), shutdown));
        let cache_redis = match &config.cache {
            Some(cache) => Some(
                CacheRedis::new(
                    cache.redis.expose(),
                    &format!("{}{name}:", cache.prefix.as_deref().unwrap_or_default()),
                    cache.timeout,
                )
                .map_err(|error| config_error(format!("cache.redis: {error}")))?,
            ),
            None => None,
        };
        let health = Health::new();
        db.add_ready_check(&health);
        let mut service = Self {
            name: name.to_owned(),
            config: config.clone(),
            db,
            bus,
            verifier,
            discovery,
            registry,
            cache_redis,
            health,
            router: Router::new(),
            workers: Vec::new(),
            groups: Vec::new(),
        };
        let relay = service.bus.relay(&service.db);
        service = service.worker("outbox relay", move |shutdown| relay.run(shutdown));
        let (db, pool_name) = (service.db.clone(), name.to_owned());
        service = service.worker("housekeeping", move |shutdown| {
            housekeeping(db, pool_name, shutdown)
        });
        Ok(service)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The verifier of callers' access tokens, when `auth` is configured; [`Service::bind`]
    /// puts [`crate::auth::authenticate`] with it in front of every route.
    pub fn verifier(&self) -> Option<&Arc<Verifier>> {
        self.verifier.as_ref()
    }

    /// The registry's live view of other services, when a registry is configured (for
    /// [`crate::client::ServiceClient`]).
    pub fn discovery(&self) -> Option<&DiscoveryView> {
        self.discovery.as_ref()
    }

    /// Redis for the caches' second level, when `cache` is configured (for
    /// [`crate::cache::Cache::new`]).
    pub fn cache_redis(&self) -> Option<&CacheRedis> {
        self.cache_redis.as_ref()
    }

    /// `/health/ready` checks; add the service's own dependencies.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The service's routes (merged with any given before).
    pub fn http(mut self, router: Router) -> Self {
        self.router = self.router.merge(router);
        self
    }

    /// Serves `document` (an OpenAPI 3.1 document) at `/openapi.json`.
    pub fn openapi(self, document: serde_json::Value) -> Self {
        self.document("/openapi.json", document)
    }

    /// Serves a JSON document at `path` (`/asyncapi.json`, say).
    pub fn document(self, path: &str, document: serde_json::Value) -> Self {
        let document = Arc::new(document);
        let router = Router::new().route(
            path,
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json((*document).clone()) }
            }),
        );
        self.http(router)
    }

    /// Runs `consumer` beside the HTTP server; its dead letters appear under
    /// `/admin/dead-letters/<group>`.
    pub fn consumer(mut self, consumer: Consumer) -> Self {
        if !self.groups.iter().any(|group| group == consumer.group()) {
            self.groups.push(consumer.group().to_owned());
        }
        self.worker("consumer", move |shutdown| consumer.run(shutdown))
    }

    /// Runs `work` beside the HTTP server until shutdown. A worker that ends (or panics)
    /// before shutdown stops the whole service: better restarted by its supervisor
    /// (Kubernetes, `keel up`) than left running without it.
    pub fn worker<F, Fut>(mut self, name: &str, work: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.workers.push((
            name.to_owned(),
            Box::new(move |shutdown| Box::pin(work(shutdown))),
        ));
        self
    }

    /// Binds the listen address with the standard HTTP stack around the routes.
    pub async fn bind(mut self) -> Result<RunningService, ServiceError> {
        if let Some(verifier) = self.verifier.clone() {
            // Every route of the service reads its caller from a verified token (none:
            // anonymous); handlers ask for what they need with the `Caller` extractor.
            self.router = self
                .router
                .merge(dead_letter_admin(self.bus.clone(), self.groups.clone()))
                .layer(axum::middleware::from_fn_with_state(
                    verifier,
                    crate::auth::authenticate,
                ));
        }
        let listen = self
            .config
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let server = HttpServer::bind(
            &self.name,
            listen,
            self.router,
            self.health,
            self.config.http.clone(),
        )
        .await?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Ok(RunningService {
            instance_id: format!("{}-{}", self.name, &suffix[..8]),
            name: self.name,
            config: self.config,
            server,
            registry: self.registry,
            workers: self.workers,
        })
    }
}

/// `GET /admin/dead-letters/{group}?limit=N` lists a group's dead letters;
/// `POST /admin/dead-letters/{group}/replay?id=ID` replays one (or, without `id`, all).
/// For callers with the `admin` role; only the groups of this service's consumers.
fn dead_letter_admin(bus: Bus, groups: Vec<String>) -> Router {
    use axum::extract::{Path, Query};

    #[derive(Deserialize)]
    struct Params {
        limit: Option<usize>,
        id: Option<String>,
    }

    let groups = Arc::new(groups);
    // Why the caller may not see `group`'s dead letters, if they may not.
    let refusal = move |caller: &Caller, group: &str| -> Option<Response> {
        // Both, as for the authorization server's own admin API: the role alone may sit
        // in a token the admin gave some other client.
        let allowed = caller
            .require_scope("keel-admin")
            .and_then(|()| caller.require_role("admin"));
        if let Err(denied) = allowed {
            return Some(denied.into_response());
        }
        let known = groups.iter().any(|known| known == group);
        (!known)
            .then(|| Problem::not_found(format!("no consumer group {group} here")).into_response())
    };
    let answer = |result: Result<serde_json::Value, BusError>| match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(error) => Problem::unavailable(error.to_string()).into_response(),
    };
    let (list_bus, list_refusal) = (bus.clone(), refusal.clone());
    let list = move |caller: Caller, Path(group): Path<String>, Query(params): Query<Params>| {
        let (bus, refusal) = (list_bus.clone(), list_refusal.clone());
        async move {
            if let Some(refusal) = refusal(&caller, &group) {
                return refusal;
            }
            let limit = params.limit.unwrap_or(100).min(1000);
            let letters = bus.dead_letters(&group, limit).await;
            answer(letters.map(|letters| serde_json::to_value(letters).unwrap_or_default()))
        }
    };
    let replay = move |caller: Caller, Path(group): Path<String>, Query(params): Query<Params>| {
        let (bus, refusal) = (bus.clone(), refusal.clone());
        async move {
            if let Some(refusal) = refusal(&caller, &group) {
                return refusal;
            }
            let replayed = bus.replay_dead_letters(&group, params.id.as_deref()).await;
            answer(replayed.map(|replayed| serde_json::json!({ "replayed": replayed })))
        }
    };
    Router::new()
        .route("/admin/dead-letters/{group}", axum::routing::get(list))
        .route(
            "/admin/dead-letters/{group}/replay",
            axum::routing::post(replay),
        )
}

impl keel_runtime::Server for RunningService {
    fn name(&self) -> &str {
        &self.name
    }

    fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn run(self, shutdown: Shutdown) -> impl Future<Output = io::Result<()>> + Send {
        RunningService::run(self, shutdown)
    }
}

/// A bound service: [`RunningService::run`] serves, registers and runs its workers.
pub struct RunningService {
    name: String,
    config: ServiceConfig,
    server: HttpServer,
    registry: Option<RegistryClient>,
    workers: Vec<(String, Worker)>,
    instance_id: String,
}

impl RunningService {
    /// The id this instance registers under.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown`, then drains; an error when a worker stopped first.
    pub async fn run(self, shutdown: Shutdown) -> io::Result<()> {
        let server = self.server;
        let addr = server.local_addr();
        if let Some(client) = &self.registry {
            let host = self.config.advertise.clone().unwrap_or_else(|| {
                if addr.ip().is_unspecified() {
                    "127.0.0.1".to_owned()
                } else {
                    addr.ip().to_string()
                }
            });
            let mut registration = ttl_registration(
                &self.name,
                &self.instance_id,
                &host,
                addr.port(),
                self.config.heartbeat * 3,
            );
            // Callers (the gateway, other services) then speak HTTPS to it.
            if self.config.http.tls.is_some() {
                registration.spec.scheme = keel_registry::model::Scheme::Https;
            }
            Registrar::spawn(
                client.clone(),
                registration,
                self.config.heartbeat,
                &shutdown,
            );
        }
        let (failed, mut failures) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut tasks = Vec::new();
        for (name, work) in self.workers {
            let failed = failed.clone();
            let worker_shutdown = shutdown.clone();
            // The closure itself runs inside the task: a panic there is the worker's too.
            let task = tokio::spawn({
                let shutdown = worker_shutdown.clone();
                async move { work(shutdown).await }
            });
            tasks.push(tokio::spawn(async move {
                let ended = task.await;
                if !worker_shutdown.is_triggered() {
                    let how = if ended.is_err() { "panicked" } else { "ended" };
                    let _ = failed.send(format!("worker {name} {how}"));
                }
            }));
        }
        drop(failed);
        let stop = shutdown.clone();
        let watchdog = async move {
            let failure = failures.recv().await;
            if let Some(failure) = &failure {
                tracing::error!(%failure, "a worker stopped; stopping the service");
                stop.trigger();
            }
            failure
        };
        let (served, failure) = tokio::join!(server.run(shutdown.clone()), async {
            tokio::select! {
                failure = watchdog => failure,
                () = shutdown.wait() => None,
            }
        });
        // Workers get the drain timeout to stop; one that ignores shutdown is aborted.
        let drain = self.config.http.drain_timeout;
        for mut task in tasks {
            if tokio::time::timeout(drain, &mut task).await.is_err() {
                task.abort();
            }
        }
        served?;
        match failure {
            Some(failure) => Err(io::Error::other(failure)),
            None => Ok(()),
        }
    }
}

/// Pool gauges every five seconds (`db_client_connections_usage{pool_name,state}`, after
/// the OpenTelemetry semantic conventions) and the inbox pruned of entries older than a
/// week, hourly: a redelivery that late is not expected.
async fn housekeeping(db: Database, pool_name: String, shutdown: Shutdown) {
    const INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
    let mut ticks: u64 = 0;
    loop {
        let pool = db.pool();
        let idle = pool.num_idle() as f64;
        let used = f64::from(pool.size()) - idle;
        let gauge = |state: &'static str| metrics::gauge!("db_client_connections_usage", "pool_name" => pool_name.clone(), "state" => state);
        gauge("idle").set(idle);
        gauge("used").set(used.max(0.0));
        if ticks.is_multiple_of(720) {
            match db.prune_inbox(INBOX_RETENTION).await {
                Ok(pruned) if pruned > 0 => tracing::info!(pruned, "inbox pruned"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "inbox pruning failed"),
            }
        }
        ticks += 1;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.wait() => return,
        }
    }
}
