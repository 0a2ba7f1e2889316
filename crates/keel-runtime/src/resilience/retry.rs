//! Retries: which failures are retried, how long to wait, and the budget that keeps
//! retries from multiplying the load on a struggling service (Finagle's and linkerd's
//! retry budget: a share of recent requests plus a small floor per second).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

use super::endpoint::now_nanos;

/// `retry = { … }` of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt, each on another instance; 0 disables retries.
    pub attempts: u32,
    /// Upstream statuses that are retried (idempotent requests only).
    pub on_status: Vec<u16>,
    /// Retries may add this share of the route's requests over the last ten seconds…
    pub budget_ratio: f64,
    /// …plus this many per second, so a quiet route can still retry.
    pub budget_min_per_second: u32,
    /// Backoff before retry n is random in [0, min(max, base × 2ⁿ)] ("full jitter").
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Deadline of each attempt; the route's `timeout` bounds them all together.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Request bodies up to this size are kept so a retry can send them again; larger
    /// or unsized bodies stream through and are not retried.
    pub buffer_bytes: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            on_status: vec![502, 503, 504],
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            per_try_timeout: None,
            buffer_bytes: 64 * 1024,
        }
    }
}

impl RetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=10.0).contains(&self.budget_ratio) {
            return Err("retry.budget_ratio must be between 0 and 10".into());
        }
        if self.backoff_base > self.backoff_max {
            return Err("retry.backoff_base must not exceed retry.backoff_max".into());
        }
        if let Some(status) = self.on_status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(format!("retry.on_status: {status} is not an HTTP status"));
        }
        if self.per_try_timeout.is_some_and(|t| t.is_zero()) {
            return Err("retry.per_try_timeout must be above zero".into());
        }
        Ok(())
    }

    /// The pause before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(self.backoff_max);
        ceiling.mul_f64(fastrand::f64())
    }

    pub fn retries_status(&self, status: u16) -> bool {
        self.on_status.contains(&status)
    }
}

/// Methods RFC 9110 §9.2.2 defines as idempotent: safe to send twice.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

const WINDOW_SECONDS: usize = 10;

/// Requests and retries over the last ten seconds, in one-second buckets.
pub struct RetryBudget {
    ratio: f64,
    floor: u64,
    buckets: Mutex<[Bucket; WINDOW_SECONDS]>,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    pub fn new(config: &RetryConfig) -> Self {
        Self {
            ratio: config.budget_ratio,
            floor: u64::from(config.budget_min_per_second) * WINDOW_SECONDS as u64,
            buckets: Mutex::new([Bucket::default(); WINDOW_SECONDS]),
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(now_nanos() / 1_000_000_000)
    }

    fn bucket(buckets: &mut [Bucket; WINDOW_SECONDS], second: u64) -> &mut Bucket {
        let bucket = &mut buckets[(second % WINDOW_SECONDS as u64) as usize];
        // Only an older second is replaced: a late-stamped count joins the newer second
        // rather than wiping it.
        if bucket.second < second {
            *bucket = Bucket {
                second,
                ..Bucket::default()
            };
        }
        bucket
    }

    /// Counts an original request (not a retry) made in `second` (of [`now_nanos`]).
    pub fn deposit_at(&self, second: u64) {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        Self::bucket(&mut buckets, second).requests += 1;
    }

    fn withdraw_at(&self, second: u64) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let live = buckets
            .iter()
            .filter(|b| b.second + (WINDOW_SECONDS as u64) > second && b.second <= second);
        let (requests, retries) = live.fold((0, 0), |(q, r), b| (q + b.requests, r + b.retries));
        let allowed = self.floor + (requests as f64 * self.ratio) as u64;
        if retries >= allowed {
            return false;
        }
        Self::bucket(&mut buckets, second).retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, floor: u32) -> RetryBudget {
        RetryBudget::new(&RetryConfig {
            budget_ratio: ratio,
            budget_min_per_second: floor,
            ..RetryConfig::default()
        })
    }

    #[test]
    fn the_budget_is_a_share_of_recent_requests_plus_a_floor() {
        let budget = budget(0.2, 1);
        for _ in 0..100 {
            budget.deposit_at(100);
        }
        // 10 (floor over the window) + 20 % of 100.
        let granted = (0..100).filter(|_| budget.withdraw_at(100)).count();
        assert_eq!(granted, 30);
        // Nine seconds later the same requests and retries still count…
        assert!(!budget.withdraw_at(109));
        // …and once they leave the window the budget is back to its floor.
        let granted = (0..100).filter(|_| budget.withdraw_at(110)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn a_late_stamped_request_does_not_wipe_a_newer_second() {
        let budget = budget(0.5, 0);
        for _ in 0..10 {
            budget.deposit_at(110);
        }
        // Stamped ten seconds late: the same bucket slot as second 110.
        budget.deposit_at(100);
        let granted = (0..100).filter(|_| budget.withdraw_at(110)).count();
        assert_eq!(granted, 5, "half of the 11 requests, not of 1");
    }

    #[test]
    fn a_zero_budget_never_retries() {
        let budget = budget(0.0, 0);
        budget.deposit_at(5);
        assert!(!budget.withdraw_at(5));
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling() {
        let config = RetryConfig::default();
        for retry in 1..10 {
            let ceiling = (config.backoff_base * (1 << (retry - 1))).min(config.backoff_max);
            let samples: Vec<Duration> = (0..200).map(|_| config.backoff(retry)).collect();
            assert!(samples.iter().all(|s| *s <= ceiling));
            assert!(samples.iter().any(|s| *s != samples[0]), "jittered");
        }
    }

    #[test]
    fn only_idempotent_methods_are_retried_after_sending() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
