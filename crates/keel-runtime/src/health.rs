//! Liveness and readiness: `/health/live` answers while the process runs; `/health/ready`
//! runs every registered dependency check and answers 503 when any fails. Its answer is
//! reused for a second, and callers meanwhile wait for the round under way: the endpoint
//! needs no token, so a flood of probes must not become a flood of database queries.
//! Once the server's stop signal fires it answers 503 `draining` (see
//! `HttpServerConfig::shutdown_delay`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use http::StatusCode;
use serde::Serialize;

use crate::shutdown::Shutdown;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a readiness answer is reused.
const ANSWER_KEPT: Duration = Duration::from_secs(1);

/// The dependency checks behind `/health/ready`.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
    /// The last answer and when its round ended; locked for a whole round, so that
    /// concurrent callers share it.
    last: Arc<tokio::sync::Mutex<Option<(Instant, bool, ReadyReport)>>>,
    /// The stop signal of the server answering: once it fires, not ready (`draining`).
    stopping: Arc<OnceLock<Shutdown>>,
}

#[derive(Debug, Clone, Serialize)]
struct CheckReport {
    name: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct ReadyReport {
    status: &'static str,
    checks: Vec<CheckReport>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a named dependency check; `Err` carries why the dependency is not usable.
    pub fn add_check<F, Fut>(&self, name: &str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: CheckFn = Arc::new(move || Box::pin(check()));
        self.checks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.to_owned(), check));
    }

    /// Answers `draining` (503) once `shutdown` fires, without running the checks: the
    /// instance is going away, whatever its dependencies say. The first signal followed
    /// counts.
    pub fn follow(&self, shutdown: &Shutdown) {
        let _ = self.stopping.set(shutdown.clone());
    }

    fn draining(&self) -> bool {
        self.stopping.get().is_some_and(Shutdown::is_triggered)
    }

    /// The last round's answer while it is fresh, else a new round's.
    async fn ready(&self) -> (bool, ReadyReport) {
        let mut last = self.last.lock().await;
        if let Some((at, ok, report)) = last.as_ref()
            && at.elapsed() < ANSWER_KEPT
        {
            return (*ok, report.clone());
        }
        let (ok, report) = self.check_all().await;
        *last = Some((Instant::now(), ok, report.clone()));
        (ok, report)
    }

    async fn check_all(&self) -> (bool, ReadyReport) {
        let checks: Vec<(String, CheckFn)> = self
            .checks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let results = join_all(checks.into_iter().map(|(name, check)| async move {
            let result = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            CheckReport {
                name,
                status: if result.is_ok() { "up" } else { "down" },
                error: result.err(),
            }
        }))
        .await;
        let ok = results.iter().all(|check| check.error.is_none());
        let report = ReadyReport {
            status: if ok { "up" } else { "down" },
            checks: results,
        };
        (ok, report)
    }
}

pub(crate) async fn live() -> Response {
    Json(serde_json::json!({ "status": "up" })).into_response()
}

pub(crate) async fn ready(State(health): State<Health>) -> Response {
    if health.draining() {
        let report = ReadyReport {
            status: "draining",
            checks: Vec::new(),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(report)).into_response();
    }
    let (ok, report) = health.ready().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_fails_when_any_check_fails_and_names_it() {
        let health = Health::new();
        health.add_check("database", || async { Ok(()) });
        health.add_check("broker", || async { Err("connection refused".to_owned()) });
        let (ok, report) = health.ready().await;
        assert!(!ok);
        let broker = report
            .checks
            .iter()
            .find(|c| c.name == "broker")
            .expect("broker reported");
        assert_eq!(broker.error.as_deref(), Some("connection refused"));
        let (ok, _) = Health::new().ready().await;
        assert!(ok, "no checks means ready");
    }

    #[tokio::test]
    async fn concurrent_and_close_callers_share_one_round_of_checks() {
        let health = Health::new();
        let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&rounds);
        health.add_check("database", move || {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            }
        });
        let answers = join_all((0..50).map(|_| health.ready())).await;
        assert!(answers.iter().all(|(ok, _)| *ok));
        assert_eq!(rounds.load(std::sync::atomic::Ordering::SeqCst), 1);
        tokio::time::sleep(ANSWER_KEPT).await;
        health.ready().await;
        assert_eq!(
            rounds.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "checked again once the answer is old"
        );
    }
}
