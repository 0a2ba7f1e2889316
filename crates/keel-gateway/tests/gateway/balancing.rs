//! Load balancing through the gateway, against real upstreams.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_gateway::balance::{BalanceConfig, HashKeyConfig};
use keel_gateway::config::UpstreamConfig;

use crate::support::{Behaviour, Upstream, route_to, served_by, start_gateway};

async fn tally(client: &reqwest::Client, url: &str, requests: usize) -> HashMap<String, usize> {
    let mut tally = HashMap::new();
    for _ in 0..requests {
        let response = client.get(url).send().await.unwrap();
        *tally.entry(served_by(response).await).or_default() += 1;
    }
    tally
}

#[tokio::test]
async fn weighted_round_robin_honours_weights() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let mut route = route_to("weighted", &[]);
    route.upstreams = vec![
        UpstreamConfig::Weighted {
            url: a.url.clone(),
            weight: 3,
        },
        UpstreamConfig::Weighted {
            url: b.url.clone(),
            weight: 1,
        },
    ];
    let gateway = start_gateway(vec![route]).await;
    let tally = tally(&keel_testkit::http(), &gateway.url, 40).await;
    assert_eq!(tally["a"], 30, "{tally:?}");
    assert_eq!(tally["b"], 10, "{tally:?}");
}

#[tokio::test]
async fn hashing_by_header_keeps_each_user_on_one_instance() {
    let upstreams: Vec<Upstream> = ["a", "b", "c"].into_iter().map(Upstream::start).collect();
    let mut route = route_to("sticky", &upstreams.iter().collect::<Vec<_>>());
    route.balance = BalanceConfig::Hash(HashKeyConfig::Header("x-user".into()));
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    let mut used = HashSet::new();
    for user in 0..20 {
        let mut owners = HashSet::new();
        for _ in 0..5 {
            let response = client
                .get(&gateway.url)
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            owners.insert(served_by(response).await);
        }
        assert_eq!(owners.len(), 1, "user-{user} moved: {owners:?}");
        used.extend(owners);
    }
    assert_eq!(used.len(), 3, "users spread over every instance: {used:?}");
}

#[tokio::test]
async fn least_request_steers_away_from_a_slow_instance() {
    let (fast, slow) = (Upstream::start("fast"), Upstream::start("slow"));
    slow.set(Behaviour {
        delay: Duration::from_millis(100),
        ..Behaviour::default()
    });
    let mut route = route_to("p2c", &[&fast, &slow]);
    route.balance = BalanceConfig::LeastRequest;
    let gateway = start_gateway(vec![route]).await;
    let client = keel_testkit::http();
    // Concurrent load, so requests in flight pile up on the slow instance.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), gateway.url.clone());
        tasks.push(tokio::spawn(async move { tally(&client, &url, 25).await }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        for (who, n) in task.await.unwrap() {
            *total.entry(who).or_default() += n;
        }
    }
    let slow_share = total.get("slow").copied().unwrap_or(0);
    assert!(
        slow_share < 40,
        "the slow instance got {slow_share} of 200: {total:?}"
    );
    assert_eq!(total.values().sum::<usize>(), 200);
}
