//! Upstream endpoints and what a caller (the gateway, an SDK client) learns about each one
//! from its traffic: requests in flight, a peak-EWMA of latency, and passive outlier
//! detection.
//!
//! Stats belong to an endpoint's address, not to a route or a configuration, so they
//! survive reloads and registry updates and are shared by every route that reaches the
//! same instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use http::Uri;
use serde::{Deserialize, Serialize};

/// Monotonic nanoseconds since the first call; what the atomics below store.
pub fn now_nanos() -> u64 {
    nanos_at(Instant::now())
}

/// [`now_nanos`] as of `at`, so that one clock reading serves several uses
/// (ARCHITECTURE.md, "Time").
pub fn nanos_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant of `nanos` (of [`now_nanos`]).
pub fn instant_at(nanos: u64) -> Instant {
    epoch() + Duration::from_nanos(nanos)
}

/// Where [`now_nanos`] counts from.
fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// `duration` in nanoseconds, saturating.
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// How long past latency keeps weighing on the EWMA (linkerd's peak-EWMA decay).
const EWMA_DECAY_NANOS: f64 = 10e9;
/// Latency assumed for an endpoint with no measurement yet: small, so a new instance gets
/// traffic at once, while its in-flight count still bounds the burst it receives.
const LATENCY_FLOOR_NANOS: u64 = 100_000;

/// What the gateway knows about one upstream address.
#[derive(Debug, Default)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    ewma_nanos: AtomicU64,
    ewma_stamp: AtomicU64,
    consecutive_failures: AtomicU32,
    /// `now_nanos()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    ejections: Mutex<EjectionHistory>,
}

#[derive(Debug, Default)]
struct EjectionHistory {
    /// Times ejected in a row; the next ejection lasts this many base periods.
    streak: u32,
    /// When the last ejection ends, to tell a relapse from a fresh failure.
    last_end: u64,
    total: u64,
}

/// Counts a request in flight until dropped.
pub struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointStats {
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency in nanoseconds: a slower sample replaces the average at once, a
    /// faster one pulls it down with a time-based decay, so a degrading instance is
    /// avoided quickly and trusted again gradually.
    pub fn latency_nanos(&self) -> u64 {
        self.ewma_nanos.load(Ordering::Relaxed)
    }

    /// Least-request cost used by power-of-two-choices.
    pub fn cost(&self) -> u64 {
        let latency = self.latency_nanos().max(LATENCY_FLOOR_NANOS);
        latency.saturating_mul(u64::from(self.in_flight()) + 1)
    }

    pub fn observe_latency(&self, rtt: Duration, now: u64) {
        let rtt = nanos(rtt);
        let previous = self.ewma_nanos.load(Ordering::Relaxed);
        let stamp = self.ewma_stamp.swap(now, Ordering::Relaxed);
        let next = if rtt >= previous || previous == 0 {
            rtt
        } else {
            let elapsed = now.saturating_sub(stamp) as f64;
            let weight = (-elapsed / EWMA_DECAY_NANOS).exp();
            (previous as f64 * weight + rtt as f64 * (1.0 - weight)) as u64
        };
        self.ewma_nanos.store(next, Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// When the current ejection ends, if there is one.
    pub fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    pub fn ejections(&self) -> u64 {
        self.ejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    /// Whether its last recorded outcome was a failure: it has not answered since.
    pub fn failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) != 0
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; true when it reaches the configured run of failures (the caller
    /// decides whether the set can afford an ejection and then calls [`Self::eject`]).
    pub fn record_failure(&self, config: &OutlierConfig) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        config.consecutive_failures > 0 && failures >= config.consecutive_failures
    }

    /// Ejects for `base × streak` (capped), where the streak grows while the endpoint
    /// relapses soon after coming back and starts over once it has stayed healthy for
    /// `max_ejection`. Returns how long.
    pub fn eject(&self, config: &OutlierConfig, now: u64) -> Duration {
        let mut history = self
            .ejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let healthy_since_last = now.saturating_sub(history.last_end);
        history.streak = if history.total > 0 && healthy_since_last < nanos(config.max_ejection) {
            history.streak.saturating_add(1)
        } else {
            1
        };
        let duration = config
            .base_ejection
            .saturating_mul(history.streak)
            .min(config.max_ejection);
        history.last_end = now.saturating_add(nanos(duration));
        history.total += 1;
        self.ejected_until
            .store(history.last_end, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        duration
    }
}

/// `outlier = { … }` of a route: passive outlier detection for the service it reaches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive 5xx answers or connection failures that eject an instance; 0 disables.
    pub consecutive_failures: u32,
    /// The first ejection's length; each relapse adds another.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection, and how long an instance must stay healthy for its streak to end.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Most instances of a service ejected at once, in percent (at least one may be).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl OutlierConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_ejected_percent > 100 {
            return Err("outlier.max_ejected_percent must be at most 100".into());
        }
        if self.base_ejection.is_zero() || self.base_ejection > self.max_ejection {
            return Err("outlier.base_ejection must be above zero and at most max_ejection".into());
        }
        Ok(())
    }

    /// How many of `total` instances may be ejected at once.
    pub fn ejection_allowance(&self, total: usize) -> usize {
        if total < 2 || self.max_ejected_percent == 0 {
            return 0;
        }
        (total * self.max_ejected_percent as usize / 100).max(1)
    }
}

/// One upstream as the balancer sees it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// A stable identity: the instance id for registry services, the URL for static ones.
    /// Consistent hashing places endpoints by it.
    pub id: Arc<str>,
    pub base: Uri,
    pub weight: u32,
    pub stats: Arc<EndpointStats>,
}

/// Stats by address, shared by every route and kept across reloads.
#[derive(Default)]
pub struct StatsDirectory {
    by_address: Mutex<HashMap<String, Arc<EndpointStats>>>,
}

impl StatsDirectory {
    pub fn stats(&self, base: &Uri) -> Arc<EndpointStats> {
        let mut map = self
            .by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Forget addresses nothing refers to any more, so churn does not grow the map.
        if map.len() > 64 && map.len().is_power_of_two() {
            map.retain(|_, stats| Arc::strong_count(stats) > 1);
        }
        Arc::clone(map.entry(base.to_string()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn the_ewma_takes_peaks_at_once_and_decays_toward_faster_samples() {
        let stats = EndpointStats::default();
        stats.observe_latency(Duration::from_millis(10), 0);
        assert_eq!(stats.latency_nanos(), 10 * MS);
        stats.observe_latency(Duration::from_millis(50), MS);
        assert_eq!(stats.latency_nanos(), 50 * MS, "a peak is taken at once");
        // One decay period later a 10 ms sample pulls the average most of the way down.
        stats.observe_latency(Duration::from_millis(10), 10_000 * MS);
        let after = stats.latency_nanos();
        assert!(after < 30 * MS && after > 10 * MS, "{after}");
    }

    #[test]
    fn cost_grows_with_requests_in_flight() {
        let stats = Arc::new(EndpointStats::default());
        stats.observe_latency(Duration::from_millis(2), 0);
        let idle = stats.cost();
        let first = stats.start();
        let _second = stats.start();
        assert_eq!(stats.cost(), idle * 3);
        drop(first);
        assert_eq!(stats.in_flight(), 1);
    }

    #[test]
    fn ejections_grow_on_relapse_and_reset_after_a_healthy_spell() {
        let config = OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejected_percent: 50,
        };
        let stats = EndpointStats::default();
        assert!(!stats.record_failure(&config));
        assert!(!stats.record_failure(&config));
        stats.record_success();
        assert!(
            !stats.record_failure(&config),
            "a success restarts the count"
        );
        assert!(!stats.record_failure(&config));
        assert!(stats.record_failure(&config));

        let mut now = 0;
        assert_eq!(stats.eject(&config, now), Duration::from_secs(1));
        assert!(stats.is_ejected(now));
        now += 1_100 * MS;
        assert!(!stats.is_ejected(now));
        assert_eq!(stats.eject(&config, now), Duration::from_secs(2), "relapse");
        now += 2_100 * MS;
        assert_eq!(stats.eject(&config, now), Duration::from_secs(3));
        now += 3_100 * MS;
        for _ in 0..5 {
            stats.eject(&config, now);
        }
        assert_eq!(
            stats.ejected_for(now),
            Some(Duration::from_secs(5)),
            "capped"
        );
        now += 60_000 * MS;
        assert_eq!(stats.eject(&config, now), Duration::from_secs(1), "healed");
        assert_eq!(stats.ejections(), 9);
    }

    #[test]
    fn at_most_the_allowed_share_is_ejected() {
        let config = OutlierConfig::default();
        assert_eq!(config.ejection_allowance(1), 0, "never the only instance");
        assert_eq!(config.ejection_allowance(2), 1);
        assert_eq!(config.ejection_allowance(5), 2);
        let none = OutlierConfig {
            max_ejected_percent: 0,
            ..config
        };
        assert_eq!(none.ejection_allowance(10), 0);
    }
}
