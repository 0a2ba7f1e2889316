//! The RabbitMQ transport (lapin).
//!
//! Topology, per bus and per consumer group `G`:
//! - one durable topic exchange (`keel.events` by default); a message's routing key is its
//!   event type;
//! - `E.G` (`E` the exchange: systems sharing a broker never share queues), a durable
//!   quorum queue bound to each type the group handles. After
//!   [`DELIVERY_LIMIT`] deliveries without an acknowledgement (consumers crashing on the
//!   message) the broker moves it to the dead letters itself;
//! - `E.G.retry.<ms>`, one durable queue per retry delay, whose messages expire after
//!   that delay back into `E.G` (classic queues: one TTL per queue keeps expiry in
//!   arrival order);
//! - `E.G.dead`, the dead letters: a durable classic queue, which can be read and put
//!   back (to list it) without a delivery limit.
//!
//! Publishing waits for publisher confirms; consumers acknowledge manually, after the
//! handler's transaction commits, and a failed message is acknowledged only once its retry
//! (or dead letter) is confirmed, so no failure path loses it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, StreamExt};
use keel_runtime::Secret;
use keel_runtime::Shutdown;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde::{Deserialize, Serialize};

use super::consumer::{ConsumerCore, Outcome};
use super::{BusError, DeadLetter, Outgoing, keep_consuming};

/// Deliveries without an acknowledgement after which the broker dead-letters a message.
/// Generous, since a message returned unhandled when a consumer's channel closes counts
/// as a delivery too (hence also the small default prefetch).
const DELIVERY_LIMIT: i64 = 20;
/// The longest error text kept with a dead letter.
const MAX_ERROR_BYTES: usize = 1024;

const ATTEMPT: &str = "x-keel-attempt";
const ERROR: &str = "x-keel-error";
const FAILED_AT: &str = "x-keel-failed-at";
const EVENT_TYPE: &str = "x-keel-event-type";

/// What a connection is for. A process (each tokio runtime of it) shares one connection
/// per broker for each: lapin runs a thread per connection, and a connection per publisher
/// and per consumer (eight for the shop's four services) cost more in thread switches than
/// their channels do on one. Everything published (the relay's batches, and consumers'
/// retries and dead letters) goes through the publishing connection, because the broker
/// blocks a connection that publishes under a resource alarm, and that must not stop
/// consumers' acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Use {
    Publish,
    Consume,
}

impl Use {
    fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Consume => "consume",
        }
    }
}

/// A shared connection's slot: the connection while anyone holds a channel of it (each
/// holder keeps an `Arc`; the last one gone closes it). Locked while connecting, so that
/// channels opened at once wait for one connection rather than make one each.
type Slot = Arc<tokio::sync::Mutex<Weak<Connection>>>;

/// This process's shared connections, by broker URL, use and runtime: lapin's work for a
/// connection runs on the runtime that connected it, and stops with it.
static SHARED: LazyLock<Mutex<HashMap<SlotKey, Slot>>> = LazyLock::new(Mutex::default);

type SlotKey = (String, Use, Option<tokio::runtime::Id>);

/// Where and how to reach RabbitMQ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitMqOptions {
    /// `amqp://user:password@host:5672/%2f` (or `amqps://`); redacted when printed.
    pub url: Secret<String>,
    /// The topic exchange events are published to.
    pub exchange: String,
    /// Messages a consumer may hold unacknowledged (at least its concurrency: one at a time
    /// by default); every held message goes back (and counts as delivered) when its
    /// channel closes.
    pub prefetch: u16,
    /// Deletes a group's queues once unused this long (RabbitMQ's `x-expires`); none by
    /// default. Tests set it so that their queues do not pile up on a shared broker.
    #[serde(with = "humantime_serde")]
    pub queue_expiry: Option<Duration>,
    /// Declares the exchange auto-delete: the broker removes it once its last binding
    /// goes (with `queue_expiry`, when every group's queues have expired). Tests use it on
    /// the shared broker; off by default.
    pub auto_delete_exchange: bool,
    /// Only checks that the exchange exists, never declares it: for tools that look at a
    /// running system (`keel events`), whose exchange is the services' to define.
    pub passive_exchange: bool,
    /// How long connecting, or a publish and its confirm, may take (a broker under a
    /// resource alarm blocks publishers); then the channel is dropped and the caller gets
    /// [`BusError::Timeout`].
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RabbitMqOptions {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            exchange: "keel.events".to_owned(),
            prefetch: 2,
            queue_expiry: None,
            auto_delete_exchange: false,
            passive_exchange: false,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RabbitMq {
    inner: Arc<Inner>,
}

struct Inner {
    options: RabbitMqOptions,
    /// One confirming channel for publishing; replaced after any error.
    publisher: tokio::sync::Mutex<Option<(Arc<Connection>, Channel)>>,
}

impl RabbitMq {
    pub async fn connect(options: RabbitMqOptions) -> Result<Self, BusError> {
        let bus = Self {
            inner: Arc::new(Inner {
                options,
                publisher: tokio::sync::Mutex::new(None),
            }),
        };
        let opened = bus.open(Use::Publish).await?;
        *bus.inner.publisher.lock().await = Some(opened);
        Ok(bus)
    }

    pub fn exchange(&self) -> &str {
        &self.inner.options.exchange
    }

    /// `work`, or [`BusError::Timeout`] after the configured timeout.
    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, BusError>>,
    ) -> Result<T, BusError> {
        tokio::time::timeout(self.inner.options.timeout, work)
            .await
            .map_err(|_| BusError::Timeout(self.inner.options.timeout))?
    }

    /// A new confirming channel, with the exchange declared, on this process's connection
    /// for `purpose` (connected first when there is none, or it was lost). Hold the
    /// connection while using the channel: the channel alone keeps it open, but only a
    /// holder of the `Arc` keeps it in its slot for others to share. Close the channel, not
    /// the connection, when done.
    async fn open(&self, purpose: Use) -> Result<(Arc<Connection>, Channel), BusError> {
        self.within(self.open_now(purpose)).await
    }

    async fn open_now(&self, purpose: Use) -> Result<(Arc<Connection>, Channel), BusError> {
        let url = self.inner.options.url.expose();
        let slot = {
            let mut shared = SHARED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The slots of connections gone that nobody is opening again go, so that brokers
            // a process no longer uses (tests' fault proxies) leave nothing behind.
            shared.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.try_lock().map_or(true, |held| held.strong_count() > 0)
            });
            let runtime = tokio::runtime::Handle::try_current()
                .ok()
                .map(|handle| handle.id());
            Arc::clone(shared.entry((url.clone(), purpose, runtime)).or_default())
        };
        let mut held = slot.lock().await;
        let connection = match held.upgrade() {
            Some(connection) if connection.status().connected() => connection,
            _ => {
                let properties = ConnectionProperties::default().with_connection_name(
                    format!("keel-{}-{}", purpose.as_str(), std::process::id()).into(),
                );
                let connection = Arc::new(Connection::connect(url, properties).await?);
                *held = Arc::downgrade(&connection);
                connection
            }
        };
        drop(held);
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .exchange_declare(
                self.inner.options.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: self.inner.options.auto_delete_exchange,
                    passive: self.inner.options.passive_exchange,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((connection, channel))
    }

    /// Publishes `batch` in order on the shared channel and waits for every confirm.
    pub async fn publish(&self, batch: &[Outgoing], mandatory: bool) -> Result<(), BusError> {
        self.on_publisher(|channel| async move {
            publish_on(&channel, &self.inner.options.exchange, batch, mandatory).await
        })
        .await
    }

    /// Copies a delivery to `queue` (a retry, a dead letter, a replay) on the publishing
    /// channel ([`Use`]) and waits for the broker's confirm.
    async fn copy_to(
        &self,
        queue: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BusError> {
        self.on_publisher(
            |channel| async move { to_queue(&channel, queue, payload, properties).await },
        )
        .await
    }

    /// `work` on this bus's publishing channel (opened first when there is none), within
    /// the timeout; the channel is dropped after a broker error or a timeout, and the next
    /// publish opens another.
    async fn on_publisher<F, W>(&self, work: W) -> Result<(), BusError>
    where
        W: FnOnce(Channel) -> F,
        F: Future<Output = Result<(), BusError>>,
    {
        let mut publisher = self.inner.publisher.lock().await;
        let channel = match publisher.as_ref() {
            Some((_, channel)) => channel.clone(),
            None => {
                let opened = self.open(Use::Publish).await?;
                let channel = opened.1.clone();
                *publisher = Some(opened);
                channel
            }
        };
        let result = self.within(work(channel)).await;
        if matches!(result, Err(BusError::RabbitMq(_) | BusError::Timeout(_))) {
            // The channel is gone or broken: open a new one next time.
            *publisher = None;
        }
        result
    }

    /// Declares the group's queues and binds its event types.
    pub async fn declare_group(&self, core: &ConsumerCore) -> Result<(), BusError> {
        let (_connection, channel) = self.open(Use::Consume).await?;
        let result = self.declare_on(&channel, core).await;
        let _ = channel.close(200, "declared".into()).await;
        result
    }

    async fn declare_on(&self, channel: &Channel, core: &ConsumerCore) -> Result<(), BusError> {
        let names = Names::new(&self.inner.options.exchange, &core.group);
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut main = self.queue_arguments();
        main.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        main.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        main.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        main.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.dead.as_str().into()),
        );
        channel
            .queue_declare(names.main.as_str().into(), durable, main)
            .await?;
        channel
            .queue_declare(
                names.dead.as_str().into(),
                durable,
                self.classic_arguments(),
            )
            .await?;
        for delay in core.retry.delays() {
            let mut retry = self.classic_arguments();
            retry.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(millis(delay)),
            );
            retry.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            retry.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(names.main.as_str().into()),
            );
            channel
                .queue_declare(names.retry(delay).into(), durable, retry)
                .await?;
        }
        for event_type in core.event_types() {
            channel
                .queue_bind(
                    names.main.as_str().into(),
                    self.inner.options.exchange.as_str().into(),
                    event_type.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Classic queues whatever the broker's default type: reading dead letters without
    /// acknowledging them must not count as deliveries.
    fn classic_arguments(&self) -> FieldTable {
        let mut arguments = self.queue_arguments();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        arguments
    }

    /// Every queue of a group expires unused after `queue_expiry`; a running consumer
    /// declares its queues again at a third of that, which counts as use (its retry and
    /// dead-letter queues are never consumed from).
    fn queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if let Some(expiry) = self.inner.options.queue_expiry {
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis(expiry)));
        }
        arguments
    }

    /// Consumes the group's queue until `shutdown`, with up to `concurrency` handlers at
    /// once on one channel (of the process's consuming connection, [`Use`]), each taking up
    /// to `batch` waiting deliveries together; reconnects after failures.
    pub async fn consume(
        &self,
        core: &ConsumerCore,
        shutdown: Shutdown,
        concurrency: usize,
        batch: usize,
    ) {
        let failures = AtomicU32::new(0);
        keep_consuming(&core.group, &shutdown, &failures, || {
            self.consume_once(core, &shutdown, &failures, concurrency, batch)
        })
        .await;
    }

    async fn consume_once(
        &self,
        core: &ConsumerCore,
        shutdown: &Shutdown,
        failures: &AtomicU32,
        concurrency: usize,
        batch: usize,
    ) -> Result<(), BusError> {
        let (_connection, channel) = self.open(Use::Consume).await?;
        self.declare_on(&channel, core).await?;
        // Several messages in hand at once take as many unacknowledged deliveries, on one
        // channel.
        let (concurrency, batch) = (concurrency.max(1), batch.max(1));
        let prefetch = self
            .inner
            .options
            .prefetch
            .max(u16::try_from(concurrency * batch).unwrap_or(u16::MAX));
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let names = Names::new(&self.inner.options.exchange, &core.group);
        let mut deliveries = channel
            .basic_consume(
                names.main.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        failures.store(0, Ordering::Relaxed);
        let redeclare_every = self
            .inner
            .options
            .queue_expiry
            .map_or(Duration::from_secs(3600), |expiry| expiry / 3);
        let mut redeclare = tokio::time::interval_at(
            tokio::time::Instant::now() + redeclare_every,
            redeclare_every,
        );
        let mut in_hand = futures_util::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(settled) = in_hand.next(), if !in_hand.is_empty() => {
                    if !settled? {
                        break;
                    }
                }
                delivery = deliveries.next(), if in_hand.len() < concurrency => {
                    let mut taken = vec![match delivery {
                        Some(delivery) => delivery?,
                        None => return Err(BusError::ConsumerClosed),
                    }];
                    // What has arrived meanwhile goes along, without waiting for more.
                    while taken.len() < batch {
                        match deliveries.next().now_or_never() {
                            Some(Some(delivery)) => taken.push(delivery?),
                            Some(None) => return Err(BusError::ConsumerClosed),
                            None => break,
                        }
                    }
                    in_hand.push(self.settle(&names, core, taken, shutdown));
                }
                _ = redeclare.tick() => self.declare_on(&channel, core).await?,
                () = shutdown.wait() => break,
            }
        }
        // The messages in hand are finished (or given back) before the channel closes.
        while let Some(settled) = in_hand.next().await {
            settled?;
        }
        let _ = channel.close(200, "shutting down".into()).await;
        Ok(())
    }

    /// Handles deliveries taken together, then retries, dead-letters or acknowledges each;
    /// false when any was given back (the service is stopping: unacknowledged, the broker
    /// hands it to another consumer once this channel closes).
    async fn settle(
        &self,
        names: &Names,
        core: &ConsumerCore,
        taken: Vec<lapin::message::Delivery>,
        shutdown: &Shutdown,
    ) -> Result<bool, BusError> {
        let attempts: Vec<u32> = taken
            .iter()
            .map(|delivery| {
                header_u32(&delivery.properties, ATTEMPT)
                    .unwrap_or(1)
                    .max(1)
            })
            .collect();
        let payloads: Vec<(&[u8], u32)> = taken
            .iter()
            .zip(&attempts)
            .map(|(delivery, attempt)| (delivery.data.as_slice(), *attempt))
            .collect();
        let outcomes = core.process_all(&payloads, shutdown).await;
        // Together: lapin writes each acknowledgement on its connection's thread and tells
        // the waiting task when it has, so one at a time costs two thread switches each.
        let concluded =
            futures_util::future::join_all(taken.iter().zip(attempts).zip(outcomes).map(
                |((delivery, attempt), outcome)| self.conclude(names, delivery, attempt, outcome),
            ))
            .await;
        let mut kept = true;
        for concluded in concluded {
            kept &= concluded?;
        }
        Ok(kept)
    }

    /// Acts on a delivery's outcome: acknowledged once handled, or once its retry or dead
    /// letter is confirmed; false when it is given back.
    async fn conclude(
        &self,
        names: &Names,
        delivery: &lapin::message::Delivery,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<bool, BusError> {
        match outcome {
            Outcome::Done | Outcome::Duplicate => {}
            Outcome::GiveBack => return Ok(false),
            Outcome::Retry { delay, .. } => {
                let properties = delivery.properties.clone().with_headers(with_header(
                    &delivery.properties,
                    ATTEMPT,
                    AMQPValue::LongUInt(attempt + 1),
                ));
                self.copy_to(&names.retry(delay), &delivery.data, properties)
                    .await?;
            }
            Outcome::Dead {
                id,
                event_type,
                error,
            } => {
                let mut headers =
                    with_header(&delivery.properties, ATTEMPT, AMQPValue::LongUInt(attempt));
                headers.insert(ERROR.into(), AMQPValue::LongString(truncate(&error)));
                headers.insert(
                    FAILED_AT.into(),
                    AMQPValue::LongString(
                        humantime::format_rfc3339_millis(SystemTime::now())
                            .to_string()
                            .into(),
                    ),
                );
                headers.insert(EVENT_TYPE.into(), AMQPValue::LongString(event_type.into()));
                let properties = delivery
                    .properties
                    .clone()
                    .with_message_id(ShortString::from(id))
                    .with_headers(headers);
                self.copy_to(&names.dead, &delivery.data, properties)
                    .await?;
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(true)
    }

    /// Reads up to `limit` dead letters without taking them: they go back to the queue
    /// when the channel closes unacknowledged.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let names = Names::new(&self.inner.options.exchange, group);
        let (_connection, channel) = self.open(Use::Consume).await?;
        let mut letters = Vec::new();
        while letters.len() < limit {
            let Some(message) = channel
                .basic_get(names.dead.as_str().into(), BasicGetOptions::default())
                .await?
            else {
                break;
            };
            letters.push(dead_letter(&message.delivery));
        }
        let _ = channel.close(200, "listed".into()).await;
        Ok(letters)
    }

    /// Moves dead letters (those with envelope id `id`, or all) back to the group's queue
    /// as first attempts, each acknowledged only once its copy is confirmed.
    pub async fn replay(&self, group: &str, id: Option<&str>) -> Result<usize, BusError> {
        let names = Names::new(&self.inner.options.exchange, group);
        let (_connection, channel) = self.open(Use::Consume).await?;
        let mut replayed = 0;
        // Each message is looked at once: skipped ones stay unacknowledged (and so out of
        // the queue's ready list) until the channel closes. Only what was there at the
        // start: a replayed message that fails again comes back and must wait for the
        // next replay, or this would never end.
        let mut left: Option<u32> = None;
        while left != Some(0) {
            let Some(message) = channel
                .basic_get(names.dead.as_str().into(), BasicGetOptions::default())
                .await?
            else {
                break;
            };
            let remaining = left.unwrap_or(message.message_count + 1) - 1;
            left = Some(remaining);
            let delivery = message.delivery;
            if id.is_some_and(|id| dead_letter(&delivery).id != id) {
                continue;
            }
            let properties = delivery.properties.clone().with_headers(with_header(
                &delivery.properties,
                ATTEMPT,
                AMQPValue::LongUInt(1),
            ));
            self.copy_to(&names.main, &delivery.data, properties)
                .await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            replayed += 1;
        }
        let _ = channel.close(200, "replayed".into()).await;
        Ok(replayed)
    }
}

/// The queue names of a consumer group.
struct Names {
    main: String,
    dead: String,
}

impl Names {
    /// Named after the exchange too: systems (or tests) sharing a broker, each with its
    /// own exchange, never share a group's queues.
    fn new(exchange: &str, group: &str) -> Self {
        Self {
            main: format!("{exchange}.{group}"),
            dead: format!("{exchange}.{group}.dead"),
        }
    }

    fn retry(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.main, millis(delay))
    }
}

async fn publish_on(
    channel: &Channel,
    exchange: &str,
    batch: &[Outgoing],
    mandatory: bool,
) -> Result<(), BusError> {
    let sends = batch.iter().map(|message| {
        let properties = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_delivery_mode(2)
            .with_message_id(message.id.as_str().into());
        channel.basic_publish(
            exchange.into(),
            message.event_type.as_str().into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            &message.payload,
            properties,
        )
    });
    let confirms = in_order(sends.collect()).await;
    for (pending, message) in confirms.into_iter().zip(batch) {
        match confirm(pending?.await?, mandatory) {
            Err(BusError::Unroutable(_)) => {
                return Err(BusError::Unroutable(message.event_type.clone()));
            }
            other => other?,
        }
    }
    Ok(())
}

/// Runs `futures` together and gives their outputs in their order, polling them in that
/// order every time. A publish draws its confirm's number and queues its frames on its
/// first poll, then waits for lapin's connection thread to write them: awaited one after
/// the other, every message of a batch cost that thread a wake-up and the task another;
/// together, a batch leaves in one write, still in order.
async fn in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Publishes straight to `queue` (through the default exchange) and waits for the confirm;
/// an error when the queue does not exist.
async fn to_queue(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<(), BusError> {
    // Mandatory: a queue that is gone returns the message instead of confirming its loss,
    // and the caller keeps the original unacknowledged. Persistent, whatever it arrived as.
    let pending = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            payload,
            properties.with_delivery_mode(2),
        )
        .await?;
    confirm(pending.await?, true)
}

/// A publisher confirm as a result: a nack, or a mandatory message returned unroutable,
/// is an error.
fn confirm(confirmation: Confirmation, mandatory: bool) -> Result<(), BusError> {
    match confirmation {
        Confirmation::Ack(Some(_)) if mandatory => Err(BusError::Unroutable(String::new())),
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(BusError::Nacked),
    }
}

fn dead_letter(delivery: &lapin::message::Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let text = |name| header_text(properties, name);
    let envelope = super::Envelope::from_slice(&delivery.data).ok();
    let id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .filter(|id| !id.is_empty())
        .or_else(|| envelope.as_ref().map(|envelope| envelope.id.clone()))
        .unwrap_or_default();
    let event_type = text(EVENT_TYPE)
        .filter(|event_type| !event_type.is_empty())
        .or_else(|| envelope.map(|envelope| envelope.event_type))
        .unwrap_or_default();
    // Dead-lettered by the broker (delivery limit) rather than by a consumer: no headers
    // of ours, but the broker's own `x-death`.
    let error = text(ERROR).unwrap_or_else(|| {
        format!(
            "delivered {DELIVERY_LIMIT} times without an acknowledgement (each consumer died or lost its connection holding it)"
        )
    });
    let mut letter = DeadLetter::new(
        &id,
        &event_type,
        header_u32(properties, ATTEMPT).unwrap_or(1),
        &error,
        &delivery.data,
    );
    if let Some(failed_at) = text(FAILED_AT) {
        letter.failed_at = failed_at;
    }
    letter
}

fn headers(properties: &BasicProperties) -> Option<&FieldTable> {
    properties.headers().as_ref()
}

fn header_u32(properties: &BasicProperties, name: &str) -> Option<u32> {
    match headers(properties)?.inner().get(name)? {
        AMQPValue::LongUInt(value) => Some(*value),
        AMQPValue::LongInt(value) => u32::try_from(*value).ok(),
        AMQPValue::LongLongInt(value) => u32::try_from(*value).ok(),
        _ => None,
    }
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match headers(properties)?.inner().get(name)? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

/// The message's headers with `name` set to `value`.
fn with_header(properties: &BasicProperties, name: &str, value: AMQPValue) -> FieldTable {
    let mut headers = headers(properties).cloned().unwrap_or_default();
    headers.insert(name.into(), value);
    headers
}

fn truncate(text: &str) -> LongString {
    let mut end = text.len().min(MAX_ERROR_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].into()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_order_starts_each_in_turn_and_answers_in_their_order_whenever_they_finish() {
        let started = std::sync::Mutex::new(Vec::new());
        let futures: Vec<_> = (0..5u64)
            .map(|n| {
                let started = &started;
                async move {
                    started.lock().unwrap().push(n);
                    // The first finishes last.
                    tokio::time::sleep(Duration::from_millis(10 * (5 - n))).await;
                    n
                }
            })
            .collect();
        assert_eq!(in_order(futures).await, [0, 1, 2, 3, 4]);
        assert_eq!(*started.lock().unwrap(), [0, 1, 2, 3, 4]);
    }
}
