//! The circuit breaker of an upstream service: a concurrency limit with a bounded queue
//! (Envoy's max_requests / max_pending_requests) and a failure-rate breaker with
//! half-open probes (Resilience4j's closed → open → half-open).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::endpoint::now_nanos;

/// `circuit_breaker = { … }` of a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Requests in flight to the service at once.
    pub max_concurrent: u32,
    /// Requests waiting for one of those slots; beyond it they are refused at once.
    pub max_pending: u32,
    /// Share of failed requests (5xx, connection failures, timeouts) that opens the
    /// circuit, once the window holds at least `min_requests`.
    pub failure_rate: f64,
    pub min_requests: u32,
    /// How far back the failure rate looks.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the circuit stays open before it lets probes through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Probes let through when half open; all must succeed to close the circuit.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 1024,
            max_pending: 1024,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent == 0 {
            return Err("circuit_breaker.max_concurrent must be above zero".into());
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err("circuit_breaker.failure_rate must be in (0, 1]".into());
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(300) {
            return Err("circuit_breaker.window must be between 1s and 5m".into());
        }
        if self.half_open_probes == 0 || self.open_for.is_zero() {
            return Err("circuit_breaker.half_open_probes and open_for must be above zero".into());
        }
        Ok(())
    }
}

/// Why the breaker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The circuit is open; retry after the given time.
    Open(Duration),
    /// Every slot is busy and the queue is full.
    Saturated,
    /// Queued, and no slot came free before the deadline.
    TimedOut,
}

/// The state a breaker reports (and the admin API shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

pub struct CircuitBreaker {
    config: BreakerConfig,
    /// 1 while the circuit is open or half open (`keel_gateway_circuit_open`).
    open_gauge: metrics::Gauge,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

struct State {
    mode: Mode,
    pending: u32,
    /// One-second buckets of (second, successes, failures).
    buckets: Vec<(u64, u32, u32)>,
}

enum Mode {
    Closed,
    Open { until: u64 },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// A slot taken from the breaker; report the outcome with [`Permit::record`].
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    _slot: OwnedSemaphorePermit,
}

impl CircuitBreaker {
    /// A breaker reported under `upstream` in the metrics.
    pub fn named(config: BreakerConfig, upstream: &str) -> Self {
        let mut breaker = Self::new(config);
        breaker.open_gauge =
            metrics::gauge!("keel_gateway_circuit_open", "upstream" => upstream.to_owned());
        breaker.open_gauge.set(0.0);
        breaker
    }

    pub fn new(config: BreakerConfig) -> Self {
        let buckets = vec![(0, 0, 0); config.window.as_secs().max(1) as usize];
        Self {
            slots: Arc::new(Semaphore::new(config.max_concurrent as usize)),
            open_gauge: metrics::Gauge::noop(),
            config,
            state: Mutex::new(State {
                mode: Mode::Closed,
                pending: 0,
                buckets,
            }),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn state(&self) -> CircuitState {
        match self.lock().mode {
            Mode::Closed => CircuitState::Closed,
            Mode::Open { until } if until > now_nanos() => CircuitState::Open,
            Mode::Open { .. } | Mode::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Takes a slot, waiting in the bounded queue when all are busy.
    /// A slot for a request arriving at `now` (of [`now_nanos`]), waiting in the queue
    /// until `deadline` at most.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant, now: u64) -> Result<Permit, Refusal> {
        let probe = self.admit(now)?;
        // A probe's turn is given back unless a permit takes it over: on a refusal below,
        // a queue timeout, or the caller going away while queued.
        let mut turn = ProbeTurn {
            breaker: self,
            probe,
        };
        let slot = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                {
                    let mut state = self.lock();
                    if state.pending >= self.config.max_pending {
                        return Err(Refusal::Saturated);
                    }
                    state.pending += 1;
                }
                // Only a queued request needs a timer (one per request was a measurable
                // cost when nearly none queue).
                let queue = QueueSpot(self);
                let slot = tokio::time::timeout_at(
                    deadline.into(),
                    Arc::clone(&self.slots).acquire_owned(),
                )
                .await;
                drop(queue);
                match slot {
                    Ok(slot) => slot.map_err(|_| Refusal::Saturated)?,
                    Err(_) => return Err(Refusal::TimedOut),
                }
            }
        };
        turn.probe = false;
        Ok(Permit {
            breaker: Arc::clone(self),
            probe,
            _slot: slot,
        })
    }

    /// Lets the request past the failure-rate breaker; true when it is a half-open probe.
    fn admit(&self, now: u64) -> Result<bool, Refusal> {
        let mut state = self.lock();
        if let Mode::Open { until } = state.mode {
            if until > now {
                return Err(Refusal::Open(Duration::from_nanos(until - now)));
            }
            state.mode = Mode::HalfOpen {
                admitted: 0,
                succeeded: 0,
            };
        }
        match &mut state.mode {
            Mode::HalfOpen { admitted, .. } => {
                if *admitted >= self.config.half_open_probes {
                    return Err(Refusal::Open(Duration::from_secs(1)));
                }
                *admitted += 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn release_probe(&self, state: &mut State, probe: bool) {
        if let (true, Mode::HalfOpen { admitted, .. }) = (probe, &mut state.mode) {
            *admitted = admitted.saturating_sub(1);
        }
    }

    fn record(&self, probe: bool, success: bool, now: u64) {
        let second = now / 1_000_000_000;
        let mut state = self.lock();
        let window = state.buckets.len() as u64;
        let bucket = &mut state.buckets[(second % window) as usize];
        // Only an older second is replaced: an outcome stamped late (its request waited)
        // counts in the newer second rather than wiping it.
        if bucket.0 < second {
            *bucket = (second, 0, 0);
        }
        if success {
            bucket.1 += 1;
        } else {
            bucket.2 += 1;
        }
        let reopen = Mode::Open {
            until: now
                .saturating_add(u64::try_from(self.config.open_for.as_nanos()).unwrap_or(u64::MAX)),
        };
        match &mut state.mode {
            Mode::HalfOpen { .. } if probe && !success => {
                state.mode = reopen;
                self.open_gauge.set(1.0);
            }
            Mode::HalfOpen { succeeded, .. } if probe => {
                *succeeded += 1;
                if *succeeded >= self.config.half_open_probes {
                    state.mode = Mode::Closed;
                    self.open_gauge.set(0.0);
                    state.buckets.fill((0, 0, 0));
                }
            }
            Mode::Closed if !success => {
                let (ok, failed) = state
                    .buckets
                    .iter()
                    .filter(|b| b.0 + window > second)
                    .fold((0u64, 0u64), |(o, f), b| {
                        (o + u64::from(b.1), f + u64::from(b.2))
                    });
                let total = ok + failed;
                if total >= u64::from(self.config.min_requests)
                    && failed as f64 >= self.config.failure_rate * total as f64
                {
                    state.mode = reopen;
                    self.open_gauge.set(1.0);
                    tracing::warn!(failed, total, "circuit opened");
                }
            }
            _ => {}
        }
    }
}

/// Holds a place in the breaker's queue; leaving it (even by cancellation) frees it.
struct QueueSpot<'a>(&'a CircuitBreaker);

/// A half-open probe's turn, held while its request waits for a slot.
struct ProbeTurn<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
}

impl Drop for ProbeTurn<'_> {
    fn drop(&mut self) {
        if self.probe {
            let mut state = self.breaker.lock();
            self.breaker.release_probe(&mut state, self.probe);
        }
    }
}

impl Drop for QueueSpot<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.pending = state.pending.saturating_sub(1);
    }
}

impl Permit {
    /// The request's outcome, known at `now` (of [`now_nanos`]).
    pub fn record(mut self, success: bool, now: u64) {
        self.breaker.record(self.probe, success, now);
        self.probe = false;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A probe dropped without an outcome (the client went away) frees its turn.
        if self.probe {
            let mut state = self.breaker.lock();
            self.breaker.release_probe(&mut state, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(config: BreakerConfig) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new(config))
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn concurrency_is_limited_with_a_bounded_queue() {
        let breaker = breaker(BreakerConfig {
            max_concurrent: 2,
            max_pending: 1,
            ..BreakerConfig::default()
        });
        let first = breaker.acquire(later(), now_nanos()).await.unwrap();
        let _second = breaker.acquire(later(), now_nanos()).await.unwrap();
        let queued = tokio::spawn({
            let breaker = Arc::clone(&breaker);
            async move { breaker.acquire(later(), now_nanos()).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            breaker.acquire(later(), now_nanos()).await.err(),
            Some(Refusal::Saturated)
        );
        first.record(true, now_nanos());
        assert_eq!(
            queued.await.unwrap(),
            Ok(()),
            "the queued request got the slot"
        );
    }

    #[tokio::test]
    async fn failures_open_the_circuit_and_probes_close_it() {
        let breaker = breaker(BreakerConfig {
            min_requests: 4,
            failure_rate: 0.5,
            open_for: Duration::from_millis(100),
            half_open_probes: 2,
            ..BreakerConfig::default()
        });
        for success in [true, true, false] {
            breaker
                .acquire(later(), now_nanos())
                .await
                .unwrap()
                .record(success, now_nanos());
        }
        assert_eq!(breaker.state(), CircuitState::Closed, "below min_requests");
        breaker
            .acquire(later(), now_nanos())
            .await
            .unwrap()
            .record(false, now_nanos());
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(matches!(
            breaker.acquire(later(), now_nanos()).await.err(),
            Some(Refusal::Open(_))
        ));

        tokio::time::sleep(Duration::from_millis(120)).await;
        let probe = breaker.acquire(later(), now_nanos()).await.unwrap();
        let second_probe = breaker.acquire(later(), now_nanos()).await.unwrap();
        assert!(
            matches!(
                breaker.acquire(later(), now_nanos()).await.err(),
                Some(Refusal::Open(_))
            ),
            "only the probes pass while half open"
        );
        probe.record(true, now_nanos());
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        second_probe.record(true, now_nanos());
        assert_eq!(breaker.state(), CircuitState::Closed);
        breaker
            .acquire(later(), now_nanos())
            .await
            .unwrap()
            .record(false, now_nanos());
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "the window restarted"
        );
    }

    #[tokio::test]
    async fn a_probe_that_times_out_in_the_queue_frees_its_turn() {
        let breaker = breaker(BreakerConfig {
            max_concurrent: 1,
            max_pending: 8,
            min_requests: 1,
            open_for: Duration::from_millis(50),
            half_open_probes: 1,
            ..BreakerConfig::default()
        });
        // An old request holds the only slot when the circuit opens.
        let holder = breaker.acquire(later(), now_nanos()).await.unwrap();
        breaker.record(false, false, now_nanos());
        assert_eq!(breaker.state(), CircuitState::Open);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The probe queues behind it and gives up.
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(
            breaker.acquire(soon, now_nanos()).await.err(),
            Some(Refusal::TimedOut)
        );
        drop(holder);
        // Its turn is back: another probe gets through.
        let probe = breaker.acquire(later(), now_nanos()).await.unwrap();
        probe.record(true, now_nanos());
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test]
    async fn a_failed_probe_reopens_and_an_abandoned_one_frees_its_turn() {
        let breaker = breaker(BreakerConfig {
            min_requests: 1,
            open_for: Duration::from_millis(50),
            half_open_probes: 1,
            ..BreakerConfig::default()
        });
        breaker
            .acquire(later(), now_nanos())
            .await
            .unwrap()
            .record(false, now_nanos());
        tokio::time::sleep(Duration::from_millis(60)).await;
        drop(breaker.acquire(later(), now_nanos()).await.unwrap());
        let probe = breaker.acquire(later(), now_nanos()).await.unwrap();
        probe.record(false, now_nanos());
        assert_eq!(breaker.state(), CircuitState::Open);
    }

    #[test]
    fn invalid_settings_are_rejected() {
        for bad in [
            BreakerConfig {
                max_concurrent: 0,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                failure_rate: 1.5,
                ..BreakerConfig::default()
            },
            BreakerConfig {
                window: Duration::from_millis(10),
                ..BreakerConfig::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
