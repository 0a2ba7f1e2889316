//! The load: registrations, watchers holding blocking queries, sustained heartbeats and a
//! change generator whose changes the watchers must see.
//!
//! Every loop ends by itself: registration after `instances` requests, the heartbeat and
//! change loops at the end of the sustained phase, the watchers when told to stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use keel_registry::client::{ClientError, InstancesQuery, RegistryClient, ttl_registration};
use keel_registry::model::{Heartbeat, Registration, ServiceInstances};
use keel_runtime::Shutdown;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// Blocking-query wait of the watchers, as a discovery client would ask for.
const WATCH_WAIT: Duration = Duration::from_secs(30);
/// How often the heartbeat scheduler wakes to send what has fallen due.
const SCHEDULER_TICK: Duration = Duration::from_millis(5);
/// TTL of the probe instances the change generator writes to: longer than any run, so
/// no probe expires (which would be a change nobody timed).
const PROBE_TTL: Duration = Duration::from_secs(3600);
/// Longest sustained phase, well inside `PROBE_TTL`.
const MAX_DURATION: Duration = Duration::from_secs(1800);
/// How long requests still in flight at the end of a phase may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause of a watcher after a failed query, so a failing registry is not hammered.
const WATCH_RETRY: Duration = Duration::from_millis(100);

/// The shape of the load.
#[derive(Debug, Clone, Args)]
pub struct Plan {
    /// Instances to register and keep heartbeating
    #[arg(long, default_value_t = 10_000)]
    pub instances: usize,
    /// Services the instances are spread over
    #[arg(long, default_value_t = 100)]
    pub services: usize,
    /// Watchers, each running blocking queries on one watched service
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// How many services (the first ones) are watched and changed
    #[arg(long, default_value_t = 10)]
    pub watched_services: usize,
    /// Heartbeat interval of each instance; its TTL check is three times this
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Length of the sustained phase
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Changes per second made to watched services during the sustained phase
    #[arg(long, default_value_t = 5.0)]
    pub change_rate: f64,
    /// Registrations in flight at once (two cores gain nothing from more)
    #[arg(long, default_value_t = 64)]
    pub register_concurrency: usize,
    /// Most heartbeats in flight at once; a registry that falls behind slows the schedule
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

impl Plan {
    /// Rejects loads the harness cannot run meaningfully or that would not end.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=50_000).contains(&self.instances),
            "--instances must be 1 to 50,000 (the registry's default limit)"
        );
        ensure!(
            (1..=self.instances).contains(&self.services),
            "--services must be 1 to --instances"
        );
        ensure!(
            self.instances.div_ceil(self.services) <= 5_000,
            "at most 5,000 instances per service (the registry's default limit)"
        );
        ensure!(
            (1..=self.services).contains(&self.watched_services),
            "--watched-services must be 1 to --services"
        );
        ensure!(
            (self.watched_services..=5_000).contains(&self.watchers),
            "--watchers must be --watched-services to 5,000"
        );
        ensure!(
            (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.heartbeat_interval),
            "--heartbeat-interval must be 1s to 1h"
        );
        ensure!(
            (Duration::from_secs(1)..=MAX_DURATION).contains(&self.duration),
            "--duration must be 1s to {}",
            humantime::format_duration(MAX_DURATION)
        );
        ensure!(
            self.change_rate > 0.0 && self.change_rate <= 100.0,
            "--change-rate must be above 0 and at most 100 per second"
        );
        ensure!(
            (1..=1_024).contains(&self.register_concurrency),
            "--register-concurrency must be 1 to 1,024"
        );
        ensure!(
            (1..=4_096).contains(&self.concurrency),
            "--concurrency must be 1 to 4,096"
        );
        Ok(())
    }

    pub fn ttl(&self) -> Duration {
        self.heartbeat_interval * 3
    }

    /// Heartbeats per second the schedule asks for.
    pub fn heartbeat_rate(&self) -> f64 {
        self.instances as f64 / self.heartbeat_interval.as_secs_f64()
    }

    fn registration(&self, instance: usize) -> Registration {
        ttl_registration(
            &service_name(instance % self.services),
            &instance_id(instance),
            "127.0.0.1",
            port(instance),
            self.ttl(),
        )
    }

    /// The watched service a watcher or a change goes to.
    fn slot(&self, n: usize) -> usize {
        n % self.watched_services
    }
}

pub fn service_name(index: usize) -> String {
    format!("bench-svc-{index:03}")
}

fn instance_id(index: usize) -> String {
    format!("bench-{index:05}")
}

/// The instance of watched service `slot` that the change generator changes.
fn probe_id(slot: usize) -> String {
    format!("bench-probe-{slot:03}")
}

/// Registered ports are never contacted (TTL checks only); any valid port does.
fn port(instance: usize) -> u16 {
    20_000 + (instance % 40_000) as u16
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// === Tally ===

/// Outcomes and latencies of one kind of request.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latencies: Vec<Duration>,
}

impl Tally {
    fn record<T>(&mut self, result: Result<T, ClientError>, took: Duration) {
        match result {
            Ok(_) => {
                self.ok += 1;
                self.latencies.push(took);
            }
            Err(error) => self.fail(error.to_string()),
        }
    }

    fn fail(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.errors += other.errors;
        if let Some(error) = other.first_error {
            self.first_error.get_or_insert(error);
        }
        self.latencies.extend(other.latencies);
    }
}

// === registration ===

pub struct Registered {
    pub tally: Tally,
    pub elapsed: Duration,
}

/// Registers every instance, `register_concurrency` at a time.
pub async fn register_all(client: &RegistryClient, plan: &Plan) -> Registered {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..plan.register_concurrency.min(plan.instances) {
        let (client, next, plan) = (client.clone(), Arc::clone(&next), plan.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let instance = next.fetch_add(1, Ordering::Relaxed);
                if instance >= plan.instances {
                    return tally;
                }
                let registration = plan.registration(instance);
                let sent = Instant::now();
                let result = client.register(&registration).await;
                tally.record(result, sent.elapsed());
            }
        });
    }
    let mut tally = Tally::default();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(worker) => tally.merge(worker),
            Err(error) => tally.fail(format!("registration worker failed: {error}")),
        }
    }
    Registered {
        tally,
        elapsed: started.elapsed(),
    }
}

/// Registers one probe instance per watched service (not part of the timed registrations).
pub async fn register_probes(client: &RegistryClient, plan: &Plan) -> anyhow::Result<()> {
    for slot in 0..plan.watched_services {
        let probe = ttl_registration(
            &service_name(slot),
            &probe_id(slot),
            "127.0.0.1",
            port(slot),
            PROBE_TTL,
        );
        client
            .register(&probe)
            .await
            .with_context(|| format!("cannot register probe {}", probe.id))?;
    }
    Ok(())
}

// === watchers ===

/// What one watcher saw.
#[derive(Debug, Default)]
pub struct WatcherOutcome {
    pub slot: usize,
    /// Each new change sequence number seen, with when the answer carrying it arrived.
    pub seen: Vec<(u64, Instant)>,
    /// Answers without a new change: waits that ran out, or changes the generator did not
    /// make (a TTL expiring because heartbeats fell behind).
    pub other_answers: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Starts the watchers; each first reads its service plainly for the index to block on.
pub async fn start_watchers(
    client: &RegistryClient,
    plan: &Plan,
    stop: &Shutdown,
) -> anyhow::Result<JoinSet<WatcherOutcome>> {
    let mut watchers = JoinSet::new();
    for watcher in 0..plan.watchers {
        let slot = plan.slot(watcher);
        let first = client
            .instances(&service_name(slot), &InstancesQuery::default())
            .await
            .context("a watcher's first read failed")?;
        watchers.spawn(watch(client.clone(), slot, first, stop.clone()));
    }
    Ok(watchers)
}

async fn watch(
    client: RegistryClient,
    slot: usize,
    first: ServiceInstances,
    stop: Shutdown,
) -> WatcherOutcome {
    let service = service_name(slot);
    let probe = probe_id(slot);
    let mut index = first.index;
    let mut last = change_seq(&first, &probe);
    let mut outcome = WatcherOutcome {
        slot,
        ..WatcherOutcome::default()
    };
    while !stop.is_triggered() {
        let query = InstancesQuery {
            index: Some(index),
            wait: Some(WATCH_WAIT),
            ..InstancesQuery::default()
        };
        let answer = tokio::select! {
            answer = client.instances(&service, &query) => answer,
            () = stop.wait() => break,
        };
        // Taken once the answer is read and parsed: what a discovery client experiences.
        let arrived = Instant::now();
        match answer {
            Ok(found) => {
                index = found.index;
                let seq = change_seq(&found, &probe);
                match seq {
                    Some(new) if seq != last => {
                        outcome.seen.push((new, arrived));
                        last = seq;
                    }
                    _ => outcome.other_answers += 1,
                }
            }
            Err(error) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert(error.to_string());
                tokio::select! {
                    () = tokio::time::sleep(WATCH_RETRY) => {}
                    () = stop.wait() => break,
                }
            }
        }
    }
    outcome
}

/// The change sequence number the generator last wrote into the probe's check output.
fn change_seq(found: &ServiceInstances, probe: &str) -> Option<u64> {
    let instance = found.instances.iter().find(|i| i.id == probe)?;
    let output = &instance.checks.first()?.output;
    output.strip_prefix("change ")?.parse().ok()
}

// === sustained phase ===

pub struct Heartbeats {
    pub tally: Tally,
    pub sent: u64,
    /// From the first to the last heartbeat scheduled.
    pub elapsed: Duration,
}

/// Heartbeats every instance once per interval, spread evenly (instance `k` at offset
/// `k * interval / instances`), until `stop_at`.
pub async fn heartbeats(client: &RegistryClient, plan: &Plan, stop_at: Instant) -> Heartbeats {
    let slots = Arc::new(Semaphore::new(plan.concurrency));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let rate = plan.heartbeat_rate();
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut ticker = tokio::time::interval(SCHEDULER_TICK);
    // The count due is computed from the clock, so a late tick sends everything that fell
    // due meanwhile and ticks need not catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    'schedule: loop {
        ticker.tick().await;
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        let due = (now.duration_since(started).as_secs_f64() * rate) as u64;
        while sent < due {
            // Waiting for a free slot delays the schedule: a registry that cannot keep up
            // shows as fewer heartbeats sent, not as an unbounded queue in the harness.
            let permit = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break 'schedule,
                },
                () = tokio::time::sleep_until(stop_at.into()) => break 'schedule,
            };
            let instance = (sent % plan.instances as u64) as usize;
            sent += 1;
            let (client, tally) = (client.clone(), Arc::clone(&tally));
            let service = service_name(instance % plan.services);
            let id = instance_id(instance);
            tokio::spawn(async move {
                let began = Instant::now();
                let result = client.heartbeat(&service, &id, &Heartbeat::default()).await;
                lock(&tally).record(result, began.elapsed());
                drop(permit);
            });
        }
    }
    let elapsed = started.elapsed();
    // All slots free again means every heartbeat sent has been answered or has failed.
    let all = u32::try_from(plan.concurrency).unwrap_or(u32::MAX);
    let _drained = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all)).await;
    let tally = std::mem::take(&mut *lock(&tally));
    Heartbeats {
        tally,
        sent,
        elapsed,
    }
}

/// One change made by the generator.
#[derive(Debug, Clone, Copy)]
pub struct Change {
    pub seq: u64,
    pub slot: usize,
    /// Just before the request was sent: the watch latency is measured from here, so it
    /// includes the write itself.
    pub sent_at: Instant,
    pub acked: bool,
}

pub struct Changes {
    pub changes: Vec<Change>,
    pub tally: Tally,
}

/// Makes `change_rate` changes per second until `stop_at`, round-robin over the watched
/// services: a heartbeat to the service's probe whose check output carries a new sequence
/// number, which moves the service's index and so wakes its watchers.
pub async fn changes(client: &RegistryClient, plan: &Plan, stop_at: Instant) -> Changes {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.change_rate));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut made = Changes {
        changes: Vec::new(),
        tally: Tally::default(),
    };
    let mut seq: u64 = 0;
    loop {
        ticker.tick().await;
        if Instant::now() >= stop_at {
            break;
        }
        seq += 1;
        let slot = plan.slot(seq as usize);
        let beat = Heartbeat {
            status: None,
            output: Some(format!("change {seq}")),
        };
        let sent_at = Instant::now();
        let result = client
            .heartbeat(&service_name(slot), &probe_id(slot), &beat)
            .await;
        let acked = result.is_ok();
        made.tally.record(result, sent_at.elapsed());
        made.changes.push(Change {
            seq,
            slot,
            sent_at,
            acked,
        });
    }
    made
}

// === analysis ===

/// Change-to-watcher deliveries matched up by sequence number.
#[derive(Debug, Default)]
pub struct Deliveries {
    pub latencies: Vec<Duration>,
    /// Acknowledged changes times the watchers of the changed service.
    pub expected: u64,
    pub delivered: u64,
}

pub fn deliveries(changes: &[Change], watchers: &[WatcherOutcome]) -> Deliveries {
    let by_seq: HashMap<u64, &Change> = changes.iter().map(|c| (c.seq, c)).collect();
    let mut watchers_per_slot: HashMap<usize, u64> = HashMap::new();
    for watcher in watchers {
        *watchers_per_slot.entry(watcher.slot).or_default() += 1;
    }
    let mut result = Deliveries {
        expected: changes
            .iter()
            .filter(|c| c.acked)
            .map(|c| watchers_per_slot.get(&c.slot).copied().unwrap_or(0))
            .sum(),
        ..Deliveries::default()
    };
    for watcher in watchers {
        for (seq, arrived) in &watcher.seen {
            if let Some(change) = by_seq.get(seq).filter(|c| c.slot == watcher.slot) {
                result.delivered += 1;
                result
                    .latencies
                    .push(arrived.saturating_duration_since(change.sent_at));
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            instances: 10_000,
            services: 100,
            watchers: 100,
            watched_services: 10,
            heartbeat_interval: Duration::from_secs(10),
            duration: Duration::from_secs(60),
            change_rate: 5.0,
            register_concurrency: 64,
            concurrency: 256,
        }
    }

    #[test]
    fn the_default_plan_is_valid_and_asks_for_a_thousand_heartbeats_a_second() {
        let plan = plan();
        plan.validate().unwrap();
        assert_eq!(plan.heartbeat_rate(), 1_000.0);
        assert_eq!(plan.ttl(), Duration::from_secs(30));
        let registration = plan.registration(4_321);
        assert_eq!(registration.service, "bench-svc-021");
        assert_eq!(registration.id, "bench-04321");
        registration.validate(&Default::default()).unwrap();
    }

    #[test]
    fn unbounded_or_impossible_plans_are_refused() {
        let mut too_many_per_service = plan();
        too_many_per_service.services = 1;
        assert!(too_many_per_service.validate().is_err());
        let mut endless = plan();
        endless.duration = Duration::from_secs(24 * 3600);
        assert!(endless.validate().is_err());
        let mut idle = plan();
        idle.change_rate = 0.0;
        assert!(idle.validate().is_err());
        let mut unwatched = plan();
        unwatched.watchers = 5;
        assert!(unwatched.validate().is_err());
    }

    #[test]
    fn deliveries_are_matched_by_sequence_number_and_service() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let changes = [
            Change {
                seq: 1,
                slot: 0,
                sent_at: at(0),
                acked: true,
            },
            Change {
                seq: 2,
                slot: 1,
                sent_at: at(100),
                acked: true,
            },
            Change {
                seq: 3,
                slot: 0,
                sent_at: at(200),
                acked: false,
            },
        ];
        let watcher = |slot, seen: Vec<(u64, Instant)>| WatcherOutcome {
            slot,
            seen,
            ..WatcherOutcome::default()
        };
        let watchers = [
            watcher(0, vec![(1, at(3))]),
            watcher(0, vec![(1, at(5)), (2, at(7))]),
            watcher(1, vec![]),
        ];
        let result = deliveries(&changes, &watchers);
        // Change 1 to both slot-0 watchers, change 2 to the one slot-1 watcher.
        assert_eq!(result.expected, 3);
        // A sequence number seen on the wrong service is not a delivery.
        assert_eq!(result.delivered, 2);
        assert_eq!(
            result.latencies,
            [Duration::from_millis(3), Duration::from_millis(5)]
        );
    }
}
