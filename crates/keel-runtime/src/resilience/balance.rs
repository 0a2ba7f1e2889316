//! Load balancing: which endpoint of a set serves the next attempt.
//!
//! - Weighted round robin follows NGINX's smooth weighted round robin. The sequence is
//!   computed once per endpoint set, so a pick is one atomic increment.
//! - Least request is power of two choices over a peak-EWMA cost (latency × requests in
//!   flight), as linkerd and Envoy's least-request do.
//! - Consistent hashing is a ketama ring keyed by endpoint identity, so an instance
//!   coming or going moves only the keys next to its points.
//!
//! Every algorithm skips endpoints excluded for this request (already tried) and ejected
//! ones; if every remaining endpoint is ejected it uses them anyway (Envoy's panic mode)
//! rather than fail a request an ejected instance might serve.

use std::hash::Hasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::endpoint::Endpoint;

/// `balance = …` of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BalanceConfig {
    /// Weighted round robin (the default).
    #[default]
    RoundRobin,
    /// Power of two choices, least requests weighted by peak-EWMA latency.
    LeastRequest,
    /// Consistent hashing by a request attribute.
    Hash(HashKeyConfig),
}

/// What consistent hashing hashes. Requests without the key are balanced round robin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashKeyConfig {
    Header(String),
    Cookie(String),
    ClientIp,
}

/// A compiled endpoint set with the structures its route's algorithm needs.
#[derive(Debug)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    /// Smooth weighted round robin sequence of endpoint indexes.
    schedule: Vec<usize>,
    next: AtomicUsize,
    /// Ketama ring, sorted by point; empty unless the route hashes.
    ring: Vec<(u64, usize)>,
}

/// Longest round robin sequence; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>, balance: &BalanceConfig) -> Self {
        let schedule = smooth_schedule(&endpoints);
        let ring = match balance {
            BalanceConfig::Hash(_) => ketama_ring(&endpoints),
            _ => Vec::new(),
        };
        Self {
            endpoints,
            schedule,
            next: AtomicUsize::new(0),
            ring,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoint for the next attempt, skipping `tried`; `None` when every endpoint was
    /// tried (or there is none).
    pub fn pick(
        &self,
        balance: &BalanceConfig,
        hash: Option<u64>,
        tried: &[usize],
        now: u64,
    ) -> Option<usize> {
        if self.endpoints.len() <= tried.len() {
            return None;
        }
        let usable = |i: usize, ejected_ok: bool| {
            !tried.contains(&i) && (ejected_ok || !self.endpoints[i].stats.is_ejected(now))
        };
        // First among healthy endpoints, then, in panic mode, among ejected ones too.
        [false, true].into_iter().find_map(|ejected_ok| {
            let usable = |i| usable(i, ejected_ok);
            match (balance, hash) {
                (BalanceConfig::Hash(_), Some(hash)) => self.pick_ring(hash, usable),
                (BalanceConfig::LeastRequest, _) => self.pick_p2c(usable),
                _ => self.pick_round_robin(usable),
            }
        })
    }

    fn pick_round_robin(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let len = self.schedule.len();
        (0..len)
            .map(|step| self.schedule[(start + step) % len])
            .find(|&i| usable(i))
    }

    fn pick_p2c(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        let cost = |i: usize| self.endpoints[i].stats.cost();
        if n >= 2 {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            match (usable(a), usable(b)) {
                (true, true) => return Some(if cost(b) < cost(a) { b } else { a }),
                (true, false) => return Some(a),
                (false, true) => return Some(b),
                (false, false) => {}
            }
        }
        // Both draws unusable: choose the cheapest of what is left.
        (0..n).filter(|&i| usable(i)).min_by_key(|&i| cost(i))
    }

    fn pick_ring(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.ring.partition_point(|&(point, _)| point < hash);
        let len = self.ring.len();
        (0..len)
            .map(|step| self.ring[(start + step) % len].1)
            .find(|&i| usable(i))
    }
}

/// NGINX's smooth weighted round robin, unrolled into one period.
fn smooth_schedule(endpoints: &[Endpoint]) -> Vec<usize> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let gcd = endpoints
        .iter()
        .map(|e| u64::from(e.weight.max(1)))
        .fold(0, gcd);
    let mut weights: Vec<u64> = endpoints
        .iter()
        .map(|e| u64::from(e.weight.max(1)) / gcd)
        .collect();
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        for weight in &mut weights {
            *weight = (*weight * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (current, &weight) in current.iter_mut().zip(&weights) {
                *current += weight as i64;
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i)))
                .unwrap_or((0, &0));
            current[best] -= total;
            best
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Points on the ring per unit of weight. An endpoint's points depend only on its own id
/// and weight, so a change to the set moves only the keys of the endpoints that changed.
const POINTS_PER_WEIGHT: u64 = 160;
/// Weights above this ratio stop adding points, which bounds the ring's size.
const MAX_POINTS: u64 = POINTS_PER_WEIGHT * 100;

fn ketama_ring(endpoints: &[Endpoint]) -> Vec<(u64, usize)> {
    let mut ring = Vec::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        let points = (POINTS_PER_WEIGHT * u64::from(endpoint.weight.max(1))).min(MAX_POINTS);
        for point in 0..points {
            ring.push((
                hash_key(format!("{}#{point}", endpoint.id).as_bytes()),
                index,
            ));
        }
    }
    ring.sort_unstable();
    ring
}

/// A stable 64-bit hash (FNV-1a with a murmur3 finaliser), so every gateway replica and
/// every build places keys alike.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut fnv = Fnv::default();
    fnv.write(bytes);
    let mut hash = fnv.finish();
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// FNV-1a as a [`Hasher`]: fast and unkeyed, so only for keys clients cannot choose.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl HashKeyConfig {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Header(name) => http::HeaderName::from_bytes(name.as_bytes())
                .map(drop)
                .map_err(|_| format!("balance.hash.header: {name:?} is not a header name")),
            Self::Cookie(name) if name.is_empty() || name.contains([';', '=', ' ']) => Err(
                format!("balance.hash.cookie: {name:?} is not a cookie name"),
            ),
            Self::Cookie(_) | Self::ClientIp => Ok(()),
        }
    }

    /// The request's hash key, when it has one; a header may be one the caller adds
    /// beside the map (the gateway's `x-keel-subject`, say), found through `added`.
    pub fn hash<'a>(
        &self,
        headers: &'a HeaderMap,
        added: impl Fn(&str) -> Option<&'a http::HeaderValue>,
        client_ip: Option<std::net::IpAddr>,
    ) -> Option<u64> {
        match self {
            Self::Header(name) => headers
                .get(name)
                .or_else(|| added(name))
                .map(|v| hash_key(v.as_bytes())),
            Self::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(key, _)| key == name)
                .map(|(_, value)| hash_key(value.as_bytes())),
            Self::ClientIp => client_ip.map(|ip| hash_key(ip.to_string().as_bytes())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::endpoint::{EndpointStats, OutlierConfig, now_nanos};
    use super::*;

    fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Endpoint {
                id: format!("instance-{i}").into(),
                base: format!("http://127.0.0.1:{}", 9000 + i).parse().unwrap(),
                weight,
                stats: Arc::new(EndpointStats::default()),
            })
            .collect()
    }

    fn counts(set: &EndpointSet, balance: &BalanceConfig, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; set.endpoints.len()];
        for _ in 0..picks {
            counts[set.pick(balance, None, &[], now_nanos()).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let set = EndpointSet::new(endpoints(&[5, 1, 1]), &BalanceConfig::RoundRobin);
        let sequence: Vec<usize> = (0..7)
            .map(|_| {
                set.pick(&BalanceConfig::RoundRobin, None, &[], now_nanos())
                    .unwrap()
            })
            .collect();
        // NGINX's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(sequence, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(
            counts(&set, &BalanceConfig::RoundRobin, 700),
            [500, 100, 100]
        );
    }

    #[test]
    fn huge_weights_are_scaled_into_a_bounded_schedule() {
        let set = EndpointSet::new(endpoints(&[10_000, 9_999, 1]), &BalanceConfig::RoundRobin);
        assert!(set.schedule.len() as u64 <= MAX_SCHEDULE + 3);
        let counts = counts(&set, &BalanceConfig::RoundRobin, set.schedule.len());
        assert!(
            counts[2] >= 1 && counts[0] > 1000 && counts[1] > 1000,
            "{counts:?}"
        );
    }

    #[test]
    fn tried_and_ejected_endpoints_are_skipped_until_nothing_else_is_left() {
        let set = EndpointSet::new(endpoints(&[1, 1, 1]), &BalanceConfig::RoundRobin);
        for balance in [
            BalanceConfig::RoundRobin,
            BalanceConfig::LeastRequest,
            BalanceConfig::Hash(HashKeyConfig::ClientIp),
        ] {
            let set = EndpointSet::new(set.endpoints.clone(), &balance);
            for _ in 0..50 {
                let pick = set.pick(&balance, Some(fastrand::u64(..)), &[0, 2], now_nanos());
                assert_eq!(pick, Some(1), "{balance:?}");
            }
            assert_eq!(set.pick(&balance, Some(7), &[0, 1, 2], now_nanos()), None);
        }

        let config = OutlierConfig::default();
        set.endpoints[1].stats.eject(&config, now_nanos());
        let healthy = counts(&set, &BalanceConfig::RoundRobin, 100);
        assert_eq!(healthy[1], 0, "ejected endpoints get nothing: {healthy:?}");
        set.endpoints[0].stats.eject(&config, now_nanos());
        set.endpoints[2].stats.eject(&config, now_nanos());
        let panic = counts(&set, &BalanceConfig::RoundRobin, 99);
        assert_eq!(panic, [33, 33, 33], "panic mode: all ejected, all used");
    }

    #[test]
    fn least_request_prefers_idle_and_fast_endpoints() {
        let balance = BalanceConfig::LeastRequest;
        let set = EndpointSet::new(endpoints(&[1, 1]), &balance);
        let _busy: Vec<_> = (0..5).map(|_| set.endpoints[0].stats.start()).collect();
        assert_eq!(counts(&set, &balance, 100), [0, 100]);

        let set = EndpointSet::new(endpoints(&[1, 1, 1]), &balance);
        set.endpoints[0]
            .stats
            .observe_latency(Duration::from_millis(50), now_nanos());
        set.endpoints[1]
            .stats
            .observe_latency(Duration::from_millis(1), now_nanos());
        set.endpoints[2]
            .stats
            .observe_latency(Duration::from_millis(2), now_nanos());
        let counts = counts(&set, &balance, 3000);
        // The slow endpoint wins no pair; it is chosen only when drawn twice, never.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > counts[2], "{counts:?}");
    }

    #[test]
    fn consistent_hashing_is_sticky_and_moves_few_keys_when_instances_change() {
        let balance = BalanceConfig::Hash(HashKeyConfig::Header("x-user".into()));
        let all = endpoints(&[1, 1, 1, 1, 1]);
        let five = EndpointSet::new(all.clone(), &balance);
        let four = EndpointSet::new(all[..4].to_vec(), &balance);
        let owner = |set: &EndpointSet, key: u64| {
            set.endpoints[set.pick(&balance, Some(key), &[], now_nanos()).unwrap()]
                .id
                .to_string()
        };

        let keys: Vec<u64> = (0..10_000u32).map(|k| hash_key(&k.to_be_bytes())).collect();
        let mut load: HashMap<String, usize> = HashMap::new();
        let mut moved = 0;
        for &key in &keys {
            let before = owner(&five, key);
            assert_eq!(before, owner(&five, key), "sticky");
            let after = owner(&four, key);
            if before != "instance-4" {
                assert_eq!(before, after, "only the removed instance's keys move");
            } else {
                moved += 1;
            }
            *load.entry(before).or_default() += 1;
        }
        // About a fifth of the keys lived on the removed instance; the ring spreads evenly.
        assert!((1_500..2_500).contains(&moved), "{moved}");
        assert!(
            load.values().all(|&n| (1_400..2_600).contains(&n)),
            "{load:?}"
        );
    }

    #[test]
    fn hash_keys_come_from_headers_cookies_or_the_client_ip() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert(
            http::header::COOKIE,
            "a=1; session=s-42; b=2".parse().unwrap(),
        );
        let header = HashKeyConfig::Header("x-user".into());
        assert_eq!(
            header.hash(&headers, |_| None, None),
            Some(hash_key(b"alice"))
        );
        let cookie = HashKeyConfig::Cookie("session".into());
        assert_eq!(
            cookie.hash(&headers, |_| None, None),
            Some(hash_key(b"s-42"))
        );
        assert_eq!(
            HashKeyConfig::Cookie("none".into()).hash(&headers, |_| None, None),
            None
        );
        let ip = "10.0.0.7".parse().ok();
        assert_eq!(
            HashKeyConfig::ClientIp.hash(&headers, |_| None, ip),
            Some(hash_key(b"10.0.0.7"))
        );
        assert!(HashKeyConfig::Cookie("a;b".into()).validate().is_err());
        assert!(
            HashKeyConfig::Header("bad header".into())
                .validate()
                .is_err()
        );
    }
}
