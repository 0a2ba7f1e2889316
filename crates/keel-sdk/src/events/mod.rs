//! Events and commands: publish/subscribe with CloudEvents envelopes over RabbitMQ, Kafka
//! (the `kafka` feature) or an in-process bus, behind one API ([`Bus`]).
//!
//! - Publishing: [`Bus::stage`] writes an event into the transactional outbox in the
//!   caller's transaction (all it staged in one statement, as it commits); the [`Relay`]
//!   publishes it after commit (at least once, in outbox id order, one relay at a time
//!   however many instances run). Ids are drawn inside the transaction, so two
//!   transactions staging events of one aggregate keep their order only if they are
//!   serialized on it (an update of the aggregate's row does that). [`Bus::publish`]
//!   publishes at once, without the outbox.
//! - Consuming: a [`Consumer`] belongs to a group (usually the service's name); each group
//!   gets every event of the types it handles once, shared among the group's instances.
//!   Each message is handled in a transaction of the consumer's database that also records
//!   the event id in the inbox, so a redelivered message changes nothing. A failed message
//!   is retried with growing delays ([`RetryPolicy`]), then dead-lettered; dead letters
//!   can be listed and replayed ([`Bus::dead_letters`], [`Bus::replay_dead_letters`]).
//! - A command is an event with one consuming group: [`Bus::send`] fails when no group
//!   has ever bound its type, where [`Bus::publish`] lets an event go unheard.

pub mod asyncapi;
pub(crate) mod consumer;
mod envelope;
mod in_process;
#[cfg(feature = "kafka")]
mod kafka;
pub(crate) mod outbox;
mod rabbitmq;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

pub use consumer::{
    Consumer, ConsumerBuilder, ConsumerStats, Handler, HandlerError, Received, ReplyTo, RetryPolicy,
};
pub use envelope::{Envelope, EnvelopeError, Event, MAX_ATTRIBUTE_BYTES, MAX_ENVELOPE_BYTES};
#[cfg(feature = "kafka")]
pub use kafka::KafkaOptions;
pub use outbox::{Relay, RelayOptions};
pub use rabbitmq::RabbitMqOptions;

use crate::data::Tx;
use in_process::InProcess;
#[cfg(feature = "kafka")]
use kafka::Kafka;
use rabbitmq::RabbitMq;

/// Why the bus could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("RabbitMQ: {0}")]
    RabbitMq(#[from] lapin::Error),
    #[cfg(feature = "kafka")]
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[cfg(feature = "kafka")]
    #[error(
        "Kafka namespace {0:?} is not valid: 1 to 40 characters of a-z, A-Z, 0-9, '.', '-' or '_'"
    )]
    Namespace(String),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the broker closed the consumer")]
    ConsumerClosed,
    #[error("the broker refused the message (negative publisher confirm)")]
    Nacked,
    #[error("no consumer group handles {0}: a command needs one")]
    Unroutable(String),
    #[error("the event cannot be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    LockFile(#[from] crate::data::DbError),
    #[error(
        "consumer group name {0:?} is not valid: 1 to 100 characters of a-z, 0-9, '.', '-' or '_'"
    )]
    GroupName(String),
    #[error("{0:?} is not a reply type (keel.saga.<name>.reply.v1)")]
    ReplyType(String),
    #[error("consumer group {0:?} handles no event type")]
    NoHandlers(String),
    #[error("the envelope is {0} bytes; a consumer takes at most {MAX_ENVELOPE_BYTES}")]
    TooLarge(usize),
}

/// A message as a transport carries it: the envelope's bytes and what routes it.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub id: String,
    pub event_type: String,
    /// The aggregate (the envelope's subject): Kafka's record key.
    #[cfg(feature = "kafka")]
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

impl Outgoing {
    fn from_envelope(envelope: &Envelope) -> Self {
        Self {
            id: envelope.id.clone(),
            event_type: envelope.event_type.clone(),
            #[cfg(feature = "kafka")]
            key: envelope.subject.clone(),
            payload: envelope.to_vec(),
        }
    }
}

/// The answer to a command sent with a return address ([`Bus::reply`]): whether it was
/// done, why not, and what the sender may need from it (a reservation's id, say).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
    /// Not refused by the participant but never handled (failed every attempt, or could
    /// not be read): dead-lettered, so it may still be done when its dead letter is
    /// replayed. A saga undoes such a step as it does one that timed out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unhandled: bool,
}

impl Reply {
    /// Done, with `data` for the sender.
    pub fn done(data: impl serde::Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            data: serde_json::to_value(data).unwrap_or_default(),
            unhandled: false,
        }
    }

    /// Refused (out of stock, declined): not worth retrying.
    pub fn refused(reason: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(reason.to_string()),
            data: serde_json::Value::Null,
            unhandled: false,
        }
    }

    /// Not handled, and dead-lettered (its `unhandled` set): the consumer's answer for
    /// its participant.
    pub(crate) fn dead_lettered(reason: impl std::fmt::Display) -> Self {
        Self {
            unhandled: true,
            ..Self::refused(format!("the command was not handled: {reason}"))
        }
    }
}

/// Replies are events whose type the sender chooses ([`ReplyTo`]); this one only serves
/// to build their envelope.
impl Event for Reply {
    const TYPE: &'static str = "keel.reply.v1";
    fn key(&self) -> String {
        String::new()
    }
}

/// A message that failed every attempt (or could not be read), kept for inspection and
/// replay.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// The envelope's id (empty when the message was not an envelope).
    pub id: String,
    pub event_type: String,
    pub attempts: u32,
    /// Why the last attempt failed.
    pub error: String,
    /// RFC 3339.
    pub failed_at: String,
    /// The message as it arrived (lossy UTF-8).
    pub payload: String,
}

impl DeadLetter {
    fn new(id: &str, event_type: &str, attempts: u32, error: &str, payload: &[u8]) -> Self {
        Self {
            id: id.to_owned(),
            event_type: event_type.to_owned(),
            attempts,
            error: error.to_owned(),
            failed_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            payload: String::from_utf8_lossy(payload).into_owned(),
        }
    }
}

enum Transport {
    InProcess(InProcess),
    RabbitMq(RabbitMq),
    #[cfg(feature = "kafka")]
    Kafka(Kafka),
}

struct BusInner {
    service: String,
    transport: Transport,
}

/// The event bus of one service. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus inside this process (the embedded profile): every [`Bus`] cloned from it, or
    /// made with [`Bus::for_service`], shares its queues. Messages live in memory; the
    /// outbox still keeps staged events across a crash until they are handed over. A
    /// group's queue exists from its consumer's `start()`: start consumers before relays,
    /// or events relayed first reach nobody.
    pub fn in_process(service: &str) -> Self {
        Self::with_transport(service, Transport::InProcess(InProcess::default()))
    }

    /// A bus over RabbitMQ; connects once to check the broker and declare the exchange.
    pub async fn rabbitmq(service: &str, options: RabbitMqOptions) -> Result<Self, BusError> {
        let transport = RabbitMq::connect(options).await?;
        Ok(Self::with_transport(
            service,
            Transport::RabbitMq(transport),
        ))
    }

    /// A bus over Kafka; connects once to check that the brokers answer.
    #[cfg(feature = "kafka")]
    pub async fn kafka(service: &str, options: KafkaOptions) -> Result<Self, BusError> {
        let transport = Kafka::connect(options).await?;
        Ok(Self::with_transport(service, Transport::Kafka(transport)))
    }

    fn with_transport(service: &str, transport: Transport) -> Self {
        Self {
            inner: Arc::new(BusInner {
                service: service.to_owned(),
                transport,
            }),
        }
    }

    /// The same transport (and, in process, the same queues) for another service: how
    /// `keel up` gives each service of one process its own source name.
    pub fn for_service(&self, service: &str) -> Self {
        let transport = match &self.inner.transport {
            Transport::InProcess(bus) => Transport::InProcess(bus.clone()),
            Transport::RabbitMq(bus) => Transport::RabbitMq(bus.clone()),
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => Transport::Kafka(bus.clone()),
        };
        Self::with_transport(service, transport)
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The exchange events are published to (RabbitMQ), or the namespace of the topics
    /// (Kafka); empty in process.
    pub fn exchange(&self) -> &str {
        match &self.inner.transport {
            Transport::InProcess(_) => "",
            Transport::RabbitMq(bus) => bus.exchange(),
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => bus.namespace(),
        }
    }

    /// Publishes `event` now, outside any transaction; returns once the broker has it.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), BusError> {
        let envelope = Envelope::new(&self.inner.service, event)?;
        self.publish_batch(&[Outgoing::from_envelope(&envelope)], false)
            .await
    }

    /// Publishes an envelope as it is (same id: consumers that handled it ignore it).
    pub async fn publish_envelope(&self, envelope: &Envelope) -> Result<(), BusError> {
        self.publish_batch(&[Outgoing::from_envelope(envelope)], false)
            .await
    }

    /// Sends the command `command` now: like [`Bus::publish`], but fails with
    /// [`BusError::Unroutable`] when no consumer group has bound its type.
    pub async fn send<E: Event>(&self, command: &E) -> Result<(), BusError> {
        let envelope = Envelope::new(&self.inner.service, command)?;
        self.publish_batch(&[Outgoing::from_envelope(&envelope)], true)
            .await
    }

    /// Writes `event` into the outbox within `tx` (with everything else `tx` staged, as it
    /// commits): it is published if and only if `tx` commits, by whichever instance's
    /// [`Relay`] runs.
    pub async fn stage<E: Event>(&self, tx: &mut Tx, event: &E) -> Result<(), BusError> {
        let envelope = Envelope::new(&self.inner.service, event)?;
        self.stage_envelope(tx, &envelope).await
    }

    /// Stages the command `command` with a return address: its handler's
    /// [`Bus::reply`] comes back as an event of type `reply_to.event_type` carrying
    /// `reply_to.correlation`.
    pub async fn stage_command<E: Event>(
        &self,
        tx: &mut Tx,
        command: &E,
        reply_to: &ReplyTo,
    ) -> Result<(), BusError> {
        let mut envelope = Envelope::new(&self.inner.service, command)?;
        envelope.correlationid = Some(reply_to.correlation.clone());
        envelope.replyto = Some(reply_to.event_type.clone());
        self.stage_envelope(tx, &envelope).await
    }

    /// Stages the reply to a command received with a return address (`received.reply`);
    /// nothing when the sender asked for none.
    pub async fn reply<E>(
        &self,
        tx: &mut Tx,
        received: &Received<E>,
        reply: &Reply,
    ) -> Result<(), BusError> {
        let Some(reply_to) = &received.reply else {
            return Ok(());
        };
        let envelope = self.reply_envelope(reply_to, reply)?;
        self.stage_envelope(tx, &envelope).await
    }

    /// The envelope of `reply` to a command with return address `reply_to`.
    pub(crate) fn reply_envelope(
        &self,
        reply_to: &ReplyTo,
        reply: &Reply,
    ) -> Result<Envelope, BusError> {
        // Whoever sends a command chooses `replyto`: only reply types may be named, never
        // an event of this service's own.
        let is_reply = reply_to
            .event_type
            .strip_prefix(crate::saga::REPLY_PREFIX)
            .and_then(|rest| rest.strip_suffix(crate::saga::REPLY_SUFFIX))
            .is_some_and(|name| !name.is_empty() && !name.contains('.'));
        if !is_reply {
            return Err(BusError::ReplyType(reply_to.event_type.clone()));
        }
        let mut envelope = Envelope::new(&self.inner.service, reply)?;
        envelope.event_type.clone_from(&reply_to.event_type);
        envelope.subject = Some(reply_to.correlation.clone());
        envelope.correlationid = Some(reply_to.correlation.clone());
        Ok(envelope)
    }

    pub(crate) async fn stage_envelope(
        &self,
        tx: &mut Tx,
        envelope: &Envelope,
    ) -> Result<(), BusError> {
        // Refused now, rather than stuck at the head of the outbox or dead-lettered unread.
        let payload = envelope.to_vec();
        if payload.len() > MAX_ENVELOPE_BYTES {
            return Err(BusError::TooLarge(payload.len()));
        }
        tx.stage(outbox::Staged::new(envelope, payload));
        Ok(())
    }

    /// The relay that publishes what [`Bus::stage`] wrote into `db`'s outbox.
    pub fn relay(&self, db: &crate::data::Database) -> Relay {
        Relay::new(self.clone(), db.clone())
    }

    /// A consumer in `group` handling messages in transactions of `db`.
    pub fn consumer(&self, group: &str, db: &crate::data::Database) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone(), group, db.clone())
    }

    /// The messages dead-lettered in `group`, oldest first (at most `limit`).
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        check_group(group)?;
        match &self.inner.transport {
            Transport::InProcess(bus) => Ok(bus.dead_letters(group, limit)),
            Transport::RabbitMq(bus) => bus.dead_letters(group, limit).await,
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => bus.dead_letters(group, limit).await,
        }
    }

    /// Puts `group`'s dead letters (only the one with envelope id `id`, when given) back
    /// on its queue as first attempts; returns how many.
    pub async fn replay_dead_letters(
        &self,
        group: &str,
        id: Option<&str>,
    ) -> Result<usize, BusError> {
        check_group(group)?;
        match &self.inner.transport {
            Transport::InProcess(bus) => Ok(bus.replay(group, id)),
            Transport::RabbitMq(bus) => bus.replay(group, id).await,
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => bus.replay(group, id).await,
        }
    }

    /// Publishes `batch` in order; returns once the broker has confirmed all of it.
    async fn publish_batch(&self, batch: &[Outgoing], mandatory: bool) -> Result<(), BusError> {
        if let Some(message) = batch
            .iter()
            .find(|message| message.payload.len() > MAX_ENVELOPE_BYTES)
        {
            return Err(BusError::TooLarge(message.payload.len()));
        }
        match &self.inner.transport {
            Transport::InProcess(bus) => bus.publish(batch, mandatory)?,
            Transport::RabbitMq(bus) => bus.publish(batch, mandatory).await?,
            #[cfg(feature = "kafka")]
            Transport::Kafka(bus) => bus.publish(batch, mandatory).await?,
        }
        for message in batch {
            metrics::counter!("keel_events_published_total", "type" => message.event_type.clone())
                .increment(1);
        }
        Ok(())
    }
}

/// Group names become queue and topic names: keep them to a safe alphabet.
pub(crate) fn check_group(group: &str) -> Result<(), BusError> {
    let valid = !group.is_empty()
        && group.len() <= 100
        && group
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(BusError::GroupName(group.chars().take(100).collect()))
    }
}

/// Runs a consumer's `session` until it ends cleanly or `shutdown` comes; after a failure,
/// waits ([`reconnect_delay`] of the failures in a row, which a session resets once it is
/// connected) and starts another.
pub(crate) async fn keep_consuming<Fut>(
    group: &str,
    shutdown: &keel_runtime::Shutdown,
    failures: &AtomicU32,
    mut session: impl FnMut() -> Fut,
) where
    Fut: std::future::Future<Output = Result<(), BusError>>,
{
    while !shutdown.is_triggered() {
        let Err(error) = session().await else {
            return;
        };
        let failed = failures.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(%error, group, failures = failed, "consumer lost the broker; starting again");
        tokio::select! {
            () = tokio::time::sleep(reconnect_delay(failed)) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// How long to wait before reconnecting after the `failures`-th failure in a row: from
/// 100 ms doubling to 5 s, with jitter so that instances do not reconnect in step.
pub(crate) fn reconnect_delay(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    Duration::from_millis(base / 2 + fastrand::u64(..=base / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_checked() {
        for good in ["inventory", "orders.saga", "a-b_c.9"] {
            assert!(check_group(good).is_ok(), "{good}");
        }
        for bad in ["", "Inventory", "a b", "x/y", &"a".repeat(101)] {
            assert!(check_group(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reconnect_delays_grow_and_stay_bounded() {
        for failures in 0..20 {
            let delay = reconnect_delay(failures);
            assert!(delay <= Duration::from_secs(5), "{delay:?}");
        }
        assert!(reconnect_delay(0) <= Duration::from_millis(100));
        assert!(reconnect_delay(10) >= Duration::from_millis(2_500));
    }
}
