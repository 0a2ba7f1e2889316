//! Active health probes: one task per HTTP or TCP check, reporting into the registry.

use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::catalog::CatalogError;
use crate::model::{CheckKind, Status};
use crate::registry::{RegistryError, WeakRegistry};

/// Starts probing `check_id` every interval until aborted or the registry is dropped.
pub(crate) fn spawn_probe(
    registry: WeakRegistry,
    http: reqwest::Client,
    check_id: String,
    kind: CheckKind,
) -> AbortHandle {
    let interval = match &kind {
        CheckKind::Http { interval, .. } | CheckKind::Tcp { interval, .. } => *interval,
        CheckKind::Ttl { ttl } => *ttl,
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (status, output) = probe(&http, &kind).await;
            let Some(registry) = registry.upgrade() else {
                return;
            };
            match registry
                .update_check(&check_id, status, Some(output))
                .await
            {
                Ok(_) => {}
                // The check is gone (instance deregistered between tick and report).
                Err(RegistryError::Catalog(CatalogError::NotFound(_))) => return,
                // The shared backend failed this write (etcd electing a leader, a lost
                // compare-and-swap race): the next tick reports again. Stopping here would
                // leave the check at its last status, passing for good.
                Err(error) => {
                    tracing::warn!(check = %check_id, %error, "a probe's result was not recorded; probing on");
                }
            }
        }
    })
    .abort_handle()
}

/// Runs one probe: Consul's rules, 2xx passing, 429 warning, anything else critical.
pub(crate) async fn probe(http: &reqwest::Client, kind: &CheckKind) -> (Status, String) {
    match kind {
        CheckKind::Http { url, timeout, .. } => {
            match http.get(url).timeout(*timeout).send().await {
                Ok(response) => {
                    let code = response.status();
                    let status = if code.is_success() {
                        Status::Passing
                    } else if code.as_u16() == 429 {
                        Status::Warning
                    } else {
                        Status::Critical
                    };
                    (status, format!("HTTP GET {url}: {code}"))
                }
                Err(error) if error.is_timeout() => (
                    Status::Critical,
                    format!("HTTP GET {url}: no answer within {timeout:?}"),
                ),
                Err(error) => (
                    Status::Critical,
                    format!(
                        "HTTP GET {url}: {}",
                        keel_runtime::http_client::error_chain(&error)
                    ),
                ),
            }
        }
        CheckKind::Tcp {
            address, timeout, ..
        } => match tokio::time::timeout(*timeout, TcpStream::connect(address.as_str())).await {
            Ok(Ok(_)) => (Status::Passing, format!("TCP connect {address}: success")),
            Ok(Err(error)) => (Status::Critical, format!("TCP connect {address}: {error}")),
            Err(_) => (
                Status::Critical,
                format!("TCP connect {address}: no answer within {timeout:?}"),
            ),
        },
        CheckKind::Ttl { .. } => (Status::Passing, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn tcp_probe_passes_on_a_listener_and_fails_on_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let kind = CheckKind::Tcp {
            address: address.clone(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let client = keel_runtime::http_client::builder().build().unwrap();
        assert_eq!(probe(&client, &kind).await.0, Status::Passing);
        drop(listener);
        assert_eq!(probe(&client, &kind).await.0, Status::Critical);
    }
}
