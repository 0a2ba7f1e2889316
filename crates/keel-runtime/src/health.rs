//! Liveness and readiness: `/health/live` answers while the process runs; `/health/ready`
//! runs every registered dependency check and answers 503 when any fails.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use http::StatusCode;
use serde::Serialize;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The dependency checks behind `/health/ready`.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<Vec<(String, CheckFn)>>>,
}

#[derive(Debug, Serialize)]
struct CheckReport {
    name: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
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

    async fn ready(&self) -> (bool, ReadyReport) {
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
}
