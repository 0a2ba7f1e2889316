//! Eureka-API round trips with the requests Spring Cloud Netflix's Eureka client sends and
//! the responses it parses, in JSON and in XML.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::helpers::*;

const JSON: &str = "application/json";

/// A register body as Spring Cloud Netflix sends it.
fn spring_instance(id: &str, ip: &str, port: u16, status: &str) -> Value {
    json!({"instance": {
        "instanceId": id,
        "hostName": format!("{id}.example"),
        "app": "ORDERS",
        "ipAddr": ip,
        "status": status,
        "overriddenStatus": "UNKNOWN",
        "port": {"$": port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {
            "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
            "name": "MyOwn"
        },
        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90},
        "metadata": {"management.port": port.to_string(), "zone": "eu-1a"},
        "homePageUrl": format!("http://{ip}:{port}/"),
        "statusPageUrl": format!("http://{ip}:{port}/actuator/info"),
        "healthCheckUrl": format!("http://{ip}:{port}/actuator/health"),
        "vipAddress": "orders",
        "secureVipAddress": "orders",
        "isCoordinatingDiscoveryServer": "false",
        "lastUpdatedTimestamp": "1700000000000",
        "lastDirtyTimestamp": "1700000000000"
    }})
}

const XML_INSTANCE: &str = r#"<instance>
  <instanceId>host-2:orders:8081</instanceId>
  <hostName>host-2.example</hostName>
  <app>ORDERS</app>
  <ipAddr>10.0.0.8</ipAddr>
  <status>UP</status>
  <overriddenstatus>UNKNOWN</overriddenstatus>
  <port enabled="true">8081</port>
  <securePort enabled="false">443</securePort>
  <countryId>1</countryId>
  <dataCenterInfo class="com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo">
    <name>MyOwn</name>
  </dataCenterInfo>
  <leaseInfo>
    <renewalIntervalInSecs>10</renewalIntervalInSecs>
    <durationInSecs>30</durationInSecs>
  </leaseInfo>
  <metadata>
    <management.port>8081</management.port>
    <zone>eu-1b</zone>
  </metadata>
  <homePageUrl>http://10.0.0.8:8081/</homePageUrl>
  <vipAddress>orders</vipAddress>
  <lastDirtyTimestamp>1700000000001</lastDirtyTimestamp>
</instance>"#;

// The XML shapes Eureka's clients read, parsed with serde independently of the server.

#[derive(Debug, Deserialize)]
struct XmlApplications {
    #[serde(rename = "versions__delta")]
    versions_delta: String,
    #[serde(rename = "apps__hashcode")]
    apps_hashcode: String,
    #[serde(rename = "application", default)]
    applications: Vec<XmlApplication>,
}

#[derive(Debug, Deserialize)]
struct XmlApplication {
    name: String,
    #[serde(rename = "instance", default)]
    instances: Vec<XmlInstance>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct XmlInstance {
    instance_id: String,
    host_name: String,
    app: String,
    ip_addr: String,
    status: String,
    overriddenstatus: String,
    port: XmlPort,
    secure_port: XmlPort,
    country_id: u32,
    data_center_info: XmlDataCenter,
    lease_info: XmlLease,
    metadata: BTreeMap<String, String>,
    home_page_url: String,
    vip_address: String,
    is_coordinating_discovery_server: bool,
    last_dirty_timestamp: u64,
    action_type: String,
}

#[derive(Debug, Deserialize)]
struct XmlPort {
    #[serde(rename = "@enabled")]
    enabled: bool,
    #[serde(rename = "$text")]
    value: u16,
}

#[derive(Debug, Deserialize)]
struct XmlDataCenter {
    #[serde(rename = "@class")]
    class: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct XmlLease {
    renewal_interval_in_secs: u64,
    duration_in_secs: u64,
}

async fn post_instance(base: &str, app: &str, body: Value) -> reqwest::Response {
    http()
        .post(format!("{base}/eureka/apps/{app}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn eureka_json(url: &str) -> (StatusCode, Value) {
    let response = http().get(url).header("accept", JSON).send().await.unwrap();
    let status = response.status();
    assert!(
        !status.is_success() || response.headers()["content-type"] == JSON,
        "{url} answers JSON"
    );
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A GET as curl or a browser sends it: Eureka answers XML.
async fn eureka_xml(url: &str) -> (StatusCode, String) {
    let response = http()
        .get(url)
        .header("accept", "*/*")
        .send()
        .await
        .unwrap();
    let status = response.status();
    if status.is_success() {
        assert_eq!(response.headers()["content-type"], "application/xml");
    }
    (status, response.text().await.unwrap())
}

async fn send(request: reqwest::RequestBuilder) -> StatusCode {
    request.send().await.unwrap().status()
}

/// The index of a native read, to block on.
async fn native_index(base: &str, service: &str) -> u64 {
    let (_, headers, _) = get_json(&format!("{base}/v1/services/{service}")).await;
    headers["x-keel-index"].to_str().unwrap().parse().unwrap()
}

async fn passing_ids(base: &str, service: &str) -> Vec<String> {
    let (_, _, body) = get_json(&format!("{base}/v1/services/{service}?passing")).await;
    body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|instance| instance["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_spring_registration_in_json_reads_back_in_json_xml_and_keel() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let response = post_instance(
        base,
        "ORDERS",
        spring_instance("host-1:orders:8080", "10.0.0.7", 8080, "UP"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // Keel's own view: service in lower case, the lease as a TTL check that evicts.
    let (status, _, native) = get_json(&format!(
        "{base}/v1/services/orders/instances/host-1:orders:8080"
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(native["address"], "10.0.0.7");
    assert_eq!(native["port"], 8080);
    assert_eq!(native["scheme"], "http");
    assert_eq!(native["zone"], "eu-1a");
    assert_eq!(native["status"], "passing");
    assert_eq!(native["meta"]["management.port"], "8080");
    assert_eq!(
        native["meta"]["eureka.hostName"],
        "host-1:orders:8080.example"
    );
    assert_eq!(native["checks"][0]["spec"]["ttl"], "1m 30s");
    assert_eq!(native["checks"][0]["spec"]["deregister_after"], "1m 30s");

    // JSON, as Spring's client fetches it (`apps/` with the slash).
    let (status, body) = eureka_json(&format!("{base}/eureka/apps/")).await;
    assert_eq!(status, StatusCode::OK);
    let apps = &body["applications"];
    assert_eq!(apps["versions__delta"], "1");
    assert_eq!(apps["apps__hashcode"], "UP_1_");
    assert_eq!(apps["application"][0]["name"], "ORDERS");
    let instance = &apps["application"][0]["instance"][0];
    let sent = &spring_instance("host-1:orders:8080", "10.0.0.7", 8080, "UP")["instance"];
    for field in [
        "instanceId",
        "hostName",
        "app",
        "ipAddr",
        "status",
        "overriddenStatus",
        "port",
        "securePort",
        "countryId",
        "dataCenterInfo",
        "metadata",
        "homePageUrl",
        "statusPageUrl",
        "healthCheckUrl",
        "vipAddress",
        "secureVipAddress",
        "isCoordinatingDiscoveryServer",
        "lastDirtyTimestamp",
    ] {
        assert_eq!(instance[field], sent[field], "{field}");
    }
    assert_eq!(instance["leaseInfo"]["durationInSecs"], 90);
    assert_eq!(instance["actionType"], "ADDED");

    let (status, body) = eureka_json(&format!("{base}/eureka/apps/orders")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["application"]["name"], "ORDERS");
    assert_eq!(body["application"]["instance"][0], *instance);
    for url in [
        format!("{base}/eureka/apps/ORDERS/host-1:orders:8080"),
        format!("{base}/eureka/instances/host-1:orders:8080"),
    ] {
        let (status, body) = eureka_json(&url).await;
        assert_eq!(status, StatusCode::OK, "{url}");
        assert_eq!(body["instance"], *instance, "{url}");
    }

    // XML, the default for `*/*`.
    let (status, xml) = eureka_xml(&format!("{base}/eureka/apps")).await;
    assert_eq!(status, StatusCode::OK);
    let apps: XmlApplications = quick_xml::de::from_str(&xml).unwrap();
    assert_eq!(apps.versions_delta, "1");
    assert_eq!(apps.apps_hashcode, "UP_1_");
    assert_eq!(apps.applications.len(), 1);
    assert_eq!(apps.applications[0].name, "ORDERS");
    let instance = &apps.applications[0].instances[0];
    assert_eq!(instance.instance_id, "host-1:orders:8080");
    assert_eq!(instance.host_name, "host-1:orders:8080.example");
    assert_eq!(instance.app, "ORDERS");
    assert_eq!(instance.ip_addr, "10.0.0.7");
    assert_eq!(instance.status, "UP");
    assert_eq!(instance.overriddenstatus, "UNKNOWN");
    assert_eq!((instance.port.value, instance.port.enabled), (8080, true));
    assert_eq!(
        (instance.secure_port.value, instance.secure_port.enabled),
        (443, false)
    );
    assert_eq!(instance.country_id, 1);
    assert_eq!(instance.data_center_info.name, "MyOwn");
    assert_eq!(
        instance.data_center_info.class,
        "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"
    );
    assert_eq!(instance.lease_info.duration_in_secs, 90);
    assert_eq!(instance.lease_info.renewal_interval_in_secs, 30);
    assert_eq!(instance.metadata["management.port"], "8080");
    assert_eq!(instance.metadata["zone"], "eu-1a");
    assert_eq!(instance.home_page_url, "http://10.0.0.7:8080/");
    assert_eq!(instance.vip_address, "orders");
    assert!(!instance.is_coordinating_discovery_server);
    assert_eq!(instance.last_dirty_timestamp, 1_700_000_000_000);
    assert_eq!(instance.action_type, "ADDED");

    let (status, xml) = eureka_xml(&format!("{base}/eureka/apps/ORDERS")).await;
    assert_eq!(status, StatusCode::OK);
    let app: XmlApplication = quick_xml::de::from_str(&xml).unwrap();
    assert_eq!(app.name, "ORDERS");
    assert_eq!(app.instances[0].instance_id, "host-1:orders:8080");
    let (status, xml) = eureka_xml(&format!("{base}/eureka/instances/host-1:orders:8080")).await;
    assert_eq!(status, StatusCode::OK);
    let instance: XmlInstance = quick_xml::de::from_str(&xml).unwrap();
    assert_eq!(instance.ip_addr, "10.0.0.7");
}

#[tokio::test]
async fn a_registration_in_xml_is_read_like_json() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let response = http()
        .post(format!("{base}/eureka/apps/ORDERS"))
        .header("content-type", "application/xml")
        .body(XML_INSTANCE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let (status, body) =
        eureka_json(&format!("{base}/eureka/apps/ORDERS/host-2:orders:8081")).await;
    assert_eq!(status, StatusCode::OK);
    let instance = &body["instance"];
    assert_eq!(instance["ipAddr"], "10.0.0.8");
    assert_eq!(instance["hostName"], "host-2.example");
    assert_eq!(instance["port"], json!({"$": 8081, "@enabled": "true"}));
    assert_eq!(
        instance["metadata"],
        json!({"management.port": "8081", "zone": "eu-1b"})
    );
    assert_eq!(instance["leaseInfo"]["durationInSecs"], 30);
    assert_eq!(instance["leaseInfo"]["renewalIntervalInSecs"], 10);
    assert_eq!(instance["lastDirtyTimestamp"], "1700000000001");
    let (_, _, native) = get_json(&format!(
        "{base}/v1/services/orders/instances/host-2:orders:8081"
    ))
    .await;
    assert_eq!(native["checks"][0]["spec"]["ttl"], "30s");
    assert_eq!(native["zone"], "eu-1b");
}

#[tokio::test]
async fn renewals_answer_200_and_404_for_unknown_or_changed_instances() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let id = "host-1:orders:8080";
    post_instance(base, "ORDERS", spring_instance(id, "10.0.0.7", 8080, "UP")).await;
    let renew = |query: &str| {
        http().put(format!(
            "{base}/eureka/apps/ORDERS/{id}?status=UP&lastDirtyTimestamp={query}"
        ))
    };

    let index = native_index(base, "orders").await;
    assert_eq!(send(renew("1700000000000")).await, StatusCode::OK);
    assert_eq!(
        native_index(base, "orders").await,
        index,
        "a renewal does not wake watchers"
    );
    // The client marked itself dirty after registering: register again.
    assert_eq!(send(renew("1700000000005")).await, StatusCode::NOT_FOUND);
    for url in [
        format!("{base}/eureka/apps/ORDERS/ghost:1"),
        format!("{base}/eureka/apps/PAYMENTS/{id}"),
    ] {
        assert_eq!(send(http().put(&url)).await, StatusCode::NOT_FOUND, "{url}");
    }

    assert_eq!(
        send(http().delete(format!("{base}/eureka/apps/ORDERS/{id}"))).await,
        StatusCode::OK
    );
    assert_eq!(
        send(http().delete(format!("{base}/eureka/apps/ORDERS/{id}"))).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(send(renew("1700000000000")).await, StatusCode::NOT_FOUND);
    let (status, _) = eureka_json(&format!("{base}/eureka/apps/ORDERS")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn expired_leases_are_evicted_but_a_renewing_down_instance_stays() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    for (id, status) in [("quiet:1", "UP"), ("sick:1", "DOWN")] {
        let mut body = spring_instance(id, "10.0.0.9", 8080, status);
        body["instance"]["leaseInfo"]["durationInSecs"] = json!(1);
        let response = post_instance(base, "ORDERS", body).await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    // `sick:1` renews (as a DOWN instance does); `quiet:1` has gone away. The lease expires
    // after 1 s and the instance is evicted after as long again.
    let started = Instant::now();
    let evicted_after = loop {
        let status = send(http().put(format!("{base}/eureka/apps/ORDERS/sick:1"))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = eureka_json(&format!("{base}/eureka/apps/ORDERS/quiet:1")).await;
        if status == StatusCode::NOT_FOUND {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never evicted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        evicted_after >= Duration::from_millis(1_900),
        "{evicted_after:?}"
    );
    // Longer than a lease and its eviction deadline: renewing keeps `sick:1`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        send(http().put(format!("{base}/eureka/apps/ORDERS/sick:1"))).await,
        StatusCode::OK
    );
    let (_, body) = eureka_json(&format!("{base}/eureka/apps/ORDERS")).await;
    let instances = body["application"]["instance"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{body}");
    assert_eq!(instances[0]["instanceId"], "sick:1");
    assert_eq!(instances[0]["status"], "DOWN");
    assert!(passing_ids(base, "orders").await.is_empty());
}

#[tokio::test]
async fn a_status_override_is_maintenance_that_wakes_watchers_and_survives_reregistration() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let id = "host-1:orders:8080";
    let body = spring_instance(id, "10.0.0.7", 8080, "UP");
    post_instance(base, "ORDERS", body.clone()).await;
    post_instance(
        base,
        "ORDERS",
        spring_instance("host-2:orders:8080", "10.0.0.8", 8080, "UP"),
    )
    .await;
    assert_eq!(passing_ids(base, "orders").await.len(), 2);

    let index = native_index(base, "orders").await;
    let url = format!("{base}/v1/services/orders?index={index}&wait=10s");
    let blocked = tokio::spawn(async move { (get_json(&url).await, Instant::now()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished());
    let changed_at = Instant::now();
    let status = send(http().put(format!(
        "{base}/eureka/apps/ORDERS/{id}/status?value=OUT_OF_SERVICE&lastDirtyTimestamp=1700000000000"
    )))
    .await;
    assert_eq!(status, StatusCode::OK);
    let ((_, headers, _), answered_at) = blocked.await.unwrap();
    assert!(answered_at.duration_since(changed_at) < Duration::from_millis(100));
    let woke_at: u64 = headers["x-keel-index"].to_str().unwrap().parse().unwrap();
    assert!(woke_at > index);

    assert_eq!(passing_ids(base, "orders").await, ["host-2:orders:8080"]);
    let (_, native) = eureka_json(&format!("{base}/eureka/apps/ORDERS/{id}")).await;
    assert_eq!(native["instance"]["status"], "OUT_OF_SERVICE");
    assert_eq!(native["instance"]["overriddenStatus"], "OUT_OF_SERVICE");
    let (_, _, keel) = get_json(&format!("{base}/v1/services/orders/instances/{id}")).await;
    let maintenance = &keel["checks"][1];
    assert_eq!(maintenance["id"], format!("_service_maintenance:{id}"));
    assert_eq!(maintenance["status"], "critical");
    assert_eq!(
        maintenance["output"],
        "Eureka status override OUT_OF_SERVICE"
    );
    let (_, all) = eureka_json(&format!("{base}/eureka/apps")).await;
    assert_eq!(
        all["applications"]["apps__hashcode"],
        "OUT_OF_SERVICE_1_UP_1_"
    );

    // The client registers again (a restart, a metadata change): still out of service, and
    // its renewals do not bring it back.
    assert_eq!(
        post_instance(base, "ORDERS", body).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        send(http().put(format!("{base}/eureka/apps/ORDERS/{id}?status=UP"))).await,
        StatusCode::OK
    );
    let (_, native) = eureka_json(&format!("{base}/eureka/apps/ORDERS/{id}")).await;
    assert_eq!(native["instance"]["status"], "OUT_OF_SERVICE");
    let (_, xml) = eureka_xml(&format!("{base}/eureka/apps/ORDERS/{id}")).await;
    let instance: XmlInstance = quick_xml::de::from_str(&xml).unwrap();
    assert_eq!(instance.overriddenstatus, "OUT_OF_SERVICE");

    // Removing the override (DELETE, or an override to UP) puts it back.
    let index = native_index(base, "orders").await;
    let status = send(http().delete(format!("{base}/eureka/apps/ORDERS/{id}/status"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(native_index(base, "orders").await > index);
    assert_eq!(passing_ids(base, "orders").await.len(), 2);
    let (_, native) = eureka_json(&format!("{base}/eureka/apps/ORDERS/{id}")).await;
    assert_eq!(native["instance"]["status"], "UP");
    assert_eq!(native["instance"]["overriddenStatus"], "UNKNOWN");

    let override_to = |value: &str| {
        http().put(format!(
            "{base}/eureka/apps/ORDERS/{id}/status?value={value}"
        ))
    };
    assert_eq!(send(override_to("DOWN")).await, StatusCode::OK);
    assert_eq!(passing_ids(base, "orders").await.len(), 1);
    assert_eq!(send(override_to("UP")).await, StatusCode::OK);
    assert_eq!(passing_ids(base, "orders").await.len(), 2);
    assert_eq!(send(override_to("SIDEWAYS")).await, StatusCode::BAD_REQUEST);
    assert_eq!(
        send(http().put(format!("{base}/eureka/apps/ORDERS/{id}/status"))).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(http().put(format!(
            "{base}/eureka/apps/ORDERS/ghost:1/status?value=OUT_OF_SERVICE"
        )))
        .await,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn deltas_carry_every_instance_and_the_hashcode() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let (_, empty) = eureka_json(&format!("{base}/eureka/apps/delta")).await;
    assert_eq!(empty["applications"]["apps__hashcode"], "");
    assert_eq!(empty["applications"]["application"], json!([]));
    let (_, xml) = eureka_xml(&format!("{base}/eureka/apps")).await;
    let apps: XmlApplications = quick_xml::de::from_str(&xml).unwrap();
    assert_eq!(apps.apps_hashcode, "");
    assert!(apps.applications.is_empty());

    for (id, status) in [("a:1", "UP"), ("b:1", "DOWN"), ("c:1", "UP")] {
        post_instance(
            base,
            "ORDERS",
            spring_instance(id, "10.0.0.1", 8080, status),
        )
        .await;
    }
    let mut payments = spring_instance("p:1", "10.0.0.2", 9090, "STARTING");
    payments["instance"]["app"] = json!("PAYMENTS");
    post_instance(base, "PAYMENTS", payments).await;

    let (_, full) = eureka_json(&format!("{base}/eureka/apps")).await;
    let (status, delta) = eureka_json(&format!("{base}/eureka/apps/delta")).await;
    assert_eq!(status, StatusCode::OK);
    let hashcode = "DOWN_1_STARTING_1_UP_2_";
    assert_eq!(full["applications"]["apps__hashcode"], hashcode);
    assert_eq!(delta["applications"]["apps__hashcode"], hashcode);
    let version: u64 = delta["applications"]["versions__delta"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(version > 1, "the registry's index");
    let apps = delta["applications"]["application"].as_array().unwrap();
    let names: Vec<&str> = apps
        .iter()
        .map(|app| app["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ORDERS", "PAYMENTS"]);
    let statuses: Vec<(&str, &str)> = apps
        .iter()
        .flat_map(|app| app["instance"].as_array().unwrap())
        .map(|instance| {
            assert_eq!(instance["actionType"], "MODIFIED");
            (
                instance["instanceId"].as_str().unwrap(),
                instance["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("a:1", "UP"),
            ("b:1", "DOWN"),
            ("c:1", "UP"),
            ("p:1", "STARTING")
        ]
    );

    let (_, xml) = eureka_xml(&format!("{base}/eureka/apps/delta")).await;
    let apps: XmlApplications = quick_xml::de::from_str(&xml).unwrap();
    assert_eq!(apps.apps_hashcode, hashcode);
    assert_eq!(apps.applications[0].instances.len(), 3);
    assert_eq!(apps.applications[0].instances[1].status, "DOWN");
    assert_eq!(apps.applications[1].instances[0].status, "STARTING");
}

#[tokio::test]
async fn malformed_bodies_are_400_problems_and_unknowns_404() {
    let registry = spawn_registry().await;
    let base = &registry.url;
    let post = |content_type: &'static str, body: String| {
        http()
            .post(format!("{base}/eureka/apps/ORDERS"))
            .header("content-type", content_type)
            .body(body)
    };
    let cases = [
        (JSON, "{\"instance\": ".to_owned(), "JSON"),
        (JSON, "[1, 2]".to_owned(), "instance document"),
        (
            JSON,
            json!({"instance": {"hostName": "h"}}).to_string(),
            "port",
        ),
        (
            JSON,
            json!({"instance": {"hostName": "h", "port": 1, "app": "PAYMENTS"}}).to_string(),
            "app",
        ),
        (
            JSON,
            json!({"instance": {"hostName": "h h", "port": 1}}).to_string(),
            "instance id",
        ),
        ("application/xml", "<instance><port>".to_owned(), "XML"),
        ("application/xml", "<instance></port>".to_owned(), "XML"),
        (
            "application/xml",
            "<!DOCTYPE x [<!ENTITY a \"b\">]><instance/>".to_owned(),
            "DOCTYPE",
        ),
        (
            "application/xml",
            "<instance><hostName>h</hostName><port>&boom;</port></instance>".to_owned(),
            "entity",
        ),
        (
            "application/xml",
            "<other/>".to_owned(),
            "instance document",
        ),
    ];
    for (content_type, body, needle) in cases {
        let response = post(content_type, body.clone()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(needle),
            "{body}: {detail:?} should mention {needle:?}"
        );
    }
    let response = post("text/plain", "hello".into()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = format!(
        "<instance><hostName>{}</hostName></instance>",
        "h".repeat(100_000)
    );
    let response = post("application/xml", huge).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    for url in [
        format!("{base}/eureka/apps/NOPE"),
        format!("{base}/eureka/apps/NOPE/x:1"),
        format!("{base}/eureka/instances/x:1"),
    ] {
        let (status, _) = eureka_json(&url).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{url}");
    }
    let (status, _) = eureka_json(&format!("{base}/eureka/apps/no$pe")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, all) = eureka_json(&format!("{base}/eureka/apps")).await;
    assert_eq!(
        all["applications"]["application"],
        json!([]),
        "nothing got in"
    );
}

#[tokio::test]
async fn writes_need_the_acl_token() {
    let registry = spawn_registry_with(|config| {
        config.acl_token = Some(keel_runtime::Secret::new("s3cret".to_owned()));
    })
    .await;
    let base = &registry.url;
    let body = spring_instance("host-1:orders:8080", "10.0.0.7", 8080, "UP");
    assert_eq!(
        post_instance(base, "ORDERS", body.clone()).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let response = http()
        .post(format!("{base}/eureka/apps/ORDERS"))
        .header("authorization", "Bearer s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // As a Spring client configured with http://eureka:s3cret@host/eureka/ sends it.
    let renew = |password: &'static str| {
        http()
            .put(format!("{base}/eureka/apps/ORDERS/host-1:orders:8080"))
            .basic_auth("eureka", Some(password))
            .send()
    };
    assert_eq!(renew("s3cret").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        renew("guess").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let (status, _) = eureka_json(&format!("{base}/eureka/apps")).await;
    assert_eq!(status, StatusCode::OK, "reads are open");
}
