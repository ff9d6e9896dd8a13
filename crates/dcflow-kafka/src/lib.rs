//! dcflow's Kafka source: a consumer in the configured group, with automatic commits off.
//! An offset is committed only when every earlier offset of its partition has finished
//! (copied, skipped, or failed and recorded), using [`dcflow_core::Watermarks`].
//!
//! # Layout
//! ```text
//! KafkaSource::recv ──► Delivery (payload, partition, offset, ticket)
//!      pipeline work ──► KafkaSource::finish(ticket) ──► watermark advances
//!      KafkaSource::commit (periodically, on revoke, at shutdown) ──► broker
//! ```
//! Rebalances: before partitions are revoked, what they finished is committed and their
//! state dropped, so this consumer never commits for a partition it no longer owns; work
//! still running for them completes but is not committed (the new owner redelivers it, and
//! copies are idempotent). Pausing all partitions lets the caller keep polling (heartbeats,
//! rebalances) while its transfer slots are full.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcflow_core::config::KafkaConfig;
use dcflow_core::{Ticket, Watermarks};
use futures_util::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, MessageStream, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

pub use rdkafka::error::KafkaError as Error;

/// One billing message taken from the topic.
#[derive(Debug)]
pub struct Delivery {
    pub payload: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
    pub ticket: Ticket,
}

impl Delivery {
    /// Where the message came from, for logs and records ("partition 0 offset 42"), formatted
    /// only when used.
    pub fn origin(&self) -> Origin {
        Origin {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// A message's place in its topic; see [`Delivery::origin`].
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {} offset {}", self.partition, self.offset)
    }
}

struct Shared {
    topic: String,
    watermarks: Mutex<Watermarks>,
}

impl Shared {
    fn commit_list(&self, commits: &[(i32, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &(partition, offset) in commits {
            let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset));
        }
        tpl
    }
}

/// Maps librdkafka's callbacks to logs and watermark state.
pub struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(facility = fac, "kafka: {message}")
            }
            RDKafkaLogLevel::Warning => warn!(facility = fac, "kafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(facility = fac, "kafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(facility = fac, "kafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            return; // reaching the end of a partition is not a problem
        }
        // Broker outages land here; librdkafka reconnects by itself.
        warn!(error = %error, "kafka: {reason}");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut w = self.shared.watermarks.lock().expect("watermarks lock");
            let commits = w.take_commits();
            if !commits.is_empty() {
                if let Err(e) =
                    consumer.commit(&self.shared.commit_list(&commits), CommitMode::Sync)
                {
                    warn!(error = %e, "commit before revocation failed: these offsets will be redelivered");
                }
            }
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            for &p in &revoked {
                w.revoke(p);
            }
            info!(?revoked, committed = ?commits, "partitions revoked; their unfinished work will not be committed here");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut w = self.shared.watermarks.lock().expect("watermarks lock");
                let assigned: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                for &p in &assigned {
                    w.assign(p);
                }
                info!(?assigned, "partitions assigned");
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// What [`Incoming::next`] took from the topic.
#[derive(Debug)]
pub enum Received {
    /// A message to work on: its ticket must be handed to [`KafkaSource::finish`].
    Work(Delivery),
    /// `count` messages the caller's `dismiss` turned down, one after the other: finished
    /// already, never copied.
    Dismissed { count: u32 },
    /// A message of a partition this consumer does not own (any more): left to its owner.
    NotOwned,
}

/// Messages dismissed in one call of [`Incoming::next`] at most, so that the caller's own
/// checks (clocks, signals) still come round while a backlog streams past.
const DISMISS_RUN: u32 = 1024;

/// The stream of messages of a [`KafkaSource`]; see [`KafkaSource::incoming`].
pub struct Incoming<'a> {
    source: &'a KafkaSource,
    stream: MessageStream<'a, Context>,
    /// What to return first at the next call: met after a run of dismissed messages.
    stashed: Option<Result<Received, KafkaError>>,
    /// Partitions read to their end with nothing new since (only with `report_end`).
    at_end: BTreeSet<i32>,
}

impl Incoming<'_> {
    /// The next message, or the next run of dismissed ones. `dismiss` sees each payload in
    /// place: a message it turns down is marked finished without being copied out of
    /// librdkafka's buffer (most of the billing traffic), and the messages already waiting
    /// are dismissed in the same call. Cancellation safe: it only waits while it holds
    /// nothing.
    ///
    /// With `report_end`, each time a partition's end is reached this returns
    /// `Err(KafkaError::PartitionEOF(p))`; see [`Incoming::caught_up`].
    pub async fn next(
        &mut self,
        mut dismiss: impl FnMut(&[u8]) -> bool,
    ) -> Result<Received, KafkaError> {
        if let Some(stashed) = self.stashed.take() {
            return stashed;
        }
        let mut dismissed = 0;
        loop {
            let next = if dismissed == 0 {
                self.stream.next().await
            } else if dismissed == DISMISS_RUN {
                return Ok(Received::Dismissed { count: dismissed });
            } else {
                // Only what is there already: the run of dismissed messages ends at the first
                // wait.
                match self.stream.next().now_or_never() {
                    Some(next) => next,
                    None => return Ok(Received::Dismissed { count: dismissed }),
                }
            };
            let received = match next.expect("kafka streams never terminate") {
                Ok(msg) => {
                    let (partition, offset) = (msg.partition(), msg.offset());
                    if !self.at_end.is_empty() {
                        self.at_end.remove(&partition);
                    }
                    let payload = msg.payload().unwrap_or_default();
                    let turned_down = dismiss(payload);
                    let mut watermarks = self
                        .source
                        .shared
                        .watermarks
                        .lock()
                        .expect("watermarks lock");
                    if turned_down {
                        if watermarks.pass(partition, offset) {
                            dismissed += 1;
                            continue;
                        }
                        Ok(Received::NotOwned)
                    } else {
                        match watermarks.start(partition, offset) {
                            Some(ticket) => Ok(Received::Work(Delivery {
                                payload: payload.to_vec(),
                                partition,
                                offset,
                                ticket,
                            })),
                            None => Ok(Received::NotOwned),
                        }
                    }
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    self.at_end.insert(p);
                    Err(KafkaError::PartitionEOF(p))
                }
                Err(e) => Err(e),
            };
            if dismissed == 0 {
                return received;
            }
            self.stashed = Some(received);
            return Ok(Received::Dismissed { count: dismissed });
        }
    }

    /// Every assigned partition has been read to its end, and nothing came since (known only
    /// with `report_end`).
    pub fn caught_up(&self) -> bool {
        let watermarks = self
            .source
            .shared
            .watermarks
            .lock()
            .expect("watermarks lock");
        let mut owned = watermarks.owned().peekable();
        owned.peek().is_some() && owned.all(|p| self.at_end.contains(&p))
    }
}

/// The consumer and its watermarks.
pub struct KafkaSource {
    consumer: StreamConsumer<Context>,
    shared: Arc<Shared>,
}

impl KafkaSource {
    /// Creates the consumer (automatic commits and offset stores off) of `topic` in `group`
    /// and subscribes.
    ///
    /// With `report_end`, [`Incoming::next`] returns `Err(KafkaError::PartitionEOF(p))` each
    /// time a partition's end is reached (for `--until-caught-up`).
    pub fn try_new(
        cfg: &KafkaConfig,
        topic: &str,
        group: &str,
        report_end: bool,
    ) -> Result<Self, KafkaError> {
        let shared = Arc::new(Shared {
            topic: topic.to_owned(),
            watermarks: Mutex::default(),
        });
        let consumer: StreamConsumer<Context> = base_config(cfg)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "enable.partition.eof",
                if report_end { "true" } else { "false" },
            )
            .set("auto.offset.reset", cfg.offset_reset.as_str())
            .create_with_context(Context {
                shared: shared.clone(),
            })?;
        consumer.subscribe(&[topic])?;
        Ok(Self { consumer, shared })
    }

    /// The messages of the subscription. Keep one for the life of the consuming loop: each
    /// creation registers with the consumer's waker list.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            source: self,
            stream: self.consumer.stream(),
            stashed: None,
            at_end: BTreeSet::new(),
        }
    }

    /// The work of a delivery ended (done, skipped, or failed and recorded).
    pub fn finish(&self, ticket: &Ticket) {
        self.shared
            .watermarks
            .lock()
            .expect("watermarks lock")
            .finish(ticket);
    }

    /// Commits every position that advanced; returns them.
    pub fn commit(&self, mode: CommitMode) -> Result<Vec<(i32, i64)>, KafkaError> {
        let commits = self
            .shared
            .watermarks
            .lock()
            .expect("watermarks lock")
            .take_commits();
        if !commits.is_empty() {
            self.consumer
                .commit(&self.shared.commit_list(&commits), mode)?;
            debug!(?commits, "offsets committed");
        }
        Ok(commits)
    }

    /// Partitions assigned to this consumer now, as the rebalance callbacks left them.
    /// (Asking librdkafka instead is a round trip through its main thread, and the consuming
    /// loop asks often.)
    pub fn assigned(&self) -> usize {
        self.shared
            .watermarks
            .lock()
            .expect("watermarks lock")
            .owned()
            .count()
    }

    /// Offsets handed out and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.shared
            .watermarks
            .lock()
            .expect("watermarks lock")
            .in_flight()
    }

    /// Stops fetching from every assigned partition (polling goes on).
    pub fn pause(&self) -> Result<(), KafkaError> {
        self.consumer.pause(&self.consumer.assignment()?)
    }

    pub fn resume(&self) -> Result<(), KafkaError> {
        self.consumer.resume(&self.consumer.assignment()?)
    }

    /// Per assigned partition: messages between the committed position and the end of the
    /// partition. Blocking (asks the broker); call it off the async threads.
    pub fn lag(&self, timeout: Duration) -> Result<BTreeMap<i32, i64>, KafkaError> {
        let assignment = self.consumer.assignment()?;
        let committed = self
            .consumer
            .committed_offsets(assignment.clone(), timeout)?;
        let mut out = BTreeMap::new();
        for e in committed.elements() {
            let (low, high) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)?;
            let position = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            out.insert(e.partition(), (high - position).max(0));
        }
        Ok(out)
    }
}

fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    // librdkafka stops fetching once its queue holds queued.min.messages and, by default,
    // waits a whole second before fetching again: a consumer that drains 100,000 messages
    // in half a second then idles for the other half. Operators' properties may override.
    client.set("fetch.queue.backoff.ms", "10");
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client.set("bootstrap.servers", cfg.servers.join(","));
    client
}

/// Produces to one topic and waits for the broker's acknowledgement of each message.
pub struct TopicProducer {
    producer: FutureProducer,
    topic: String,
}

impl TopicProducer {
    /// An idempotent producer: its own retries add no duplicates.
    pub fn try_new(cfg: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        let producer = base_config(cfg)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends and waits until the broker has it: (partition, offset).
    pub async fn send(&self, key: Option<&str>, payload: &[u8]) -> Result<(i32, i64), KafkaError> {
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&self.topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        let delivery = self
            .producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| e)?;
        Ok((delivery.partition, delivery.offset))
    }

    /// Creates `topic` with `partitions` partitions if it does not exist yet.
    pub async fn ensure_topic(
        cfg: &KafkaConfig,
        topic: &str,
        partitions: i32,
    ) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = base_config(cfg).create()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics([&new], &AdminOptions::new()).await? {
            match result {
                Ok(_) => info!(topic, partitions, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code)),
            }
        }
        Ok(())
    }
}

/// Every message of `topic` from its beginning to its current end (the dead-letter topic, for
/// `dcflow retry`). Blocking; no group offsets are read or written.
pub fn read_topic(
    cfg: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, KafkaError> {
    let consumer: BaseConsumer = base_config(cfg)
        .set("group.id", "dcflow-topic-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = BTreeMap::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            if high > low {
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
                remaining.insert(p.id(), high);
            }
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    while !remaining.is_empty() {
        let msg = match consumer.poll(timeout) {
            Some(m) => m?,
            None => {
                return Err(KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ))
            }
        };
        if msg.offset() + 1 >= remaining.get(&msg.partition()).copied().unwrap_or(0) {
            remaining.remove(&msg.partition());
        }
        out.push(msg.payload().unwrap_or_default().to_vec());
    }
    Ok(out)
}
