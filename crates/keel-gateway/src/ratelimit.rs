//! Rate limits per route, keyed by client id, subject, client IP or an API-key header.
//!
//! Both limiters run GCRA (the generic cell rate algorithm, a token bucket kept as one
//! timestamp per key: the theoretical arrival time). The local one keeps it in memory per
//! gateway; the shared one keeps it in Redis and updates it in one Lua script that also
//! reads Redis's clock, so every gateway replica shares one bucket per key and their own
//! clocks never matter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderMap;
use keel_runtime::Secret;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::auth::Authorized;
use crate::balance::hash_key;
use crate::endpoint::nanos_at;

/// `rate_limit = { key = "client_ip", per_second = 10, burst = 20 }` of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub key: RateKey,
    /// Sustained requests per second per key (fractions allowed: 0.5 is one per 2 s).
    pub per_second: f64,
    /// Requests a key may make at once after being idle.
    pub burst: u32,
    /// Count in Redis, shared by every gateway replica, rather than in this process.
    #[serde(default)]
    pub shared: bool,
}

/// What a rate limit counts by. A request without the key (no token, no header) is
/// counted by its client IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateKey {
    ClientIp,
    ClientId,
    Subject,
    /// An API key in this request header (stored hashed, never in the clear).
    Header(String),
}

/// `[gateway.rate_limit]`: the Redis behind shared limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitBackendConfig {
    /// `redis://127.0.0.1:6379`; may hold a password, so it is a secret.
    pub redis: Option<Secret<String>>,
    pub key_prefix: String,
    /// Longest wait for Redis before the failure policy applies.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What a shared limit does when Redis cannot answer: `allow` (fail open) or `deny`
    /// (fail closed, 503).
    pub on_error: FailurePolicy,
}

impl Default for RateLimitBackendConfig {
    fn default() -> Self {
        Self {
            redis: None,
            key_prefix: "keel:gateway:ratelimit:".to_owned(),
            timeout: Duration::from_millis(100),
            on_error: FailurePolicy::Allow,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    #[default]
    Allow,
    Deny,
}

impl RateLimitConfig {
    pub fn validate(&self, authenticated: bool, redis: bool) -> Result<(), String> {
        if !(self.per_second > 0.0 && self.per_second <= 1e6) {
            return Err("rate_limit.per_second must be above 0 and at most 1000000".into());
        }
        if self.burst == 0 {
            return Err("rate_limit.burst must be at least 1".into());
        }
        if matches!(self.key, RateKey::ClientId | RateKey::Subject) && !authenticated {
            return Err(
                "rate_limit: keys client_id and subject need auth.require = \"authenticated\""
                    .into(),
            );
        }
        if let RateKey::Header(name) = &self.key {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("rate_limit.key.header: {name:?} is not a header name"))?;
        }
        if self.shared && !redis {
            return Err("rate_limit.shared needs [gateway.rate_limit] redis".into());
        }
        Ok(())
    }

    /// The key a request is counted under; a header may be one of the verified claims the
    /// gateway forwards (`x-keel-subject`, say), which are not in the request's map.
    pub fn key_of(
        &self,
        headers: &HeaderMap,
        authorized: Option<&Authorized>,
        client_ip: Option<&str>,
    ) -> String {
        let principal = authorized.map(|a| &*a.principal);
        // Joined by hand: this runs for every limited request, and `format!` cost several
        // times as much.
        let joined = |prefix: &str, rest: &str| {
            let mut key = String::with_capacity(prefix.len() + rest.len());
            key.push_str(prefix);
            key.push_str(rest);
            key
        };
        let found = match &self.key {
            RateKey::ClientIp => None,
            RateKey::ClientId => principal
                .and_then(|p| p.client_id.as_deref())
                .map(|id| joined("client:", id)),
            RateKey::Subject => principal.map(|p| joined("sub:", &p.subject)),
            RateKey::Header(name) => headers
                .get(name)
                .or_else(|| authorized?.claims.get(name))
                .map(|value| format!("key:{:016x}", hash_key(value.as_bytes()))),
        };
        found.unwrap_or_else(|| joined("ip:", client_ip.unwrap_or("unknown")))
    }

    /// GCRA's emission interval and burst tolerance, in microseconds.
    fn gcra(&self) -> (u64, u64) {
        let interval = (1e6 / self.per_second).max(1.0) as u64;
        (interval, interval.saturating_mul(u64::from(self.burst)))
    }
}

/// A limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When denied: until the next request would be allowed.
    pub retry_after: Duration,
}

/// GCRA over one stored theoretical arrival time; returns the decision and the new TAT.
pub(crate) fn gcra(
    tat: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    limit: u32,
) -> (Decision, Option<u64>) {
    let next = tat.max(now) + interval;
    let allow_at = next.saturating_sub(tolerance);
    if now < allow_at {
        let decision = Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset: Duration::from_micros(tat.saturating_sub(now)),
            retry_after: Duration::from_micros(allow_at - now),
        };
        return (decision, None);
    }
    let decision = Decision {
        allowed: true,
        limit,
        remaining: (tolerance - (next - now)) / interval,
        reset: Duration::from_micros(next - now),
        retry_after: Duration::ZERO,
    };
    (decision, Some(next))
}

/// Keys a local limiter keeps. Past it, expired keys are swept (at most once a second);
/// if the map is still full, new keys share one overflow bucket, so a client inventing a
/// key per request (an API-key header it chooses) can neither grow memory nor escape the
/// limit.
const LOCAL_MAX_KEYS: usize = 100_000;
const OVERFLOW_KEY: &str = "\u{0}overflow";

/// In-process GCRA.
#[derive(Default)]
pub struct LocalLimiter {
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    tats: HashMap<String, u64>,
    last_sweep: u64,
}

impl LocalLimiter {
    /// Counts a request for `key` that arrived at `at`.
    pub fn check(&self, config: &RateLimitConfig, key: &str, at: Instant) -> Decision {
        self.check_at(config, key, nanos_at(at) / 1_000)
    }

    fn check_at(&self, config: &RateLimitConfig, key: &str, now: u64) -> Decision {
        let (interval, tolerance) = config.gcra();
        let apply = |tat: &mut u64| {
            let (decision, next) = gcra(*tat, now, interval, tolerance, config.burst);
            if let Some(next) = next {
                *tat = next;
            }
            decision
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        // A key seen before (nearly every request): one lookup, no allocation.
        if let Some(tat) = state.tats.get_mut(key) {
            return apply(tat);
        }
        let mut key = key;
        if state.tats.len() >= LOCAL_MAX_KEYS {
            if now.saturating_sub(state.last_sweep) >= 1_000_000 {
                state.last_sweep = now;
                state.tats.retain(|_, tat| *tat > now);
            }
            if state.tats.len() >= LOCAL_MAX_KEYS {
                key = OVERFLOW_KEY;
            }
        }
        // A new key starts at `now`, as an absent one would; the sweep forgets it again.
        apply(state.tats.entry(key.to_owned()).or_insert(now))
    }
}

/// The same algorithm in Redis, atomically; `TIME` makes Redis's clock the only clock.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next = tat + interval
local allow_at = next - tolerance
if now < allow_at then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000))
return {1, 0, math.floor((tolerance - (next - now)) / interval), next - now}
";

/// Shared GCRA in Redis. The connection is made on first use and remade after failures,
/// so the gateway starts and serves while Redis is away.
pub struct RedisLimiter {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    pub on_error: FailurePolicy,
}

/// Why Redis could not decide.
#[derive(Debug, thiserror::Error)]
#[error("rate limit store: {0}")]
pub struct StoreError(String);

impl RedisLimiter {
    pub fn new(config: &RateLimitBackendConfig) -> Result<Option<Self>, String> {
        let Some(url) = &config.redis else {
            return Ok(None);
        };
        let client = redis::Client::open(url.expose().as_str())
            .map_err(|error| format!("gateway.rate_limit.redis: {error}"))?;
        Ok(Some(Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            script: redis::Script::new(GCRA_SCRIPT),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            on_error: config.on_error,
        }))
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(|error| StoreError(error.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    pub async fn check(
        &self,
        config: &RateLimitConfig,
        route: &str,
        key: &str,
    ) -> Result<Decision, StoreError> {
        let (interval, tolerance) = config.gcra();
        let attempt = async {
            let mut connection = self.connection().await?;
            let reply: (i64, i64, i64, i64) = self
                .script
                .key(format!("{}{route}:{key}", self.prefix))
                .arg(interval)
                .arg(tolerance)
                .invoke_async(&mut connection)
                .await
                .map_err(|error| StoreError(error.to_string()))?;
            Ok::<_, StoreError>(reply)
        };
        let (allowed, retry_after, remaining, reset) = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| StoreError(format!("no answer within {:?}", self.timeout)))??;
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(Decision {
            allowed: allowed == 1,
            limit: config.burst,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset: micros(reset),
            retry_after: micros(retry_after),
        })
    }
}

/// The limiters a generation's routes share; kept across reloads.
#[derive(Default)]
pub struct Limiters {
    local: Mutex<HashMap<String, Arc<LocalLimiter>>>,
    pub redis: Option<RedisLimiter>,
}

impl Limiters {
    pub fn with_redis(redis: Option<RedisLimiter>) -> Self {
        Self {
            local: Mutex::default(),
            redis,
        }
    }

    /// The local limiter of a route (its buckets survive reloads).
    pub fn local(&self, route: &str) -> Arc<LocalLimiter> {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(local.entry(route.to_owned()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_second: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            key: RateKey::ClientIp,
            per_second,
            burst,
            shared: false,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limiter = LocalLimiter::default();
        let config = config(10.0, 3);
        let now = 1_000_000_000;
        let remaining: Vec<u64> = (0..3)
            .map(|_| {
                let decision = limiter.check_at(&config, "k", now);
                assert!(decision.allowed);
                decision.remaining
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let denied = limiter.check_at(&config, "k", now);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        assert!(
            limiter.check_at(&config, "other", now).allowed,
            "keys are separate"
        );
        // One emission interval later, exactly one more request passes.
        assert!(limiter.check_at(&config, "k", now + 100_000).allowed);
        assert!(!limiter.check_at(&config, "k", now + 100_000).allowed);
        // After a full idle period the whole burst is back.
        let later = now + 10_000_000;
        assert_eq!(limiter.check_at(&config, "k", later).remaining, 2);
    }

    #[test]
    fn invented_keys_beyond_the_cap_share_one_bucket() {
        let limiter = LocalLimiter::default();
        let config = config(1.0, 1);
        let now = 5_000_000;
        for n in 0..LOCAL_MAX_KEYS {
            assert!(limiter.check_at(&config, &n.to_string(), now).allowed);
        }
        // Every bucket is live, so newcomers share the overflow bucket: one passes.
        assert!(limiter.check_at(&config, "new-1", now).allowed);
        assert!(!limiter.check_at(&config, "new-2", now).allowed);
        // Once the old buckets expire they are swept and newcomers get their own again.
        let later = now + 10_000_000;
        assert!(limiter.check_at(&config, "new-3", later).allowed);
        assert!(limiter.check_at(&config, "new-4", later).allowed);
    }

    #[test]
    fn keys_fall_back_to_the_client_ip() {
        let ip = Some("10.1.2.3");
        let mut headers = HeaderMap::new();
        let by_header = RateLimitConfig {
            key: RateKey::Header("x-api-key".into()),
            ..config(1.0, 1)
        };
        assert_eq!(by_header.key_of(&headers, None, ip), "ip:10.1.2.3");
        headers.insert("x-api-key", "secret-key".parse().unwrap());
        let key = by_header.key_of(&headers, None, ip);
        assert!(key.starts_with("key:") && !key.contains("secret"), "{key}");
    }

    #[test]
    fn invalid_limits_are_refused() {
        assert!(config(0.0, 1).validate(false, false).is_err());
        assert!(config(1.0, 0).validate(false, false).is_err());
        let subject = RateLimitConfig {
            key: RateKey::Subject,
            ..config(1.0, 1)
        };
        assert!(subject.validate(false, false).is_err());
        assert!(subject.validate(true, false).is_ok());
        let shared = RateLimitConfig {
            shared: true,
            ..config(1.0, 1)
        };
        assert!(shared.validate(false, false).unwrap_err().contains("redis"));
    }
}
