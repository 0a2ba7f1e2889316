//! Configuration changes while serving: the admin API, file reloads, rejected changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use keel_gateway::server::ConfigSource;
use keel_gateway::{GatewayConfig, GatewayServer};
use keel_runtime::Shutdown;

use serde_json::{Value, json};

use crate::support::{Running, Upstream, served_by, test_config};

const TOKEN: &str = "admin-secret-token";

struct Watched {
    gateway: Running,
    file: PathBuf,
}

/// Writes the routes file and starts a gateway that watches it.
async fn start(toml: &str) -> Watched {
    let file = std::env::temp_dir().join(format!("{}.toml", keel_testkit::unique_name("gw")));
    std::fs::write(&file, toml).unwrap();
    let path = file.clone();
    let load = move || {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        keel_runtime::config::from_toml::<GatewayConfig>(&text).map_err(|e| e.to_string())
    };
    let config = load().unwrap();
    let source = ConfigSource {
        path: file.clone(),
        load: Box::new(load),
    };
    let server = GatewayServer::build_with_source(config, Some(source), &Shutdown::new())
        .await
        .unwrap();
    Watched {
        gateway: Running::spawn(server),
        file,
    }
}

fn routes_toml(name: &str, upstream: &Upstream) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         admin_token = \"{TOKEN}\"\nwatch_interval = \"50ms\"\n\n\
         [[routes]]\nname = \"{name}\"\nmatch = {{ path_prefix = \"/\" }}\nupstreams = [\"{}\"]\n",
        upstream.url
    )
}

fn admin(running: &Watched, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    keel_testkit::http()
        .request(method, format!("{}{path}", running.gateway.admin))
        .bearer_auth(TOKEN)
}

async fn who(url: &str) -> String {
    served_by(keel_testkit::http().get(url).send().await.unwrap()).await
}

async fn eventually_served_by(url: &str, expected: &str) {
    for _ in 0..100 {
        if who(url).await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url} never reached {expected}");
}

#[tokio::test]
async fn the_admin_api_requires_its_token() {
    let up = Upstream::start("a");
    let running = start(&routes_toml("main", &up)).await;
    let client = keel_testkit::http();
    let url = format!("{}/v1/routes", running.gateway.admin);
    let missing = client.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key("www-authenticate"));
    let wrong = client.get(&url).bearer_auth("guess").send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let health = client
        .get(format!("{}/health/ready", running.gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK, "health needs no token");
    let metrics = client
        .get(format!("{}/metrics", running.gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);

    // Without a configured token the admin API stays shut.
    let server = GatewayServer::build(test_config(Vec::new()), &Shutdown::new())
        .await
        .unwrap();
    let shut = format!("http://{}/v1/routes", server.admin_addr());
    let _server = keel_testkit::spawn(server);
    let response = client
        .get(&shut)
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn routes_are_added_and_removed_through_the_admin_api() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let running = start(&routes_toml("main", &a)).await;
    let route = json!({
        "name": "extra",
        "match": { "path_prefix": "/extra" },
        "upstreams": [b.url],
        "balance": "least_request",
    });
    let response = admin(&running, reqwest::Method::PUT, "/v1/routes/extra")
        .json(&route)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{}",
        response.text().await.unwrap()
    );
    assert_eq!(
        who(&format!("{}/extra/1", running.gateway.proxy.url)).await,
        "b"
    );
    assert_eq!(
        who(&format!("{}/other", running.gateway.proxy.url)).await,
        "a"
    );

    let listed: Value = admin(&running, reqwest::Method::GET, "/v1/routes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sources: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["source"].as_str().unwrap()))
        .collect();
    assert_eq!(sources, [("main", "file"), ("extra", "api")]);

    let upstreams: Value = admin(&running, reqwest::Method::GET, "/v1/upstreams")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let extra = upstreams
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["route"] == "extra")
        .unwrap();
    assert_eq!(extra["circuit"], "closed");
    assert_eq!(extra["endpoints"][0]["url"], format!("{}/", b.url));

    // A file route cannot be changed here; an unknown one cannot be deleted.
    let response = admin(&running, reqwest::Method::DELETE, "/v1/routes/main")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let response = admin(&running, reqwest::Method::DELETE, "/v1/routes/nope")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // An invalid route is refused with the reason; the running routes keep serving.
    let response = admin(&running, reqwest::Method::PUT, "/v1/routes/broken")
        .json(&json!({ "name": "broken", "upstreams": ["ftp://nowhere"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = response.text().await.unwrap();
    assert!(body.contains("ftp://nowhere"), "{body}");
    assert_eq!(
        who(&format!("{}/extra/1", running.gateway.proxy.url)).await,
        "b"
    );
    let response = admin(&running, reqwest::Method::PUT, "/v1/routes/x")
        .json(&json!({ "name": "x", "surprise": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::BAD_REQUEST,
        "unknown fields refused"
    );

    let response = admin(&running, reqwest::Method::DELETE, "/v1/routes/extra")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        who(&format!("{}/extra/1", running.gateway.proxy.url)).await,
        "a"
    );
}

#[tokio::test]
async fn a_changed_file_is_applied_and_an_invalid_one_refused() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let running = start(&routes_toml("main", &a)).await;
    assert_eq!(who(&running.gateway.proxy.url).await, "a");

    std::fs::write(&running.file, routes_toml("main", &b)).unwrap();
    eventually_served_by(&running.gateway.proxy.url, "b").await;

    std::fs::write(
        &running.file,
        "[[routes]]\nname = \"main\"\nupstreams = [\"ftp://x\"]\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        who(&running.gateway.proxy.url).await,
        "b",
        "the running routes keep serving"
    );
    let response = admin(&running, reqwest::Method::POST, "/v1/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("ftp://x") && body.contains("unchanged"),
        "{body}"
    );

    std::fs::write(
        &running.file,
        "listen = \"127.0.0.1:1\"\n[[routes]]\nname = \"main\"\nupstreams = [\"ftp",
    )
    .unwrap();
    let response = admin(&running, reqwest::Method::POST, "/v1/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unparseable TOML"
    );

    std::fs::write(
        &running.file,
        routes_toml("main", &a).replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1),
    )
    .unwrap();
    let report: Value = admin(&running, reqwest::Method::POST, "/v1/reload")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["needs_restart"], json!(["listen"]));
    assert_eq!(who(&running.gateway.proxy.url).await, "a");
    std::fs::remove_file(&running.file).unwrap();
}

#[tokio::test]
async fn reloads_under_load_drop_nothing() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let running = start(&routes_toml("main", &a)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let client = keel_testkit::http();
    let mut load = Vec::new();
    for _ in 0..6 {
        let (client, url, stop) = (
            client.clone(),
            running.gateway.proxy.url.clone(),
            Arc::clone(&stop),
        );
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == StatusCode::OK => ok += 1,
                    Ok(response) => failed.push(response.status().to_string()),
                    Err(error) => failed.push(error.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    for n in 0..20 {
        let target = if n % 2 == 0 { &b } else { &a };
        std::fs::write(&running.file, routes_toml(&format!("main-{n}"), target)).unwrap();
        let response = admin(&running, reqwest::Method::POST, "/v1/reload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (ok, failed) = task.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    assert!(total > 100, "{total}");
    assert!(a.hits() > 0 && b.hits() > 0);
    std::fs::remove_file(&running.file).unwrap();
}
