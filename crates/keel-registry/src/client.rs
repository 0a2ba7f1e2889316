//! The registry client: typed calls to the native API, a [`Registrar`] that keeps one
//! instance registered, and a [`DiscoveryView`] that keeps a live local view of services.
//!
//! Both survive a registry restart: the registrar re-registers when a heartbeat is answered
//! 404, and the view keeps serving its last known instances while it reconnects.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keel_runtime::{Problem, Secret, Shutdown};
use reqwest::StatusCode;
use tokio::sync::watch;

use crate::model::{
    Heartbeat, Instance, InstanceSpec, Registration, ServiceInstances, ServiceList, Status,
};

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry could not be reached or did not answer in time.
    /// Its text names the cause (refused, timed out, an untrusted certificate), which
    /// reqwest's own leaves to its sources.
    #[error("registry unreachable: {}", keel_runtime::http_client::error_chain(.0))]
    Unreachable(#[source] reqwest::Error),
    /// The instance or service is unknown (after a registry restart: re-register).
    #[error("not found: {0}")]
    NotFound(String),
    /// The registry refused the request; the problem document says why.
    #[error("registry answered {status}: {detail}")]
    Rejected { status: u16, detail: String },
    #[error("invalid registry URL {0:?}")]
    InvalidUrl(String),
}

/// How long a call may take, beyond any blocking wait it asks for.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Typed calls to the registry's native API.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    token: Option<Secret<String>>,
}

/// Filters and blocking parameters of an instance query.
#[derive(Debug, Clone, Default)]
pub struct InstancesQuery {
    pub passing: bool,
    pub tag: Option<String>,
    pub zone: Option<String>,
    /// Block until the service's index passes this one…
    pub index: Option<u64>,
    /// …or this long has passed.
    pub wait: Option<Duration>,
}

impl RegistryClient {
    /// A client for the registry at `base_url` (`http://127.0.0.1:8500`).
    pub fn new(base_url: &str, token: Option<Secret<String>>) -> Result<Self, ClientError> {
        let parsed = reqwest::Url::parse(base_url)
            .map_err(|_| ClientError::InvalidUrl(base_url.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ClientError::InvalidUrl(base_url.to_owned()));
        }
        let http = keel_runtime::http_client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(ClientError::Unreachable)?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            http,
            token,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn instance_url(&self, service: &str, id: &str) -> String {
        format!("{}/v1/services/{service}/instances/{id}", self.base)
    }

    fn write(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = traced(request).timeout(CALL_TIMEOUT);
        match &self.token {
            Some(token) => request.header("x-keel-token", token.expose()),
            None => request,
        }
    }

    pub async fn register(&self, registration: &Registration) -> Result<Instance, ClientError> {
        let request = self
            .http
            .put(self.instance_url(&registration.service, &registration.id))
            .json(&registration.spec);
        json(self.write(request).send().await).await
    }

    pub async fn deregister(&self, service: &str, id: &str) -> Result<(), ClientError> {
        let request = self.http.delete(self.instance_url(service, id));
        empty(self.write(request).send().await).await
    }

    pub async fn heartbeat(
        &self,
        service: &str,
        id: &str,
        beat: &Heartbeat,
    ) -> Result<Instance, ClientError> {
        let url = format!("{}/heartbeat", self.instance_url(service, id));
        let request = self.http.put(url).json(beat);
        json(self.write(request).send().await).await
    }

    pub async fn services(&self) -> Result<ServiceList, ClientError> {
        self.services_after(None).await
    }

    /// The service list once the catalog's index passes `after.0`, or when `after.1` has
    /// passed (a blocking query); at once without `after`.
    pub async fn services_after(
        &self,
        after: Option<(u64, Duration)>,
    ) -> Result<ServiceList, ClientError> {
        let url = format!("{}/v1/services", self.base);
        let mut request = traced(self.http.get(url)).timeout(CALL_TIMEOUT);
        if let Some((index, wait)) = after {
            request = request
                .query(&[
                    ("index", index.to_string()),
                    ("wait", format!("{}ms", wait.as_millis())),
                ])
                .timeout(CALL_TIMEOUT + wait);
        }
        json(request.send().await).await
    }

    pub async fn instances(
        &self,
        service: &str,
        query: &InstancesQuery,
    ) -> Result<ServiceInstances, ClientError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if query.passing {
            params.push(("passing", "true".into()));
        }
        if let Some(tag) = &query.tag {
            params.push(("tag", tag.clone()));
        }
        if let Some(zone) = &query.zone {
            params.push(("zone", zone.clone()));
        }
        let mut timeout = CALL_TIMEOUT;
        if let Some(index) = query.index {
            params.push(("index", index.to_string()));
            let wait = query.wait.unwrap_or(Duration::from_secs(300));
            params.push(("wait", format!("{}ms", wait.as_millis())));
            timeout += wait;
        }
        let url = format!("{}/v1/services/{service}", self.base);
        json(
            traced(self.http.get(url))
                .query(&params)
                .timeout(timeout)
                .send()
                .await,
        )
        .await
    }
}

/// Carries the caller's trace context (`traceparent`) to the registry.
fn traced(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let mut headers = http::HeaderMap::new();
    keel_runtime::trace_context::inject_current(&mut headers);
    request.headers(headers)
}

async fn json<T: serde::de::DeserializeOwned>(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<T, ClientError> {
    let response = checked(response).await?;
    response.json().await.map_err(ClientError::Unreachable)
}

async fn empty(response: Result<reqwest::Response, reqwest::Error>) -> Result<(), ClientError> {
    checked(response).await.map(drop)
}

async fn checked(
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, ClientError> {
    let response = response.map_err(ClientError::Unreachable)?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let detail = match response.json::<Problem>().await {
        Ok(problem) => problem.detail.unwrap_or(problem.title),
        Err(_) => status.to_string(),
    };
    if status == StatusCode::NOT_FOUND {
        Err(ClientError::NotFound(detail))
    } else {
        Err(ClientError::Rejected {
            status: status.as_u16(),
            detail,
        })
    }
}

// === impl Registrar ===

/// Keeps one instance registered: registers at start, heartbeats, re-registers when the
/// registry has forgotten it, and deregisters as soon as the shutdown signal fires.
pub struct Registrar;

impl Registrar {
    /// Starts keeping `registration` registered, heartbeating every `interval` (a third of
    /// the TTL is customary). When `shutdown` fires the instance is deregistered at once,
    /// while its servers drain, so that callers stop picking it before it stops
    /// accepting (a Consul or Eureka client deregisters first too); `shutdown`'s hooks
    /// wait for that deregistration.
    pub fn spawn(
        client: RegistryClient,
        registration: Registration,
        interval: Duration,
        shutdown: &Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let stop = shutdown.clone();
        let (service, id) = (registration.service.clone(), registration.id.clone());
        // Dropped when the deregistration is done (or given up).
        let (ended, loop_ended) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ended = ended;
            let mut registered = false;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    // Stopping first: never a registration once shutdown has begun.
                    biased;
                    () = stop.wait() => break,
                    _ = ticker.tick() => {}
                }
                registered = keep_registered(&client, &registration, registered).await;
            }
            // After the last round, which may have been a registration on its way: it
            // would otherwise arrive after the deregistration and register it again.
            let (service, id) = (&registration.service, &registration.id);
            match tokio::time::timeout(Duration::from_secs(5), client.deregister(service, id)).await
            {
                Ok(Ok(())) => tracing::info!(%service, instance = %id, "deregistered"),
                Ok(Err(error)) => {
                    tracing::warn!(%service, instance = %id, %error, "deregistration failed")
                }
                Err(_) => tracing::warn!(%service, instance = %id, "deregistration timed out"),
            }
        });
        shutdown.on_shutdown(&format!("deregister {service}/{id}"), async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), loop_ended).await;
        });
        task
    }
}

/// One round: register if needed, else heartbeat; returns whether the instance is
/// registered afterwards.
async fn keep_registered(
    client: &RegistryClient,
    registration: &Registration,
    registered: bool,
) -> bool {
    let (service, id) = (&registration.service, &registration.id);
    if registered {
        match client.heartbeat(service, id, &Heartbeat::default()).await {
            Ok(_) => return true,
            Err(ClientError::NotFound(_)) => {
                tracing::info!(%service, instance = %id, "registry forgot this instance; registering again");
            }
            Err(error) => {
                tracing::warn!(%service, instance = %id, %error, "heartbeat failed");
                return true;
            }
        }
    }
    match client.register(registration).await {
        Ok(_) => {
            tracing::info!(%service, instance = %id, registry = %client.base_url(), "registered");
            true
        }
        Err(error) => {
            tracing::warn!(%service, instance = %id, %error, "registration failed; will retry");
            false
        }
    }
}

/// Convenience: a registration with one TTL check.
pub fn ttl_registration(
    service: &str,
    id: &str,
    address: &str,
    port: u16,
    ttl: Duration,
) -> Registration {
    Registration {
        service: service.to_owned(),
        id: id.to_owned(),
        spec: InstanceSpec {
            address: address.to_owned(),
            port,
            scheme: crate::model::Scheme::Http,
            tags: Vec::new(),
            version: None,
            zone: None,
            weight: 1,
            meta: Default::default(),
            checks: vec![crate::model::CheckSpec {
                ttl: Some(ttl),
                deregister_after: Some(ttl * 10),
                ..Default::default()
            }],
        },
    }
}

// === impl DiscoveryView ===

/// A live local view of the passing instances of watched services.
///
/// Each watched service has a task running blocking queries; the view keeps the last answer,
/// so callers read it without a network call and keep working while the registry is away.
#[derive(Clone)]
pub struct DiscoveryView {
    client: RegistryClient,
    services: Arc<RwLock<HashMap<String, Arc<Vec<Instance>>>>>,
    version: watch::Sender<u64>,
    shutdown: Shutdown,
}

/// Longest pause between reconnection attempts while the registry is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Blocking-query wait of the view's watch loops.
const VIEW_WAIT: Duration = Duration::from_secs(60);

impl DiscoveryView {
    pub fn new(client: RegistryClient, shutdown: &Shutdown) -> Self {
        Self {
            client,
            services: Arc::default(),
            version: watch::channel(0).0,
            shutdown: shutdown.clone(),
        }
    }

    /// Starts watching `service` (no-op when already watched).
    pub fn watch(&self, service: &str) {
        {
            let mut services = self
                .services
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if services.contains_key(service) {
                return;
            }
            services.insert(service.to_owned(), Arc::new(Vec::new()));
        }
        let view = self.clone();
        let service = service.to_owned();
        tokio::spawn(async move { view.watch_loop(service).await });
    }

    /// The passing instances of `service` as last seen (empty when unknown).
    pub fn instances(&self, service: &str) -> Arc<Vec<Instance>> {
        self.services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Follows the catalog: every service registered now or later is watched, so
    /// [`Self::instances`] knows them all. The number of watches is bounded by what the
    /// registry holds, never by what callers ask for.
    pub fn watch_catalog(&self) {
        let view = self.clone();
        tokio::spawn(async move {
            let mut index = 0;
            let mut backoff = Duration::from_millis(100);
            loop {
                let answer = tokio::select! {
                    answer = view.client.services_after(Some((index, VIEW_WAIT))) => answer,
                    () = view.shutdown.wait() => return,
                };
                match answer {
                    Ok(list) => {
                        backoff = Duration::from_millis(100);
                        index = list.index;
                        for service in &list.services {
                            view.watch(&service.name);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, ?backoff, "catalog watch failed; retrying");
                        index = 0;
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = view.shutdown.wait() => return,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }

    /// Whether `service` is watched (configured, or found in the followed catalog).
    pub fn knows(&self, service: &str) -> bool {
        self.services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(service)
    }

    /// A receiver that changes whenever any watched service's instances change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    async fn watch_loop(self, service: String) {
        let mut index = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            let query = InstancesQuery {
                passing: true,
                index: Some(index),
                wait: Some(VIEW_WAIT),
                ..InstancesQuery::default()
            };
            let answer = tokio::select! {
                answer = self.client.instances(&service, &query) => answer,
                () = self.shutdown.wait() => return,
            };
            match answer {
                Ok(found) => {
                    backoff = Duration::from_millis(100);
                    if found.index != index {
                        index = found.index;
                        self.store(&service, found.instances);
                    }
                }
                Err(error) => {
                    tracing::debug!(%service, %error, ?backoff, "watch failed; serving the last view");
                    // Restart from a fresh read: the registry may be a new incarnation.
                    index = 0;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.wait() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn store(&self, service: &str, instances: Vec<Instance>) {
        let passing = instances
            .into_iter()
            .filter(|instance| instance.status == Status::Passing)
            .collect();
        self.services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(service.to_owned(), Arc::new(passing));
        self.version.send_modify(|version| *version += 1);
    }
}
