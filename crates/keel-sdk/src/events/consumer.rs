//! Consumers: handlers per event type, the inbox that makes them idempotent, and what
//! happens to a message that fails (retry with a growing delay, then the dead letters).

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use keel_runtime::Shutdown;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{Bus, BusError, Envelope, Event, Reply, Transport, check_group, reconnect_delay};
use crate::data::{Database, Tx};

/// An event as a handler receives it.
#[derive(Debug, Clone)]
pub struct Received<E> {
    pub event: E,
    /// The envelope's id: the same on every delivery of one publication.
    pub id: String,
    /// The publishing service (`/keel/<service>`).
    pub source: String,
    /// RFC 3339.
    pub time: String,
    /// 1 on the first delivery.
    pub attempt: u32,
    /// Where a command's reply goes, when the sender wants one ([`Bus::reply`]).
    pub reply: Option<ReplyTo>,
}

/// A command's return address: the correlation its reply carries back, and the event type
/// the reply is published as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub correlation: String,
    pub event_type: String,
}

/// Why a handler did not handle an event.
#[derive(Debug)]
pub enum HandlerError {
    /// Worth trying again later (a dependency down, a conflict): retried with a growing
    /// delay, dead-lettered after the last attempt. What `?` on any error gives.
    Retry(String),
    /// Never going to work (the event asks for something impossible): dead-lettered now.
    Reject(String),
}

impl HandlerError {
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        Self::Reject(reason.to_string())
    }

    /// What a bus error means in a handler: a command whose return address is not a reply
    /// type will never be answerable (rejected); anything else may pass (retried).
    pub fn bus(error: BusError) -> Self {
        match error {
            BusError::ReplyType(_) => Self::reject(error),
            error => Self::Retry(error.to_string()),
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Retry(message) | Self::Reject(message) => message,
        }
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::Retry(error.to_string())
    }
}

/// Handles events of type `E` inside the consumer's transaction: what it writes through
/// `tx` commits together with the inbox record, or not at all.
///
/// ```ignore
/// struct ReserveStock;
///
/// impl Handler<OrderPlaced> for ReserveStock {
///     async fn handle(&self, tx: &mut Tx, placed: Received<OrderPlaced>) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE stock SET reserved = reserved + $1 WHERE sku = $2")
///             .bind(placed.event.quantity).bind(&placed.event.sku)
///             .execute(&mut **tx).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<E: Event>: Send + Sync + 'static {
    fn handle(
        &self,
        tx: &mut Tx,
        event: Received<E>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A handler with its event type erased, so one consumer can hold several.
pub(crate) trait Dispatch: Send + Sync {
    fn dispatch<'a>(
        &'a self,
        tx: &'a mut Tx,
        envelope: &'a Envelope,
        attempt: u32,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

struct Typed<E, H> {
    handler: H,
    event: PhantomData<fn() -> E>,
}

impl<E: Event, H: Handler<E>> Dispatch for Typed<E, H> {
    fn dispatch<'a>(
        &'a self,
        tx: &'a mut Tx,
        envelope: &'a Envelope,
        attempt: u32,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            // Data that does not fit the type will not fit it next time either.
            let event = envelope.decode::<E>().map_err(HandlerError::reject)?;
            let received = Received {
                event,
                id: envelope.id.clone(),
                source: envelope.source.clone(),
                time: envelope.time.clone(),
                attempt,
                reply: envelope
                    .correlationid
                    .clone()
                    .zip(envelope.replyto.clone())
                    .map(|(correlation, event_type)| ReplyTo {
                        correlation,
                        event_type,
                    }),
            };
            self.handler.handle(tx, received).await
        })
    }
}

/// How often and how late a failing message is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last one fails, the message is
    /// dead-lettered.
    pub max_attempts: u32,
    /// The wait before the second attempt; each later wait doubles, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// How long a handler may take before the attempt counts as failed (the consumer's
    /// own database work around it is bounded by the pool's acquire timeout instead).
    pub handler_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based), when another attempt follows.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let doublings = attempt.saturating_sub(1).min(30);
        Some(
            self.first_delay
                .saturating_mul(1 << doublings)
                .min(self.max_delay),
        )
    }

    /// Every distinct wait, shortest first: RabbitMQ keeps one delay queue for each.
    pub(crate) fn delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> = (1..self.max_attempts)
            .filter_map(|attempt| self.delay_after(attempt))
            .collect();
        delays.dedup();
        delays
    }
}

/// What a consumer has done so far; also exported as `keel_events_consumed_total`.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub handled: AtomicU64,
    /// Deliveries of an event already handled (found in the inbox), acknowledged unread.
    pub duplicates: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Times a message was held because the database could not be reached.
    pub database_waits: AtomicU64,
}

/// What to do with a delivery once it has been through the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handled: acknowledge.
    Done,
    /// Handled before (found in the inbox): acknowledge.
    Duplicate,
    /// Failed; try again after `delay` as attempt `attempt + 1`.
    Retry { delay: Duration, error: String },
    /// Shutting down while holding the message: give it back unhandled.
    GiveBack,
    /// Failed for good: dead-letter with `error`.
    Dead {
        id: String,
        event_type: String,
        error: String,
    },
}

/// Builds a [`Consumer`]: `bus.consumer(group, &db).on::<E, _>(handler).start()`.
pub struct ConsumerBuilder {
    bus: Bus,
    group: String,
    db: Database,
    handlers: HashMap<String, Box<dyn Dispatch>>,
    retry: RetryPolicy,
}

impl ConsumerBuilder {
    pub(crate) fn new(bus: Bus, group: &str, db: Database) -> Self {
        Self {
            bus,
            group: group.to_owned(),
            db,
            handlers: HashMap::new(),
            retry: RetryPolicy::default(),
        }
    }

    /// Handles events of type `E` with `handler` (one handler per type; a later one
    /// replaces an earlier).
    pub fn on<E: Event, H: Handler<E>>(self, handler: H) -> Self {
        self.dispatch(
            E::TYPE,
            Box::new(Typed {
                handler,
                event: PhantomData,
            }),
        )
    }

    /// Handles envelopes of `event_type` with `dispatch` (a type known only at run time,
    /// such as a saga's replies).
    pub(crate) fn dispatch(mut self, event_type: &str, dispatch: Box<dyn Dispatch>) -> Self {
        self.handlers.insert(event_type.to_owned(), dispatch);
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Declares the group's queues and bindings, so that every event published from now
    /// on reaches the group, and returns the consumer, ready to [`Consumer::run`].
    pub async fn start(self) -> Result<Consumer, BusError> {
        check_group(&self.group)?;
        if self.handlers.is_empty() {
            return Err(BusError::NoHandlers(self.group));
        }
        let core = Arc::new(ConsumerCore {
            group: self.group,
            bus: self.bus.clone(),
            db: self.db,
            handlers: self.handlers,
            retry: self.retry,
            stats: Arc::default(),
        });
        match &self.bus.inner.transport {
            Transport::InProcess(bus) => bus.bind(&core),
            Transport::RabbitMq(bus) => bus.declare_group(&core).await?,
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => bus.declare_group(&core).await?,
        }
        Ok(Consumer {
            bus: self.bus,
            core,
            concurrency: 1,
            batch: 1,
        })
    }
}

/// A consumer, declared and ready: [`Consumer::run`] takes messages until shutdown.
pub struct Consumer {
    bus: Bus,
    core: Arc<ConsumerCore>,
    concurrency: usize,
    batch: usize,
}

impl Consumer {
    /// The consumer group this consumer belongs to.
    pub fn group(&self) -> &str {
        &self.core.group
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.core.stats.clone()
    }

    /// Handles up to `handlers` messages at once (1 by default; at most 64; always 1 on
    /// SQLite, which has one writer): as many deliveries in hand at once on RabbitMQ (one
    /// connection, a prefetch at least as large), as many takers in process. Messages are then no longer handled in the
    /// order they were published, so only for handlers that do not depend on it (each
    /// idempotent by its business key, like saga participants).
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.concurrency = handlers.clamp(1, 64);
        self
    }

    /// On RabbitMQ, lets each of the [`Consumer::concurrency`] handlers take up to
    /// `messages` deliveries that are waiting at once (1 by default; at most 64) and handle
    /// them in one transaction: one `BEGIN` with their inbox rows, one outbox write, one
    /// commit for all, which is most of a small handler's database work. If any of them
    /// cannot be handled together (a handler fails, one was handled before), none of their
    /// work commits and each is handled alone, as without batching. The prefetch grows to
    /// `concurrency × messages`.
    ///
    /// Only for handlers that do not mind sharing a transaction: a handler that locks rows
    /// others lock too (a stock level) holds them until the whole batch commits, and
    /// batches running at once may lock them in different orders (PostgreSQL breaks such a
    /// deadlock after a second, and the batch is then handled one by one): give those
    /// consumers a concurrency of 1. The whole batch gets one `handler_timeout`. A handler
    /// must never swallow a database error: PostgreSQL turns the commit of a failed
    /// transaction into a rollback without an error, which in a batch would drop the work
    /// of every message in it, acknowledged.
    pub fn batch(mut self, messages: usize) -> Self {
        self.batch = messages.clamp(1, 64);
        self
    }

    /// Takes and handles messages until `shutdown` (one at a time, unless
    /// [`Consumer::concurrency`] says otherwise); the messages in hand are finished first.
    /// Reconnects by itself when the broker goes away.
    pub async fn run(self, shutdown: Shutdown) {
        let core = &self.core;
        // SQLite has one writer, and a handler's transaction writes first: more at once
        // would only wait for each other while holding pooled connections.
        let concurrency = match core.db.backend() {
            crate::data::Backend::Sqlite => 1,
            crate::data::Backend::Postgres => self.concurrency,
        };
        match &self.bus.inner.transport {
            Transport::InProcess(bus) => {
                let takers = (0..concurrency).map(|_| bus.consume(core, shutdown.clone()));
                futures_util::future::join_all(takers).await;
            }
            Transport::RabbitMq(bus) => bus.consume(core, shutdown, concurrency, self.batch).await,
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => bus.consume(core, shutdown, concurrency).await,
        }
    }
}

/// The transport-independent part of a consumer.
pub(crate) struct ConsumerCore {
    pub group: String,
    /// Answers the commands it dead-letters (their senders need not wait for a timeout).
    bus: Bus,
    db: Database,
    handlers: HashMap<String, Box<dyn Dispatch>>,
    pub retry: RetryPolicy,
    pub stats: Arc<ConsumerStats>,
}

impl ConsumerCore {
    /// The event types the group binds.
    pub fn event_types(&self) -> impl Iterator<Item = &str> + '_ {
        self.handlers.keys().map(String::as_str)
    }

    /// Handles one delivery (attempt `attempt`, 1-based) and says what to do with it.
    /// While the database is unreachable the delivery is held and tried again with
    /// backoff, without counting attempts (it is not the message's fault); on `shutdown`
    /// meanwhile, it is given back ([`Outcome::GiveBack`]).
    pub async fn process(&self, payload: &[u8], attempt: u32, shutdown: &Shutdown) -> Outcome {
        let envelope = match Envelope::from_slice(payload) {
            Ok(envelope) => envelope,
            Err(error) => return self.count(self.dead("", "", error.to_string())),
        };
        let span = self.span(&envelope, attempt);
        let mut outages = 0;
        loop {
            let error = match self
                .handle(&envelope, attempt)
                .instrument(span.clone())
                .await
            {
                Ok(outcome) => return self.count(outcome),
                Err(Unavailable(error)) => error,
            };
            outages += 1;
            self.stats.database_waits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("keel_events_database_unavailable_total", "group" => self.group.clone())
                .increment(1);
            tracing::warn!(%error, group = %self.group, "database unavailable; holding the message");
            tokio::select! {
                () = tokio::time::sleep(reconnect_delay(outages)) => {}
                () = shutdown.wait() => return Outcome::GiveBack,
            }
        }
    }

    /// Handles several deliveries (payload and attempt each) and says what to do with each:
    /// in one transaction when every one of them commits in it, else each alone
    /// ([`ConsumerCore::process`]), so that one failing message costs the others only the
    /// second try.
    pub async fn process_all(
        &self,
        deliveries: &[(&[u8], u32)],
        shutdown: &Shutdown,
    ) -> Vec<Outcome> {
        if deliveries.len() > 1
            && !shutdown.is_triggered()
            && self.handle_together(deliveries).await
        {
            return deliveries
                .iter()
                .map(|_| self.count(Outcome::Done))
                .collect();
        }
        let mut outcomes = Vec::with_capacity(deliveries.len());
        for (payload, attempt) in deliveries {
            // Once one is given back (stopping while the database is away), the rest are
            // too, untried: each would wait out the outage again first.
            let outcome = if outcomes.last() == Some(&Outcome::GiveBack) {
                Outcome::GiveBack
            } else {
                self.process(payload, *attempt, shutdown).await
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Handles every one of `deliveries` in one transaction; false, with nothing of theirs
    /// committed, when any of them is not for a handler, was handled before, or fails, or
    /// the database does: what went wrong is then found and reported one by one.
    async fn handle_together(&self, deliveries: &[(&[u8], u32)]) -> bool {
        let mut work = Vec::with_capacity(deliveries.len());
        for (payload, attempt) in deliveries {
            let Ok(envelope) = Envelope::from_slice(payload) else {
                return false;
            };
            let Some(handler) = self.handlers.get(envelope.event_type.as_str()) else {
                return false;
            };
            let span = self.span(&envelope, *attempt);
            work.push((envelope, handler, *attempt, span));
        }
        let ids: Vec<&str> = work
            .iter()
            .map(|(envelope, ..)| envelope.id.as_str())
            .collect();
        let together = async {
            let Ok(Some(mut tx)) = self.db.begin_claiming(&self.group, &ids).await else {
                return false;
            };
            // One handler's time for the whole batch: it holds its locks until it commits,
            // and a handler that hangs gets its own full timeout when tried alone.
            let handled = tokio::time::timeout(self.retry.handler_timeout, async {
                for (envelope, handler, attempt, span) in &work {
                    let handled = handler
                        .dispatch(&mut tx, envelope, *attempt)
                        .instrument(span.clone())
                        .await;
                    if handled.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
            // Not handled: the transaction is dropped, and rolled back.
            handled == Ok(true) && tx.commit().await.is_ok()
        };
        let committed = AssertUnwindSafe(together)
            .catch_unwind()
            .await
            .unwrap_or(false);
        if !committed {
            tracing::debug!(group = %self.group, messages = work.len(), "a batch is handled one by one");
        }
        committed
    }

    /// The span a message is handled in, a child of the trace it was published in (none
    /// starts a new trace).
    fn span(&self, envelope: &Envelope, attempt: u32) -> tracing::Span {
        let span = tracing::info_span!(
            "consume",
            otel.kind = "consumer",
            messaging.system = "keel",
            messaging.consumer.group.name = %self.group,
            messaging.message.id = %envelope.id,
            cloudevents.event_type = %envelope.event_type,
            attempt,
        );
        let _ = span.set_parent(envelope.trace_context());
        span
    }

    /// One attempt at `envelope`; `Err` when the database could not be reached.
    async fn handle(&self, envelope: &Envelope, attempt: u32) -> Result<Outcome, Unavailable> {
        let Some(handler) = self.handlers.get(envelope.event_type.as_str()) else {
            return Ok(self.dead(
                &envelope.id,
                &envelope.event_type,
                format!(
                    "group {} has no handler for {}",
                    self.group, envelope.event_type
                ),
            ));
        };
        let attempt_work = async {
            let Some(mut tx) = self
                .db
                .begin_claiming(&self.group, &[envelope.id.as_str()])
                .await
                .map_err(Failure::Database)?
            else {
                return Ok(false);
            };
            let timeout = self.retry.handler_timeout;
            match tokio::time::timeout(timeout, handler.dispatch(&mut tx, envelope, attempt)).await
            {
                Ok(result) => result.map_err(Failure::Handler)?,
                Err(_elapsed) => {
                    let error = format!("the handler took longer than {timeout:?}");
                    return Err(Failure::Handler(HandlerError::Retry(error)));
                }
            }
            tx.commit().await.map_err(Failure::Database)?;
            Ok(true)
        };
        let error = match AssertUnwindSafe(attempt_work).catch_unwind().await {
            Ok(Ok(true)) => return Ok(Outcome::Done),
            Ok(Ok(false)) => return Ok(Outcome::Duplicate),
            Ok(Err(Failure::Database(error))) if unavailable(&error) => {
                return Err(Unavailable(error.to_string()));
            }
            Ok(Err(Failure::Database(error))) => HandlerError::Retry(error.to_string()),
            Ok(Err(Failure::Handler(error))) => error,
            Err(_panic) => HandlerError::Retry("the handler panicked".to_owned()),
        };
        tracing::warn!(error = error.message(), attempt, "event not handled");
        Ok(match (&error, self.retry.delay_after(attempt)) {
            (HandlerError::Retry(message), Some(delay)) => Outcome::Retry {
                delay,
                error: message.clone(),
            },
            _ => {
                self.refuse(envelope, error.message()).await;
                self.dead(
                    &envelope.id,
                    &envelope.event_type,
                    error.message().to_owned(),
                )
            }
        })
    }

    /// A command about to be dead-lettered is answered "refused" when it has a return
    /// address, so that its sender (a saga) moves on now rather than at its timeout. Best
    /// effort: published directly, since nothing of the failed attempt commits.
    async fn refuse(&self, envelope: &Envelope, why: &str) {
        let (Some(correlation), Some(event_type)) = (&envelope.correlationid, &envelope.replyto)
        else {
            return;
        };
        let reply_to = ReplyTo {
            correlation: correlation.clone(),
            event_type: event_type.clone(),
        };
        let refused = Reply::dead_lettered(why);
        let sent = match self.bus.reply_envelope(&reply_to, &refused) {
            Ok(reply) => self.bus.publish_envelope(&reply).await,
            Err(error) => Err(error),
        };
        if let Err(error) = sent {
            tracing::warn!(%error, group = %self.group, "a dead-lettered command could not be answered");
        }
    }

    fn dead(&self, id: &str, event_type: &str, error: String) -> Outcome {
        Outcome::Dead {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            error,
        }
    }

    fn count(&self, outcome: Outcome) -> Outcome {
        let (counter, label) = match &outcome {
            Outcome::Done => (&self.stats.handled, "handled"),
            Outcome::Duplicate => (&self.stats.duplicates, "duplicate"),
            Outcome::Retry { .. } => (&self.stats.retried, "retried"),
            Outcome::Dead { .. } => (&self.stats.dead_lettered, "dead_lettered"),
            // Given back unhandled: nothing to count.
            Outcome::GiveBack => return outcome,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_events_consumed_total", "group" => self.group.clone(), "outcome" => label)
            .increment(1);
        outcome
    }
}

/// The database could not be reached: not the message's fault, not an attempt.
struct Unavailable(String);

/// Why an attempt failed: the handler, or the consumer's own database work around it.
enum Failure {
    Handler(HandlerError),
    Database(sqlx::Error),
}

/// Whether `error` means the database cannot be reached (rather than that this message's
/// work failed): connections, the pool, or SQLite's lock held too long by another writer.
fn unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // SQLITE_BUSY and SQLITE_LOCKED; PostgreSQL's class 08 (connection exception) and
        // 57P (operator intervention: shutdown, crash recovery).
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            matches!(code.as_ref(), "5" | "6" | "57P01" | "57P02" | "57P03")
                || code.starts_with("08")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap_and_stop_at_the_last_attempt() {
        let policy = RetryPolicy {
            max_attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        let waits: Vec<_> = (1..=6).map(|attempt| policy.delay_after(attempt)).collect();
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(waits, [secs(1), secs(2), secs(4), secs(5), secs(5), None]);
        assert_eq!(
            policy.delays(),
            [1, 2, 4, 5].map(Duration::from_secs).to_vec()
        );
        let once = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        assert_eq!(once.delay_after(1), None);
        assert!(once.delays().is_empty());
    }
}
