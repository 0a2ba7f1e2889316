//! The Kafka transport (rdkafka over librdkafka; the `kafka` feature).
//!
//! Topology, per bus (namespace `N`, `keel.events` by default) and per consumer group `G`:
//! - a topic per event type, `N.<type>` (characters Kafka does not allow in a topic name
//!   become `_`), partitioned by the envelope's subject, so that one aggregate's events stay
//!   in one partition and in order. Topics are created by the consumers that handle them
//!   (with [`KafkaOptions::partitions`]): a type without a topic has no consumer group, and
//!   a command sent to it is [`BusError::Unroutable`];
//! - the consumer group `N.G`. A group starts at the end of each topic the first time it is
//!   declared (what is published from then on reaches it, as on RabbitMQ), and from its
//!   committed offsets afterwards;
//! - `N.__group.G.replay`: dead letters put back by a replay, read by `G` alone;
//! - `N.__group.G.dead`: the dead letters, one partition in order of failure, with markers
//!   of letters replayed one by one; everything before the committed offset of the group
//!   `N.G.dead-letters` (the cursor) was replayed.
//!
//! Messages are CloudEvents in structured mode (the Kafka protocol binding): the JSON
//! envelope is the record's value, `content-type: application/cloudevents+json;
//! charset=UTF-8` its header, and the subject its key; trace context travels in the
//! envelope (`traceparent`, `tracestate`).
//!
//! The producer is idempotent (`enable.idempotence`: acks from all in-sync replicas, no
//! duplicates or reordering from its own retries) and every publish waits for its
//! delivery reports. A consumer stores a message's offset only after the handler's
//! transaction commits (or its dead letter is delivered) and commits stored offsets every
//! second and when it stops: at least once, with the inbox absorbing redeliveries. A failed
//! message is retried in place after its delay (its partition waits, so a key's order
//! holds, as Spring Kafka's default error handler does), then dead-lettered.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use keel_runtime::{Secret, Shutdown};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::consumer::{ConsumerCore, Outcome};
use super::{BusError, DeadLetter, Outgoing, keep_consuming, reconnect_delay};

const CONTENT_TYPE: &str = "content-type";
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json; charset=UTF-8";
const ATTEMPT: &str = "x-keel-attempt";
const ERROR: &str = "x-keel-error";
const FAILED_AT: &str = "x-keel-failed-at";
const EVENT_TYPE: &str = "x-keel-event-type";
const ID: &str = "x-keel-id";
/// On a record of the dead-letter topic: the letters with this id before the offset in
/// [`REPLAYED_BEFORE`] were replayed.
const REPLAYED: &str = "x-keel-replayed";
const REPLAYED_BEFORE: &str = "x-keel-replayed-before";
/// The longest error text kept with a dead letter.
const MAX_ERROR_BYTES: usize = 1024;
/// The largest record the bus produces, and its topics accept: the largest envelope a
/// consumer takes with a dead letter's headers (Kafka's default is 1,000,000 bytes, less
/// than an envelope may be).
const MAX_RECORD_BYTES: usize = super::MAX_ENVELOPE_BYTES + 64 * 1024;
/// The longest namespace: with the longest event type (200 bytes) it stays within Kafka's
/// 249-character topic names.
const MAX_NAMESPACE: usize = 40;

/// Where and how to reach Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaOptions {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Prefix of every topic and consumer group of the bus: systems (or tests) sharing a
    /// cluster with different namespaces share nothing.
    pub namespace: String,
    /// Partitions of the topics the bus creates: the most instances of one group that get
    /// work at once.
    pub partitions: i32,
    /// Replicas of the topics the bus creates; -1 takes the broker's default.
    pub replication_factor: i32,
    /// How long connecting, creating topics, or a publish and its delivery reports may
    /// take; then the caller gets [`BusError::Timeout`] (or librdkafka's own error).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a consumer's fetch may wait at the broker for records (librdkafka's
    /// `fetch.wait.max.ms`). Kafka answers a fetch as soon as a record arrives, so there
    /// it only sets how often an idle consumer asks; a broker that waits it out (tansu
    /// does) adds up to this much to every message's latency.
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// More librdkafka properties for every client, e.g. `"security.protocol" = "ssl"`,
    /// `"ssl.ca.location"`, or SASL's; redacted when printed.
    pub properties: BTreeMap<String, Secret<String>>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            namespace: "keel.events".to_owned(),
            partitions: 6,
            replication_factor: -1,
            timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(100),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Kafka {
    inner: Arc<Inner>,
}

struct Inner {
    options: KafkaOptions,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics seen to exist (topics are never deleted by the bus).
    topics: Mutex<HashSet<String>>,
}

impl Kafka {
    /// Checks the namespace, makes the producer and the admin client, and waits for the
    /// cluster's id (the brokers answer).
    pub async fn connect(options: KafkaOptions) -> Result<Self, BusError> {
        let valid = !options.namespace.is_empty()
            && options.namespace.len() <= MAX_NAMESPACE
            && options.namespace.bytes().all(topic_byte);
        if !valid {
            return Err(BusError::Namespace(options.namespace));
        }
        let mut producer = client_config(&options);
        producer
            .set("enable.idempotence", "true")
            // Java clients' partitioner: a key lands in the same partition whichever
            // client publishes it.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
            .set("message.timeout.ms", millis(options.timeout).to_string());
        let producer: FutureProducer = producer.create()?;
        let admin: AdminClient<DefaultClientContext> = client_config(&options).create()?;
        let bus = Self {
            inner: Arc::new(Inner {
                options,
                producer,
                admin,
                topics: Mutex::new(HashSet::new()),
            }),
        };
        let producer = bus.inner.producer.clone();
        let timeout = bus.inner.options.timeout;
        // The cluster's id, not its metadata: the latter lists every topic of the cluster.
        blocking(timeout, move || {
            producer
                .client()
                .fetch_cluster_id(timeout)
                .map(drop)
                .ok_or(BusError::Timeout(timeout))
        })
        .await?;
        Ok(bus)
    }

    pub fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn topic(&self, event_type: &str) -> String {
        topic_name(&self.inner.options.namespace, event_type)
    }

    /// Whether `topic` exists: from what was seen before, else from the cluster.
    async fn exists(&self, topic: &str) -> Result<bool, BusError> {
        if self.known(topic) {
            return Ok(true);
        }
        let producer = self.inner.producer.clone();
        let timeout = self.inner.options.timeout;
        let name = topic.to_owned();
        let exists = blocking(timeout, move || {
            let metadata = producer.client().fetch_metadata(Some(&name), timeout)?;
            let Some(found) = metadata.topics().iter().find(|found| found.name() == name) else {
                return Ok(false);
            };
            match found.error().map(RDKafkaErrorCode::from) {
                None => Ok(!found.partitions().is_empty()),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(false),
                // Not allowed to see it, a broker not yet told of it, …: not "nobody
                // listens", which would drop the event.
                Some(code) => Err(BusError::Kafka(KafkaError::MetadataFetch(code))),
            }
        })
        .await?;
        if exists {
            self.remember(topic);
        }
        Ok(exists)
    }

    fn known(&self, topic: &str) -> bool {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(topic)
    }

    fn remember(&self, topic: &str) {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_owned());
    }

    /// Publishes `batch` in order and waits for every delivery report. An event whose type
    /// has no topic reaches nobody and is dropped (as RabbitMQ drops an unroutable event);
    /// a command (`mandatory`) is refused with [`BusError::Unroutable`].
    pub async fn publish(&self, batch: &[Outgoing], mandatory: bool) -> Result<(), BusError> {
        let mut deliveries = Vec::with_capacity(batch.len());
        // Asked of the cluster once per batch: a relay's batch often holds many events of
        // a type nobody listens to.
        let mut absent: HashSet<String> = HashSet::new();
        for message in batch {
            let topic = self.topic(&message.event_type);
            if absent.contains(&topic) || !self.exists(&topic).await? {
                absent.insert(topic);
                if mandatory {
                    return Err(BusError::Unroutable(message.event_type.clone()));
                }
                continue;
            }
            let headers = OwnedHeaders::new().insert(Header {
                key: CONTENT_TYPE,
                value: Some(CLOUDEVENTS_JSON),
            });
            deliveries.push(self.produce(
                &topic,
                message.key.as_deref(),
                &message.payload,
                headers,
            )?);
        }
        self.delivered(deliveries).await
    }

    /// Queues one record; its delivery report comes through the returned future.
    fn produce(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<rdkafka::producer::DeliveryFuture, BusError> {
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.inner
            .producer
            .send_result(record)
            .map_err(|(error, _)| BusError::Kafka(error))
    }

    /// Waits for the delivery reports of `deliveries`, within the timeout.
    async fn delivered(
        &self,
        deliveries: Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<(), BusError> {
        let timeout = self.inner.options.timeout;
        let reports = tokio::time::timeout(timeout, futures_util::future::join_all(deliveries))
            .await
            .map_err(|_| BusError::Timeout(timeout))?;
        for report in reports {
            match report {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(BusError::Kafka(error)),
                // The producer went away with the message: not delivered.
                Err(_canceled) => return Err(BusError::Timeout(timeout)),
            }
        }
        Ok(())
    }

    /// Creates the group's topics (the handled types', its replay and dead-letter topics)
    /// and, for a group declared for the first time, commits the end of every partition as
    /// its starting point.
    pub async fn declare_group(&self, core: &ConsumerCore) -> Result<(), BusError> {
        let names = Names::new(&self.inner.options.namespace, &core.group);
        let partitions = self.inner.options.partitions;
        let mut topics: Vec<(String, i32)> = core
            .event_types()
            .map(|event_type| (self.topic(event_type), partitions))
            .collect();
        topics.push((names.replay.clone(), 1));
        topics.push((names.dead.clone(), 1));
        self.create_topics(&topics).await?;
        let subscribed: Vec<String> = topics
            .into_iter()
            .map(|(topic, _)| topic)
            .filter(|topic| *topic != names.dead)
            .collect();
        let config = self.group_config(&names.group);
        let timeout = self.inner.options.timeout;
        blocking(timeout, move || start_at_end(&config, &subscribed, timeout)).await
    }

    /// Creates `topics` (name, partitions) where missing, and waits until the cluster's
    /// metadata shows each.
    async fn create_topics(&self, topics: &[(String, i32)]) -> Result<(), BusError> {
        let missing: Vec<&(String, i32)> = topics
            .iter()
            .filter(|(topic, _)| !self.known(topic))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let replicas = self.inner.options.replication_factor;
        let max_record = MAX_RECORD_BYTES.to_string();
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(topic, partitions)| {
                let new = NewTopic::new(topic, *partitions, TopicReplication::Fixed(replicas))
                    .set("max.message.bytes", &max_record);
                // Dead letters stay until replayed, as on RabbitMQ.
                if topic.ends_with(DEAD_SUFFIX) {
                    new.set("retention.ms", "-1")
                } else {
                    new
                }
            })
            .collect();
        let timeout = self.inner.options.timeout;
        let options = AdminOptions::new().operation_timeout(Some(timeout));
        let results = tokio::time::timeout(timeout, self.inner.admin.create_topics(&new, &options))
            .await
            .map_err(|_| BusError::Timeout(timeout))??;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(BusError::Kafka(KafkaError::AdminOp(code))),
            }
        }
        let deadline = Instant::now() + timeout;
        for (topic, _) in missing {
            while !self.exists(topic).await? {
                if Instant::now() >= deadline {
                    return Err(BusError::Timeout(timeout));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// A client configuration of the group `group`, committing only what it is told to.
    fn group_config(&self, group: &str) -> ClientConfig {
        let mut config = client_config(&self.inner.options);
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        config
    }

    /// Consumes the group's topics until `shutdown`, up to `concurrency` partitions' messages
    /// at once; makes a new consumer after a failure.
    pub async fn consume(&self, core: &ConsumerCore, shutdown: Shutdown, concurrency: usize) {
        // librdkafka reconnects by itself: a session fails only when a consumer cannot be
        // made or subscribed, and the count of failures is never reset.
        let failures = AtomicU32::new(0);
        keep_consuming(&core.group, &shutdown, &failures, || {
            self.consume_once(core, &shutdown, concurrency)
        })
        .await;
    }

    async fn consume_once(
        &self,
        core: &ConsumerCore,
        shutdown: &Shutdown,
        concurrency: usize,
    ) -> Result<(), BusError> {
        let names = Names::new(&self.inner.options.namespace, &core.group);
        let mut config = client_config(&self.inner.options);
        config
            .set("group.id", &names.group)
            // Offsets are stored by hand once a message is settled, and the stored ones
            // committed every second (and when the consumer stops).
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            // A partition with no committed offset is one created after the group started
            // (declaring the group committed the end of the others): all of it is new.
            .set("auto.offset.reset", "earliest")
            // A consumer that dies gives its partitions up within seconds, not 45.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", max_poll_interval(core).to_string())
            .set(
                "fetch.wait.max.ms",
                millis(self.inner.options.fetch_wait).to_string(),
            );
        let consumer = Closing(Some(config.create()?));
        let mut topics: Vec<String> = core.event_types().map(|t| self.topic(t)).collect();
        topics.push(names.replay.clone());
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;

        // A worker per concurrent message; a partition always goes to the same worker, so
        // its messages are handled one after the other, in order. The dispatcher waits for
        // a worker only when BACKLOG messages are waiting for it: it must go on polling,
        // for librdkafka answers a rebalance only while polled, and the whole group waits
        // for each member to answer.
        let workers = concurrency.max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| tokio::sync::mpsc::channel::<OwnedMessage>(BACKLOG))
            .unzip();
        let work = futures_util::future::join_all(
            receivers
                .into_iter()
                .map(|receiver| self.work(&consumer, &names, core, receiver, shutdown)),
        );
        let dispatch = async {
            let mut stream = consumer.stream();
            let mut errors = 0;
            loop {
                let message = tokio::select! {
                    biased;
                    () = shutdown.wait() => break,
                    message = stream.next() => message,
                };
                match message {
                    Some(Ok(message)) => {
                        errors = 0;
                        let worker = usize::try_from(message.partition())
                            .unwrap_or(0)
                            .wrapping_add(hash(message.topic()))
                            % workers;
                        if senders[worker].send(message.detach()).await.is_err() {
                            break;
                        }
                    }
                    // librdkafka reconnects by itself; its errors say what it is going
                    // through (a broker down, a rebalance).
                    Some(Err(error)) => {
                        errors += 1;
                        tracing::warn!(%error, group = %core.group, "Kafka consumer error");
                        tokio::select! {
                            () = tokio::time::sleep(reconnect_delay(errors)) => {}
                            () = shutdown.wait() => break,
                        }
                    }
                    None => break,
                }
            }
            drop(senders);
        };
        futures_util::future::join(dispatch, work).await;
        // What was settled is committed before the consumer leaves its group, both off the
        // async threads and bounded: with the cluster gone, librdkafka would wait for ever.
        let group = core.group.clone();
        let consumer = consumer.take();
        let closed = blocking(self.inner.options.timeout, move || {
            if let Some(consumer) = consumer {
                if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(%error, %group, "final offset commit");
                }
                drop(consumer);
            }
            Ok(())
        })
        .await;
        if closed.is_err() {
            tracing::warn!(group = %core.group, "the Kafka consumer did not close in time; left closing");
        }
        Ok(())
    }

    /// Settles the messages of the partitions given to one worker, storing each one's
    /// offset once settled; stops at shutdown (a message in hand is given back: its offset
    /// stays unstored, and it is delivered again). A message of a partition taken away
    /// meanwhile is left to its new owner.
    async fn work(
        &self,
        consumer: &StreamConsumer,
        names: &Names,
        core: &ConsumerCore,
        mut messages: tokio::sync::mpsc::Receiver<OwnedMessage>,
        shutdown: &Shutdown,
    ) {
        loop {
            let message = tokio::select! {
                biased;
                () = shutdown.wait() => return,
                message = messages.recv() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let settled = if assigned(consumer, &message) {
                self.settle(consumer, names, core, &message, shutdown).await
            } else {
                Settled::Dropped
            };
            match settled {
                Settled::GivenBack => return,
                Settled::Dropped => {}
                // Fails when the partition was taken away meanwhile: its new owner gets
                // the message again, and its inbox knows it.
                Settled::Done => {
                    if let Err(error) = consumer.store_offset(
                        message.topic(),
                        message.partition(),
                        message.offset(),
                    ) {
                        tracing::debug!(%error, group = %core.group, "offset not stored");
                    }
                }
            }
        }
    }

    /// Handles one message: done, or retried in place after its delay, or dead-lettered.
    async fn settle(
        &self,
        consumer: &StreamConsumer,
        names: &Names,
        core: &ConsumerCore,
        message: &OwnedMessage,
        shutdown: &Shutdown,
    ) -> Settled {
        let payload = message.payload().unwrap_or_default();
        let mut attempt = header_u32(message, ATTEMPT).unwrap_or(1).max(1);
        loop {
            match core.process(payload, attempt, shutdown).await {
                Outcome::Done | Outcome::Duplicate => return Settled::Done,
                Outcome::GiveBack => return Settled::GivenBack,
                Outcome::Retry { delay, .. } => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => attempt += 1,
                        () = shutdown.wait() => return Settled::GivenBack,
                    }
                    // Its new owner tries it from the first attempt.
                    if !assigned(consumer, message) {
                        return Settled::Dropped;
                    }
                }
                Outcome::Dead {
                    id,
                    event_type,
                    error,
                } => {
                    if !assigned(consumer, message) {
                        return Settled::Dropped;
                    }
                    let letter = Letter {
                        id: &id,
                        event_type: &event_type,
                        error: &error,
                        attempt,
                    };
                    let mut failures = 0;
                    loop {
                        match self.dead_letter(names, message, &letter).await {
                            Ok(()) => return Settled::Done,
                            Err(error) => {
                                failures += 1;
                                tracing::warn!(%error, group = %core.group, "dead letter not stored; trying again");
                                tokio::select! {
                                    () = tokio::time::sleep(reconnect_delay(failures)) => {}
                                    () = shutdown.wait() => return Settled::GivenBack,
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Appends `message` to the group's dead letters, with why and when it failed.
    async fn dead_letter(
        &self,
        names: &Names,
        message: &OwnedMessage,
        letter: &Letter<'_>,
    ) -> Result<(), BusError> {
        let attempt = letter.attempt.to_string();
        let failed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: CONTENT_TYPE,
                value: Some(CLOUDEVENTS_JSON),
            })
            .insert(Header {
                key: ID,
                value: Some(letter.id),
            })
            .insert(Header {
                key: EVENT_TYPE,
                value: Some(letter.event_type),
            })
            .insert(Header {
                key: ATTEMPT,
                value: Some(&attempt),
            })
            .insert(Header {
                key: ERROR,
                value: Some(truncate(letter.error)),
            })
            .insert(Header {
                key: FAILED_AT,
                value: Some(&failed_at),
            });
        let key = message.key().map(String::from_utf8_lossy);
        // A record too large to read is kept cut to the largest readable size, so that its
        // dead letter fits within the topic's limit with these headers.
        let payload = message.payload().unwrap_or_default();
        let payload = &payload[..payload.len().min(super::MAX_ENVELOPE_BYTES)];
        let delivery = self.produce(&names.dead, key.as_deref(), payload, headers)?;
        self.delivered(vec![delivery]).await
    }

    /// Up to `limit` of `group`'s dead letters, oldest first.
    pub async fn dead_letters(
        &self,
        group: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let log = self.read_dead(group).await?;
        Ok(log.live.iter().take(limit).map(Entry::letter).collect())
    }

    /// Puts `group`'s dead letters (those with envelope id `id`, or all) on its replay
    /// topic as first attempts; returns how many.
    pub async fn replay(&self, group: &str, id: Option<&str>) -> Result<usize, BusError> {
        let names = Names::new(&self.inner.options.namespace, group);
        let log = self.read_dead(group).await?;
        let chosen: Vec<&Entry> = log
            .live
            .iter()
            .filter(|entry| id.is_none_or(|id| entry.id == id))
            .collect();
        // The replay topic (declared with the group, as the dead-letter topic read above
        // was) is the group's own: replaying never reaches other groups.
        let mut deliveries = Vec::with_capacity(chosen.len());
        for entry in &chosen {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: CONTENT_TYPE,
                    value: Some(CLOUDEVENTS_JSON),
                })
                .insert(Header {
                    key: ATTEMPT,
                    value: Some("1"),
                });
            deliveries.push(self.produce(
                &names.replay,
                entry.key.as_deref(),
                &entry.payload,
                headers,
            )?);
        }
        self.delivered(deliveries).await?;
        match id {
            // Everything read is dealt with: the cursor moves past it. Letters that fail
            // again come after it, for the next replay.
            None => {
                let config = self.group_config(&names.cursor);
                let timeout = self.inner.options.timeout;
                let (topic, end) = (names.dead.clone(), log.end);
                blocking(timeout, move || {
                    let consumer: BaseConsumer = config.create()?;
                    let mut cursor = TopicPartitionList::new();
                    cursor.add_partition_offset(&topic, 0, Offset::Offset(end))?;
                    consumer.commit(&cursor, CommitMode::Sync)?;
                    Ok(())
                })
                .await?;
            }
            Some(id) if !chosen.is_empty() => {
                let end = log.end.to_string();
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: REPLAYED,
                        value: Some(id),
                    })
                    .insert(Header {
                        key: REPLAYED_BEFORE,
                        value: Some(&end),
                    });
                let marker = self.produce(&names.dead, None, b"", headers)?;
                self.delivered(vec![marker]).await?;
            }
            Some(_) => {}
        }
        Ok(chosen.len())
    }

    /// The group's dead-letter log from its cursor to its end as it is now, with the
    /// letters replayed one by one taken out.
    async fn read_dead(&self, group: &str) -> Result<DeadLog, BusError> {
        super::check_group(group)?;
        let names = Names::new(&self.inner.options.namespace, group);
        if !self.exists(&names.dead).await? {
            return Ok(DeadLog::default());
        }
        let mut config = self.group_config(&names.cursor);
        config.set("enable.partition.eof", "false");
        let timeout = self.inner.options.timeout;
        blocking(timeout, move || {
            read_dead_log(&config, &names.dead, timeout)
        })
        .await
    }
}

/// The settings every client of the bus shares.
fn client_config(options: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("client.id", format!("keel-{}", std::process::id()))
        // Topics are the consumers' to create, with the partitions they ask for.
        .set("allow.auto.create.topics", "false")
        .set(
            "socket.timeout.ms",
            millis(options.timeout).max(10).to_string(),
        );
    for (name, value) in &options.properties {
        config.set(name, value.expose());
    }
    config
}

/// Runs blocking librdkafka work (metadata, offsets, closing a consumer) on a thread of its
/// own, and waits for it up to a few `timeout`s. Not on tokio's blocking pool: a group
/// consumer's close waits for the coordinator for as long as it takes, and a runtime waits
/// for its blocking tasks when it shuts down; a thread left behind does not hold up the
/// process's exit.
async fn blocking<T: Send + 'static>(
    timeout: Duration,
    work: impl FnOnce() -> Result<T, BusError> + Send + 'static,
) -> Result<T, BusError> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keel-kafka".to_owned())
        .spawn(move || {
            let _ = done.send(work());
        })
        .map_err(|_| BusError::Timeout(timeout))?;
    match tokio::time::timeout(timeout.saturating_mul(4), result).await {
        Ok(Ok(result)) => result,
        // Panicked (the sender dropped unsent), or still waiting for the cluster.
        Ok(Err(_)) | Err(_) => Err(BusError::Timeout(timeout)),
    }
}

/// Commits the end of every partition of `topics` as the group's offset, where it has none
/// yet: a new group gets what is published from now on. A group with running members
/// (another instance) may refuse a commit from outside; it has its own offsets, and
/// partitions created since start from their beginning (`auto.offset.reset`).
fn start_at_end(
    config: &ClientConfig,
    topics: &[String],
    timeout: Duration,
) -> Result<(), BusError> {
    let consumer: BaseConsumer = config.create()?;
    let mut all = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for found in metadata.topics() {
            for partition in found.partitions() {
                all.add_partition(topic, partition.id());
            }
        }
    }
    let committed = consumer.committed_offsets(all, timeout)?;
    let mut fresh = TopicPartitionList::new();
    for element in committed.elements() {
        if let Offset::Offset(_) = element.offset() {
            continue;
        }
        let (_, end) = consumer.fetch_watermarks(element.topic(), element.partition(), timeout)?;
        fresh.add_partition_offset(element.topic(), element.partition(), Offset::Offset(end))?;
    }
    if fresh.count() > 0
        && let Err(error) = consumer.commit(&fresh, CommitMode::Sync)
    {
        tracing::info!(%error, "the group's starting offsets were not committed (it has running members)");
    }
    Ok(())
}

/// Messages a worker may have waiting before the dispatcher waits for it: enough for its
/// partitions to go on arriving through a message's retries (seconds at a time), while the
/// other workers and the group's rebalances go on.
const BACKLOG: usize = 10_000;

/// What became of a message a worker took.
enum Settled {
    /// Handled, found handled before, or dead-lettered: its offset may be stored.
    Done,
    /// Given back at shutdown: delivered again later.
    GivenBack,
    /// Its partition was taken away: left to the new owner.
    Dropped,
}

/// A group consumer that, dropped anywhere (a task aborted, say), closes on a thread of its
/// own: librdkafka's close waits for the group's coordinator, which may be gone.
struct Closing(Option<StreamConsumer>);

impl Closing {
    fn take(mut self) -> Option<StreamConsumer> {
        self.0.take()
    }
}

impl std::ops::Deref for Closing {
    type Target = StreamConsumer;

    fn deref(&self) -> &StreamConsumer {
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only when dropped"))
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("keel-kafka-close".to_owned())
                .spawn(move || drop(consumer));
        }
    }
}

/// Whether `message`'s partition is still this consumer's.
fn assigned(consumer: &StreamConsumer, message: &OwnedMessage) -> bool {
    consumer.assignment().is_ok_and(|assignment| {
        assignment
            .find_partition(message.topic(), message.partition())
            .is_some()
    })
}

/// A dead letter being written.
struct Letter<'a> {
    id: &'a str,
    event_type: &'a str,
    error: &'a str,
    attempt: u32,
}

/// A record of the dead-letter topic.
#[derive(Debug)]
struct Entry {
    offset: i64,
    id: String,
    key: Option<String>,
    payload: Vec<u8>,
    attempts: u32,
    event_type: String,
    error: String,
    failed_at: Option<String>,
}

impl Entry {
    fn letter(&self) -> DeadLetter {
        let mut letter = DeadLetter::new(
            &self.id,
            &self.event_type,
            self.attempts,
            &self.error,
            &self.payload,
        );
        if let Some(failed_at) = &self.failed_at {
            letter.failed_at.clone_from(failed_at);
        }
        letter
    }
}

#[derive(Debug, Default)]
struct DeadLog {
    live: Vec<Entry>,
    /// The offset after the last record read.
    end: i64,
}

/// Reads the dead-letter topic's one partition from the cursor to its end as it is now.
fn read_dead_log(
    config: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<DeadLog, BusError> {
    let consumer: BaseConsumer = config.create()?;
    let mut partition = TopicPartitionList::new();
    partition.add_partition(topic, 0);
    let committed = consumer.committed_offsets(partition, timeout)?;
    let (low, end) = consumer.fetch_watermarks(topic, 0, timeout)?;
    let cursor = match committed.elements().first().map(|element| element.offset()) {
        Some(Offset::Offset(cursor)) => cursor.max(low),
        _ => low,
    };
    let mut log = DeadLog {
        live: Vec::new(),
        end,
    };
    if cursor >= end {
        return Ok(log);
    }
    let mut from = TopicPartitionList::new();
    from.add_partition_offset(topic, 0, Offset::Offset(cursor))?;
    consumer.assign(&from)?;
    // However long the log, only a stall (no record for `timeout`) fails the read.
    let mut deadline = Instant::now() + timeout;
    let mut next = cursor;
    while next < end {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BusError::Timeout(timeout));
        }
        let record = match consumer.poll(left) {
            None => continue,
            Some(Err(error)) if error.rdkafka_error_code().is_some_and(transient) => continue,
            Some(record) => record?,
        };
        deadline = Instant::now() + timeout;
        next = record.offset() + 1;
        if let Some(replayed) = header_text(&record, REPLAYED) {
            // Only the letters that were there when the replay read the log: one that
            // failed again meanwhile stays.
            let before = header_text(&record, REPLAYED_BEFORE)
                .and_then(|end| end.parse::<i64>().ok())
                .unwrap_or(record.offset());
            log.live
                .retain(|entry| entry.id != replayed || entry.offset >= before);
            continue;
        }
        log.live.push(entry(&record));
    }
    Ok(log)
}

fn entry<M: Message>(record: &M) -> Entry {
    let payload = record.payload().unwrap_or_default().to_vec();
    let envelope = super::Envelope::from_slice(&payload).ok();
    let id = header_text(record, ID)
        .filter(|id| !id.is_empty())
        .or_else(|| envelope.as_ref().map(|envelope| envelope.id.clone()))
        .unwrap_or_default();
    let event_type = header_text(record, EVENT_TYPE)
        .filter(|event_type| !event_type.is_empty())
        .or_else(|| envelope.map(|envelope| envelope.event_type))
        .unwrap_or_default();
    Entry {
        offset: record.offset(),
        id,
        key: record
            .key()
            .map(|key| String::from_utf8_lossy(key).into_owned()),
        attempts: header_u32(record, ATTEMPT).unwrap_or(1),
        error: header_text(record, ERROR).unwrap_or_default(),
        failed_at: header_text(record, FAILED_AT),
        event_type,
        payload,
    }
}

const DEAD_SUFFIX: &str = ".dead";

/// The names of a consumer group's Kafka resources.
struct Names {
    group: String,
    replay: String,
    dead: String,
    /// The group whose committed offset on `dead` marks what was replayed.
    cursor: String,
}

impl Names {
    fn new(namespace: &str, group: &str) -> Self {
        Self {
            group: format!("{namespace}.{group}"),
            replay: format!("{namespace}.__group.{group}.replay"),
            dead: format!("{namespace}.__group.{group}{DEAD_SUFFIX}"),
            cursor: format!("{namespace}.{group}.dead-letters"),
        }
    }
}

/// The topic of `event_type`: `namespace.event_type`, with characters Kafka does not allow
/// in topic names as `_`.
fn topic_name(namespace: &str, event_type: &str) -> String {
    let mut topic = String::with_capacity(namespace.len() + 1 + event_type.len());
    topic.push_str(namespace);
    topic.push('.');
    topic.extend(
        event_type
            .bytes()
            .map(|b| if topic_byte(b) { char::from(b) } else { '_' }),
    );
    topic
}

fn topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._-".contains(&b)
}

/// How long a consumer may go without asking for messages before the group gives its
/// partitions to another: a worker holding one message through every attempt of it keeps
/// the others waiting that long.
fn max_poll_interval(core: &ConsumerCore) -> u64 {
    let per_attempt = core
        .retry
        .handler_timeout
        .saturating_add(core.retry.max_delay);
    let held = per_attempt.saturating_mul(core.retry.max_attempts.max(1));
    millis(held.saturating_add(Duration::from_secs(60))).clamp(300_000, 86_400_000)
}

fn header_value<'a, M: Message>(record: &'a M, name: &str) -> Option<&'a [u8]> {
    record
        .headers()?
        .iter()
        .filter(|header| header.key == name)
        .last()?
        .value
}

fn header_text<M: Message>(record: &M, name: &str) -> Option<String> {
    header_value(record, name).map(|value| String::from_utf8_lossy(value).into_owned())
}

fn header_u32<M: Message>(record: &M, name: &str) -> Option<u32> {
    std::str::from_utf8(header_value(record, name)?)
        .ok()?
        .parse()
        .ok()
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(MAX_ERROR_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Errors a consumer passes up that pass by themselves (librdkafka retries).
fn transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
    )
}

fn hash(text: &str) -> usize {
    text.bytes().fold(0usize, |hash, b| {
        hash.wrapping_mul(31).wrapping_add(usize::from(b))
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_keep_kafkas_alphabet() {
        assert_eq!(
            topic_name("keel.events", "keel.orders.order-placed.v1"),
            "keel.events.keel.orders.order-placed.v1"
        );
        assert_eq!(topic_name("ns", "a b/c:d"), "ns.a_b_c_d");
        let longest = topic_name(&"n".repeat(MAX_NAMESPACE), &"t".repeat(200));
        assert!(longest.len() <= 249, "{}", longest.len());
    }

    #[test]
    fn errors_are_cut_on_a_character_boundary() {
        let text = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate(&text);
        assert!(cut.len() <= MAX_ERROR_BYTES && cut.len() >= MAX_ERROR_BYTES - 1);
        assert_eq!(truncate("short"), "short");
    }
}
