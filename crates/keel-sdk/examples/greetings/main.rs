//! The smallest complete Keel service: a database table, an HTTP API that writes to it
//! and publishes an event in the same transaction, a cached read, a consumer of its own
//! events, and the standard endpoints. `docs/write-a-service.md` walks through it.
//!
//! ```sh
//! cargo run -p keel-sdk --example greetings            # SQLite under .keel/, in-process bus
//! KEEL_GREETINGS__LISTEN=127.0.0.1:8190 cargo run -p keel-sdk --example greetings
//! curl -X POST localhost:8190/greetings -H 'content-type: application/json' -d '{"name":"Ada"}'
//! curl localhost:8190/greetings/Ada
//! ```

use std::io;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_runtime::{Problem, Shutdown};
use keel_sdk::cache::{Cache, CacheOptions};
use keel_sdk::events::asyncapi::AsyncApi;
use keel_sdk::events::{Bus, Event, Handler, HandlerError, Received};
use keel_sdk::service::{RunningService, Service, ServiceConfig};
use keel_sdk::{Database, Migrations, Tx, sqlx};
use serde::{Deserialize, Serialize};

/// The service's tables, one folder per backend.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("examples/greetings/migrations/postgres"),
    sqlite: sqlx::migrate!("examples/greetings/migrations/sqlite"),
};

/// Someone was greeted: what other services (and this one) hear about.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Greeted {
    pub name: String,
}

impl Event for Greeted {
    const TYPE: &'static str = "keel.greetings.greeted.v1";
    fn key(&self) -> String {
        self.name.clone()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Greeting {
    pub name: String,
    pub times: i64,
}

#[derive(Clone)]
struct App {
    db: Database,
    bus: Bus,
    cache: Cache<Greeting>,
}

/// `POST /greetings {"name": …}`: counts the greeting and publishes `Greeted`, both in one
/// transaction (the event leaves through the outbox once it commits).
async fn greet(
    State(app): State<App>,
    Json(body): Json<Greeted>,
) -> Result<Json<Greeting>, Problem> {
    if body.name.is_empty() || body.name.len() > 100 {
        return Err(Problem::bad_request("name must be 1 to 100 bytes"));
    }
    let internal = |error: &dyn std::fmt::Display| Problem::internal(error.to_string());
    let mut tx = app.db.begin().await.map_err(|e| internal(&e))?;
    let times: i64 = sqlx::query_scalar(
        "INSERT INTO greetings (name, times) VALUES ($1, 1) \
         ON CONFLICT (name) DO UPDATE SET times = greetings.times + 1 RETURNING times",
    )
    .bind(&body.name)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| internal(&e))?;
    app.bus
        .stage(&mut tx, &body)
        .await
        .map_err(|e| internal(&e))?;
    app.cache.invalidate_after_commit(&mut tx, &body.name);
    tx.commit().await.map_err(|e| internal(&e))?;
    Ok(Json(Greeting {
        name: body.name,
        times,
    }))
}

/// `GET /greetings/{name}`: read through the cache.
async fn greeting(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<Greeting>, Problem> {
    let db = app.db.clone();
    let key = name.clone();
    let found = app
        .cache
        .get_or_load(&name, || async move {
            sqlx::query_scalar::<_, i64>("SELECT times FROM greetings WHERE name = $1")
                .bind(&key)
                .fetch_optional(db.pool())
                .await
                .map(|times| times.map(|times| Greeting { name: key, times }))
        })
        .await
        .map_err(|error| Problem::internal(error.to_string()))?;
    found
        .map(|greeting| Json((*greeting).clone()))
        .ok_or_else(|| Problem::not_found(format!("{name} was never greeted")))
}

/// Hears its own `Greeted` events, once each however often they are delivered.
struct Welcome;

impl Handler<Greeted> for Welcome {
    async fn handle(&self, _: &mut Tx, greeted: Received<Greeted>) -> Result<(), HandlerError> {
        tracing::info!(name = %greeted.event.name, "welcome");
        Ok(())
    }
}

/// Builds the service from its configuration: connections, routes, documents, consumer.
pub async fn build(config: &ServiceConfig, shutdown: &Shutdown) -> io::Result<RunningService> {
    let service = Service::connect("greetings", config, &MIGRATIONS, None, shutdown)
        .await
        .map_err(io::Error::other)?;
    let app = App {
        db: service.db().clone(),
        bus: service.bus().clone(),
        cache: Cache::new("greetings", 1, CacheOptions::default(), None),
    };
    let router = Router::new()
        .route("/greetings", post(greet))
        .route("/greetings/{name}", get(greeting))
        .with_state(app);
    let consumer = service
        .bus()
        .consumer("greetings", service.db())
        .on::<Greeted, _>(Welcome)
        .start()
        .await
        .map_err(io::Error::other)?;
    let asyncapi = AsyncApi::new("greetings", "1.0.0")
        .sends::<Greeted>()
        .receives::<Greeted>()
        .to_json();
    service
        .http(router)
        .openapi(serde_json::json!({
            "openapi": "3.1.0",
            "info": { "title": "greetings", "version": "1.0.0" },
            "paths": {
                "/greetings": { "post": { "summary": "Greet someone" } },
                "/greetings/{name}": { "get": { "summary": "How often someone was greeted" } },
            },
        }))
        .document("/asyncapi.json", asyncapi)
        .consumer(consumer)
        .bind()
        .await
        .map_err(io::Error::other)
}

/// `[greetings]` and `[telemetry]`, from `KEEL_GREETINGS__…` and `KEEL_TELEMETRY__…`
/// variables (no file is read: `load(None)`).
#[derive(Default, Deserialize)]
#[serde(default)]
struct Config {
    greetings: ServiceConfig,
    telemetry: keel_runtime::telemetry::TelemetryConfig,
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let config: Config = keel_runtime::config::load(None).map_err(io::Error::other)?;
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let telemetry = keel_runtime::telemetry::init(&config.telemetry, "greetings", &instance)
        .map_err(io::Error::other)?;
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let service = build(&config.greetings, &shutdown).await?;
    println!("greetings listening on http://{}", service.local_addr());
    // Hooks (deregistration) and the telemetry flush run however the service ended.
    let result = service.run(shutdown.clone()).await;
    shutdown.run_hooks(std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    result
}
