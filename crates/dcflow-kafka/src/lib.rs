//! dcflow's Kafka source: a consumer in the configured group, with automatic commits off.
//! An offset is committed only when every earlier offset of its partition has finished
//! (copied, skipped, or failed and recorded), using [`dcflow_core::Watermarks`].
//!
//! # Layout
//! ```text
//! Incoming::next ──► Delivery (payload, partition, offset, ticket)
//!      pipeline work ──► KafkaSource::finish(ticket) ──► watermark advances
//!      KafkaSource::commit (periodically, on revoke, at shutdown) ──► broker
//! dispatch: billing topic ──► selected uploads ──► work topic keyed by pnfsid (scale-out)
//! ```
//! Rebalances: before partitions are revoked, what they finished is committed and their
//! state dropped, so this consumer never commits for a partition it no longer owns; work
//! still running for them completes but is not committed (the new owner redelivers it, and
//! copies are idempotent). Pausing all partitions lets the caller keep polling (heartbeats,
//! rebalances) while its transfer slots are full.
//!
//! Messages are taken in batches: as each partition is assigned, its librdkafka fetch queue
//! is forwarded to a queue of this source, read with `rd_kafka_consume_batch_queue`, while the
//! consumer's own queue keeps the rebalances, errors and commit results, served by rdkafka's
//! `poll`. One message at a time through rdkafka's stream cost twice the CPU (a clock reading,
//! a lock and an allocation each), and a catch-up on 2 cores is short of CPU. librdkafka wakes
//! the consuming task when either queue stops being empty.

pub mod dispatch;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcflow_core::config::KafkaConfig;
use dcflow_core::{Health, Ticket, Watermarks};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use rdkafka_sys as rdsys;
pub use report::Reporter;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// A Kafka client error. librdkafka's error is its text; no rdkafka type is part of this
/// crate's interface, so that no other crate depends on rdkafka.
#[derive(Debug)]
pub struct Error(KafkaError);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

impl From<KafkaError> for Error {
    fn from(e: KafkaError) -> Self {
        Self(e)
    }
}

/// How [`KafkaSource::commit`] commits: waiting for the broker, or not (confirmed later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    Sync,
    Async,
}

impl From<CommitMode> for rdkafka::consumer::CommitMode {
    fn from(m: CommitMode) -> Self {
        match m {
            CommitMode::Sync => Self::Sync,
            CommitMode::Async => Self::Async,
        }
    }
}

/// How long a consumer being dropped waits for librdkafka to leave its group before rdkafka's
/// own (slower) wait takes over.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

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
    /// The same, for librdkafka's C calls.
    topic_c: CString,
    watermarks: Mutex<Watermarks>,
    /// The queue assigned partitions are forwarded to ([`KafkaSource::messages`]); null once
    /// the source is being dropped.
    messages: AtomicPtr<rdsys::rd_kafka_queue_t>,
    /// Woken by librdkafka when the message queue or the consumer's queue stops being empty.
    wake: Notify,
    /// Set when the source is dropped: the consumer is leaving its group.
    closing: AtomicBool,
    /// Run before any offset is committed (the periodic commits, the one before a
    /// revocation, the final one): makes the records of the finished work durable. An error
    /// holds the commit back.
    before_commit: std::sync::OnceLock<BeforeCommit>,
}

/// Why [`KafkaSource::commit`] committed nothing.
#[derive(Debug)]
pub enum CommitError {
    /// The hook could not make the records durable: nothing is committed.
    NotDurable(String),
    Kafka(Error),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotDurable(e) => write!(f, "not committed, the records are not durable: {e}"),
            Self::Kafka(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CommitError {}

impl From<KafkaError> for CommitError {
    fn from(e: KafkaError) -> Self {
        Self::Kafka(Error(e))
    }
}

/// See [`KafkaSource::set_before_commit`].
pub type BeforeCommit = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

impl Shared {
    /// The positions to commit now, once the hook has made their records durable.
    fn ready_commits(&self, w: &Watermarks) -> Result<Vec<(i32, i64)>, String> {
        let commits = w.pending_commits();
        if !commits.is_empty() {
            if let Some(hook) = self.before_commit.get() {
                hook()?;
            }
        }
        Ok(commits)
    }
}

/// librdkafka's callback when a queue stops being empty (called on its own threads, with the
/// queue locked: it only wakes the consuming task).
unsafe extern "C" fn queue_not_empty(_: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Shared::wake` of a live source: the callbacks are switched
    // off before the source's `Shared` can go.
    unsafe { (*(opaque as *const Notify)).notify_one() }
}

/// A handle on a librdkafka queue (thread-safe on librdkafka's side); destroyed on drop.
struct Queue(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka queues may be used and destroyed from any thread.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

impl Queue {
    fn wake(&self, shared: &Shared) {
        // SAFETY: a valid queue; see `queue_not_empty`.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(
                self.0,
                Some(queue_not_empty),
                &shared.wake as *const Notify as *mut c_void,
            )
        }
    }

    fn len(&self) -> usize {
        // SAFETY: a valid queue.
        unsafe { rdsys::rd_kafka_queue_length(self.0) }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: a valid queue, released once.
        unsafe {
            rdsys::rd_kafka_queue_cb_event_enable(self.0, None, ptr::null_mut());
            rdsys::rd_kafka_queue_destroy(self.0);
        }
    }
}

/// Messages taken from librdkafka in one batch, destroyed (their buffers released) on drop.
struct Batch {
    messages: Vec<*mut rdsys::rd_kafka_message_t>,
    next: usize,
    /// Each partition of the batch with the assignment it was fetched under.
    assignments: Vec<(i32, u64)>,
}

// SAFETY: librdkafka messages may be read and destroyed from any thread.
unsafe impl Send for Batch {}

impl Batch {
    const SIZE: usize = 1024;

    fn new() -> Self {
        Self {
            messages: Vec::with_capacity(Self::SIZE),
            next: 0,
            assignments: Vec::new(),
        }
    }

    /// Releases the messages and takes what `queue` holds now, without waiting, noting the
    /// assignment of each partition (librdkafka has just dropped what earlier assignments
    /// fetched; rebalances run only when this batch's owner polls).
    fn refill(&mut self, queue: &Queue, watermarks: &Mutex<Watermarks>) -> usize {
        self.release();
        // SAFETY: the buffer has room for SIZE pointers; librdkafka fills `n` of them.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(queue.0, 0, self.messages.as_mut_ptr(), Self::SIZE)
        };
        // SAFETY: the first `n` pointers are initialised (a negative count is an error: none).
        unsafe { self.messages.set_len(n.max(0) as usize) };
        let watermarks = watermarks.lock().expect("watermarks lock");
        for &m in &self.messages {
            // SAFETY: a live message of this batch.
            let partition = unsafe { (*m).partition };
            if !self.assignments.iter().any(|&(p, _)| p == partition) {
                if let Some(generation) = watermarks.generation(partition) {
                    self.assignments.push((partition, generation));
                }
            }
        }
        self.messages.len()
    }

    fn release(&mut self) {
        for &m in &self.messages {
            // SAFETY: each message is released once; `set_len(0)` below forgets them.
            unsafe { rdsys::rd_kafka_message_destroy(m) };
        }
        self.messages.clear();
        self.next = 0;
        self.assignments.clear();
    }

    /// The next message, or a consumer error.
    fn pop(&mut self) -> Option<Result<Raw<'_>, KafkaError>> {
        let m = *self.messages.get(self.next)?;
        self.next += 1;
        // SAFETY: a live message of this batch; its payload lives as long as the batch.
        let m = unsafe { &*m };
        if m.err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let code = RDKafkaErrorCode::from(m.err);
            return Some(Err(if code == RDKafkaErrorCode::PartitionEOF {
                KafkaError::PartitionEOF(m.partition)
            } else {
                KafkaError::MessageConsumption(code)
            }));
        }
        let payload = if m.payload.is_null() {
            &[][..]
        } else {
            // SAFETY: librdkafka's payload pointer and length, alive until the message is
            // destroyed.
            unsafe { std::slice::from_raw_parts(m.payload as *const u8, m.len) }
        };
        let assignment = self
            .assignments
            .iter()
            .find(|&&(p, _)| p == m.partition)
            .map(|&(_, g)| g);
        Some(Ok(Raw {
            partition: m.partition,
            offset: m.offset,
            payload,
            assignment: Some(assignment),
        }))
    }
}

/// A message of a [`Batch`], in place.
struct Raw<'a> {
    partition: i32,
    offset: i64,
    payload: &'a [u8],
    /// For a message held in a batch, the assignment it was fetched under (`Some(None)`: its
    /// partition was not owned then); `None` for one straight from librdkafka's poll.
    assignment: Option<Option<u64>>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.release();
    }
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

/// Maps librdkafka's callbacks to logs, the upstream's health and watermark state.
pub struct Context {
    shared: Arc<Shared>,
    report: Reporter,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.report.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.report.error(error, reason)
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.report.stats_raw(statistics)
    }
}

impl ConsumerContext for Context {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                let mut w = self.shared.watermarks.lock().expect("watermarks lock");
                for e in offsets.elements_for_topic(&self.shared.topic) {
                    if let Offset::Offset(o) = e.offset() {
                        w.confirm(e.partition(), o);
                    }
                }
            }
            // Not confirmed: the position stays pending and the next commit sends it again.
            Err(e) => warn!(error = %e, "offset commit failed; it is sent again at the next tick"),
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // Before librdkafka starts fetching them: their messages go to our queue.
            let messages = self.shared.messages.load(Ordering::Acquire);
            if !messages.is_null() {
                let rk = consumer.client().native_ptr();
                for e in list.elements() {
                    let Ok(topic) = CString::new(e.topic()) else {
                        continue;
                    };
                    // SAFETY: a live client and queue; the partition queue handle is released
                    // at once (the forwarding stays with the partition).
                    unsafe {
                        let partition =
                            rdsys::rd_kafka_queue_get_partition(rk, topic.as_ptr(), e.partition());
                        if !partition.is_null() {
                            rdsys::rd_kafka_queue_forward(partition, messages);
                            rdsys::rd_kafka_queue_destroy(partition);
                        }
                    }
                }
            }
        }
        if let Rebalance::Revoke(list) = rebalance {
            let mut w = self.shared.watermarks.lock().expect("watermarks lock");
            let commits = match self.shared.ready_commits(&w) {
                Ok(commits) => commits,
                Err(e) => {
                    warn!(error = %e, "no commit before revocation: the records are not durable; these offsets will be redelivered");
                    Vec::new()
                }
            };
            if !commits.is_empty() {
                match consumer.commit(
                    &self.shared.commit_list(&commits),
                    rdkafka::consumer::CommitMode::Sync,
                ) {
                    Ok(()) => commits.iter().for_each(|&(p, o)| w.confirm(p, o)),
                    Err(e) => {
                        warn!(error = %e, "commit before revocation failed: these offsets will be redelivered")
                    }
                }
            }
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            for &p in &revoked {
                w.revoke(p);
            }
            info!(?revoked, committed = ?commits, "partitions revoked; their unfinished work will not be committed here");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
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
            Rebalance::Revoke(_) if self.shared.closing.load(Ordering::Acquire) => {
                // The last revocation of a consumer being dropped: librdkafka now leaves the
                // group on its own threads. rdkafka's drop polls until that is done, but its
                // poll sleeps through librdkafka's "closed" notice to the end of a 100 ms
                // timeout, at every shutdown; waiting here instead ends as soon as it is done.
                let deadline = Instant::now() + CLOSE_WAIT;
                while !consumer.closed() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

/// What [`Incoming::next`] took from the topic.
#[derive(Debug)]
pub enum Received {
    /// A message to work on: its ticket must be handed to [`KafkaSource::finish`].
    Work(Delivery),
    /// `count` messages the caller's `dismiss` turned down, one after the other (at most a
    /// batch, so that the caller's own checks come round while a backlog streams past):
    /// finished already, never copied.
    Dismissed { count: u32 },
    /// A message of a partition this consumer does not own (any more): left to its owner.
    NotOwned,
    /// The partition was read to its end (only with `report_end`); see
    /// [`Incoming::caught_up`].
    End { partition: i32 },
}

/// The stream of messages of a [`KafkaSource`]; see [`KafkaSource::incoming`].
pub struct Incoming<'a> {
    source: &'a KafkaSource,
    batch: Batch,
    /// What to return first at the next call: met after a run of dismissed messages.
    stashed: Option<Result<Received, KafkaError>>,
    /// Partitions read to their end with nothing new since (only with `report_end`).
    at_end: BTreeSet<i32>,
}

impl Incoming<'_> {
    /// The next message, or the next run of dismissed ones. `dismiss` sees each payload in
    /// place: a message it turns down is marked finished without being copied out of
    /// librdkafka's buffer (most of the billing traffic), and the messages already fetched
    /// are dismissed in the same call. Cancellation safe: it only waits while it holds
    /// nothing.
    ///
    /// With `report_end`, each time a partition's end is reached this returns
    /// [`Received::End`]; see [`Incoming::caught_up`].
    pub async fn next(&mut self, dismiss: impl FnMut(&[u8]) -> bool) -> Result<Received, Error> {
        match self.next_raw(dismiss).await {
            Err(KafkaError::PartitionEOF(partition)) => Ok(Received::End { partition }),
            other => Ok(other?),
        }
    }

    async fn next_raw(
        &mut self,
        mut dismiss: impl FnMut(&[u8]) -> bool,
    ) -> Result<Received, KafkaError> {
        if let Some(stashed) = self.stashed.take() {
            return stashed;
        }
        // Rebalances, errors and commit results first, at every call: a batch of work may
        // take a while to hand out (one message per free transfer slot), and a rebalance
        // must not wait for it.
        if let Some(received) = self.serve_events(&mut dismiss) {
            return received;
        }
        loop {
            if let Some(received) = self.next_in_batch(&mut dismiss) {
                return received;
            }
            // An assignment is served before its messages are read.
            if let Some(received) = self.serve_events(&mut dismiss) {
                return received;
            }
            if self
                .batch
                .refill(&self.source.messages, &self.source.shared.watermarks)
                == 0
            {
                if let Some(p) = self.end_reached() {
                    return Err(self.note_end(KafkaError::PartitionEOF(p)));
                }
                self.source.shared.wake.notified().await;
            }
        }
    }

    /// Goes through what the batch holds: the first message to hand out, or a consumer
    /// error (after a run of dismissed messages: that run, the message stashed), or `None`
    /// when the batch is empty and nothing was dismissed. The watermarks are locked once for
    /// the whole run, not once per message.
    fn next_in_batch(
        &mut self,
        dismiss: &mut impl FnMut(&[u8]) -> bool,
    ) -> Option<Result<Received, KafkaError>> {
        let mut dismissed = 0;
        let source = self.source;
        let mut watermarks = None;
        let received = loop {
            match self.batch.pop() {
                Some(Ok(raw)) => {
                    let w = watermarks.get_or_insert_with(|| {
                        source.shared.watermarks.lock().expect("watermarks lock")
                    });
                    match decide(w, &mut self.at_end, raw, dismiss) {
                        None => dismissed += 1,
                        Some(received) => break Ok(received),
                    }
                }
                Some(Err(e)) => break Err(self.note_end(e)),
                None if dismissed > 0 => return Some(Ok(Received::Dismissed { count: dismissed })),
                None => return None,
            }
        };
        if dismissed == 0 {
            return Some(received);
        }
        self.stashed = Some(received);
        Some(Ok(Received::Dismissed { count: dismissed }))
    }

    /// Serves what waits on the consumer's own queue (rdkafka's `poll` runs the rebalance
    /// callbacks); returns what the caller must see: an error, or a message that came before
    /// its partition was forwarded.
    fn serve_events(
        &mut self,
        dismiss: &mut impl FnMut(&[u8]) -> bool,
    ) -> Option<Result<Received, KafkaError>> {
        // Bounded: each poll takes one event, and events may keep coming.
        for _ in 0..64 {
            if self.source.events.len() == 0 {
                break;
            }
            match self.source.consumer.poll(Duration::ZERO) {
                Some(Ok(msg)) => {
                    let raw = Raw {
                        partition: msg.partition(),
                        offset: msg.offset(),
                        payload: msg.payload().unwrap_or_default(),
                        assignment: None,
                    };
                    let mut watermarks = self
                        .source
                        .shared
                        .watermarks
                        .lock()
                        .expect("watermarks lock");
                    match decide(&mut watermarks, &mut self.at_end, raw, dismiss) {
                        None => return Some(Ok(Received::Dismissed { count: 1 })),
                        Some(received) => return Some(Ok(received)),
                    }
                }
                Some(Err(e)) => return Some(Err(self.note_end(e))),
                None => {}
            }
        }
        None
    }

    /// With `report_end`, an owned partition not known to be at its end whose every message
    /// up to the high watermark of the last fetch response has been seen. librdkafka itself
    /// reports the end only after a fetch that comes back empty, which the broker holds for
    /// `fetch.wait.max.ms` (500 ms by default): a catch-up run would idle that long for
    /// nothing. (Messages reach the queue after librdkafka notes the watermark of their
    /// fetch response, so nothing fetched can be missed. Where the last offsets hold no
    /// message, as after a transaction marker, librdkafka's own report still comes.)
    fn end_reached(&self) -> Option<i32> {
        if !self.source.report_end {
            return None;
        }
        let shared = &self.source.shared;
        let rk = self.source.consumer.client().native_ptr();
        let watermarks = shared.watermarks.lock().expect("watermarks lock");
        let reached = watermarks
            .owned()
            .filter(|p| !self.at_end.contains(p))
            .find(|&p| {
                let Some(next) = watermarks.next_to_read(p) else {
                    return false;
                };
                let (mut low, mut high) = (-1, -1);
                // SAFETY: a live client; librdkafka only reads its cached offsets.
                let err = unsafe {
                    rdsys::rd_kafka_get_watermark_offsets(
                        rk,
                        shared.topic_c.as_ptr(),
                        p,
                        &mut low,
                        &mut high,
                    )
                };
                err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    && high >= 0
                    && next >= high
            });
        reached
    }

    fn note_end(&mut self, e: KafkaError) -> KafkaError {
        if let KafkaError::PartitionEOF(p) = e {
            self.at_end.insert(p);
        }
        e
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

/// What becomes of one message: `None` when `dismiss` turned it down (finished at once).
fn decide(
    watermarks: &mut Watermarks,
    at_end: &mut BTreeSet<i32>,
    Raw {
        partition,
        offset,
        payload,
        assignment,
    }: Raw<'_>,
    dismiss: &mut impl FnMut(&[u8]) -> bool,
) -> Option<Received> {
    if !at_end.is_empty() {
        at_end.remove(&partition);
    }
    let turned_down = dismiss(payload);
    // Held in a batch across a rebalance that took the partition away (and maybe gave it
    // back): the offsets before it may still be in flight under the old assignment, so this
    // one must not move the new watermark. The new assignment fetches it again.
    if assignment.is_some_and(|a| a.is_none() || a != watermarks.generation(partition)) {
        return Some(Received::NotOwned);
    }
    if turned_down {
        return if watermarks.pass(partition, offset) {
            None
        } else {
            Some(Received::NotOwned)
        };
    }
    Some(match watermarks.start(partition, offset) {
        Some(ticket) => Received::Work(Delivery {
            payload: payload.to_vec(),
            partition,
            offset,
            ticket,
        }),
        None => Received::NotOwned,
    })
}

/// The consumer and its watermarks.
pub struct KafkaSource {
    // The queue handles go before the consumer (fields drop in order): librdkafka's instance
    // must outlive them.
    /// Where the assigned partitions' messages are forwarded (see the module notes).
    messages: Queue,
    /// The consumer's own queue: rebalances, errors, commit results.
    events: Queue,
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    /// Whether [`Incoming::next`] reports partition ends.
    report_end: bool,
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        // No more forwarding to a queue about to go (closing revokes, it does not assign).
        self.shared
            .messages
            .store(ptr::null_mut(), Ordering::Release);
    }
}

impl KafkaSource {
    /// Creates the consumer (automatic commits and offset stores off) of `topic` in `group`
    /// and subscribes.
    ///
    /// With `report_end`, [`Incoming::next`] returns [`Received::End`] each
    /// time a partition's end is reached (for `--until-caught-up`).
    ///
    /// Whether the brokers answer is reported to `health` (see [`report`]).
    pub fn try_new(
        cfg: &KafkaConfig,
        topic: &str,
        group: &str,
        report_end: bool,
        health: Option<Arc<Health>>,
    ) -> Result<Self, Error> {
        let topic_c = CString::new(topic)
            .map_err(|_| KafkaError::ClientCreation("a topic name with a NUL byte".into()))?;
        let shared = Arc::new(Shared {
            topic: topic.to_owned(),
            topic_c,
            watermarks: Mutex::default(),
            messages: AtomicPtr::new(ptr::null_mut()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            before_commit: std::sync::OnceLock::new(),
        });
        // librdkafka stops fetching once its queue holds queued.min.messages and, by default,
        // waits a whole second before fetching again: a consumer that drains 100,000 messages
        // in half a second then idles for the other half.
        let consumer: BaseConsumer<Context> = base_config(
            cfg,
            &[
                ("fetch.queue.backoff.ms", "10"),
                ("statistics.interval.ms", report::STATISTICS_MS),
            ],
        )
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
            report: Reporter::new(health),
        })?;
        let rk = consumer.client().native_ptr();
        // SAFETY: a live consumer; both handles are released before it (field order).
        let (messages, events) = unsafe {
            (
                Queue(rdsys::rd_kafka_queue_new(rk)),
                Queue(rdsys::rd_kafka_queue_get_consumer(rk)),
            )
        };
        if messages.0.is_null() || events.0.is_null() {
            return Err(
                KafkaError::ClientCreation("librdkafka gave no consumer queue".into()).into(),
            );
        }
        messages.wake(&shared);
        events.wake(&shared);
        shared.messages.store(messages.0, Ordering::Release);
        consumer.subscribe(&[topic])?;
        Ok(Self {
            messages,
            events,
            consumer,
            shared,
            report_end,
        })
    }

    /// Reports an error that [`Incoming::next`] returned: during an outage, once (see
    /// [`report`]); otherwise at most once a minute.
    pub fn report(&self, error: &Error) {
        self.consumer.context().report.consumer_error(&error.0);
    }

    /// The messages of the subscription, for one consuming loop at a time.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            source: self,
            batch: Batch::new(),
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

    /// Commits every position that advanced past the last confirmed commit; returns them.
    /// A synchronous commit is confirmed at once, an asynchronous one when librdkafka reports
    /// it done (until then, and after a failure, the next call sends it again).
    pub fn commit(&self, mode: CommitMode) -> Result<Vec<(i32, i64)>, CommitError> {
        // The positions first, then the hook: every record of the work they cover was written
        // before that work was finished, so the hook's fsync covers it.
        let commits = self
            .shared
            .watermarks
            .lock()
            .expect("watermarks lock")
            .pending_commits();
        if !commits.is_empty() {
            if let Some(hook) = self.shared.before_commit.get() {
                hook().map_err(CommitError::NotDurable)?;
            }
            self.consumer
                .commit(&self.shared.commit_list(&commits), mode.into())?;
            if matches!(mode, CommitMode::Sync) {
                let mut w = self.shared.watermarks.lock().expect("watermarks lock");
                commits.iter().for_each(|&(p, o)| w.confirm(p, o));
            }
            debug!(?commits, "offsets committed");
        }
        Ok(commits)
    }

    /// `hook` runs before every commit (see `Shared::before_commit`); set once.
    pub fn set_before_commit(&self, hook: BeforeCommit) {
        let _ = self.shared.before_commit.set(hook);
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
    pub fn pause(&self) -> Result<(), Error> {
        Ok(self.consumer.pause(&self.consumer.assignment()?)?)
    }

    pub fn resume(&self) -> Result<(), Error> {
        Ok(self.consumer.resume(&self.consumer.assignment()?)?)
    }

    /// Messages between the committed position and the end, per owned partition, from what
    /// is known here already: no round trip, so it never waits on a broker (a lag read that
    /// did held the consumer for up to 10 s past the end of a run). The end is the high
    /// watermark of librdkafka's last fetch; the position is the last commit the broker
    /// confirmed, else the next offset to read, else librdkafka's fetch position.
    pub fn lag(&self) -> BTreeMap<i32, i64> {
        let rk = self.consumer.client().native_ptr();
        let positions = self.consumer.position().unwrap_or_default();
        let w = self.shared.watermarks.lock().expect("watermarks lock");
        let mut out = BTreeMap::new();
        for p in w.owned() {
            let (mut low, mut high) = (-1, -1);
            // SAFETY: a live client; librdkafka only reads its cached offsets.
            let err = unsafe {
                rdsys::rd_kafka_get_watermark_offsets(
                    rk,
                    self.shared.topic_c.as_ptr(),
                    p,
                    &mut low,
                    &mut high,
                )
            };
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || high < 0 {
                continue;
            }
            let fetched = positions
                .find_partition(&self.shared.topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            if let Some(position) = w.confirmed(p).or(w.next_to_read(p)).or(fetched) {
                out.insert(p, (high - position).max(0));
            }
        }
        out
    }
}

/// `defaults`, then the operators' properties (which may override them), then the brokers.
fn base_config(cfg: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (k, v) in defaults {
        client.set(*k, *v);
    }
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client.set("bootstrap.servers", cfg.servers.join(","));
    client
}

/// Produces to one topic and waits for the broker's acknowledgement of each message.
pub struct TopicProducer {
    producer: FutureProducer<Reporter>,
    topic: String,
}

impl TopicProducer {
    /// An idempotent producer: its own retries add no duplicates.
    pub fn try_new(cfg: &KafkaConfig, topic: &str) -> Result<Self, Error> {
        let producer = base_config(cfg, &[])
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create_with_context(Reporter::default())?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends and waits until the broker has it: (partition, offset).
    pub async fn send(&self, key: Option<&str>, payload: &[u8]) -> Result<(i32, i64), Error> {
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
    ) -> Result<(), Error> {
        let admin: AdminClient<Reporter> =
            base_config(cfg, &[]).create_with_context(Reporter::default())?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = admin.create_topics([&new], &AdminOptions::new()).await;
        // Destroying a librdkafka client takes about 100 ms (its main thread's timers): not
        // on the way to consuming.
        tokio::task::spawn_blocking(move || drop(admin));
        for result in results? {
            match result {
                Ok(_) => info!(topic, partitions, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
            }
        }
        Ok(())
    }
}

impl dcflow_core::Publish for TopicProducer {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn publish<'a>(
        &'a self,
        key: Option<&'a str>,
        payload: &'a [u8],
    ) -> dcflow_core::publish::Published<'a> {
        Box::pin(async move { Ok(self.send(key, payload).await?) })
    }
}

/// Opens producers on `[kafka]`'s brokers, for `Pipeline::try_new` (the `produce` steps and
/// the dead-letter topic).
pub fn connector(
    cfg: &KafkaConfig,
) -> impl Fn(&str) -> Result<Arc<dyn dcflow_core::Publish>, dcflow_core::publish::PublishError> + Sync + '_
{
    move |topic| Ok(Arc::new(TopicProducer::try_new(cfg, topic)?))
}

/// Every message of `topic` from its beginning to its current end (the dead-letter topic, for
/// `dcflow retry`). Blocking; no group offsets are read or written.
pub fn read_topic(
    cfg: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, Error> {
    let consumer: BaseConsumer<Reporter> = base_config(cfg, &[])
        .set("group.id", "dcflow-topic-reader")
        .set("enable.auto.commit", "false")
        .create_with_context(Reporter::default())?;
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
                )
                .into())
            }
        };
        if msg.offset() + 1 >= remaining.get(&msg.partition()).copied().unwrap_or(0) {
            remaining.remove(&msg.partition());
        }
        out.push(msg.payload().unwrap_or_default().to_vec());
    }
    Ok(out)
}

/// Before a walk of what dCache holds (`dcflow sync --then-follow`): the group's position on
/// `topic`, made explicit. A partition where the group has a committed offset keeps it (what
/// came since is delivered again, and the copies are idempotent); one where it has none gets
/// the partition's current end, so that the run after the walk starts from the walk's
/// beginning, not from the topic's oldest message nor from a later end. Fails while the
/// group has members (a running dcflow): its commits would be refused. Blocking.
pub fn pin_group(
    cfg: &KafkaConfig,
    topic: &str,
    group: &str,
    timeout: Duration,
) -> Result<Vec<(i32, i64)>, Error> {
    let consumer: BaseConsumer<Reporter> = base_config(cfg, &[])
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create_with_context(Reporter::default())?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut all = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            all.add_partition(topic, p.id());
        }
    }
    if all.count() == 0 {
        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition).into());
    }
    let committed = consumer.committed_offsets(all, timeout)?;
    let mut pinned = Vec::new();
    let mut to_commit = TopicPartitionList::new();
    for e in committed.elements() {
        match e.offset() {
            Offset::Offset(o) => pinned.push((e.partition(), o)),
            _ => {
                let (_, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
                to_commit.add_partition_offset(topic, e.partition(), Offset::Offset(high))?;
                pinned.push((e.partition(), high));
            }
        }
    }
    if to_commit.count() > 0 {
        consumer.commit(&to_commit, rdkafka::consumer::CommitMode::Sync)?;
        info!(topic, group, pinned = ?pinned, "consumer group pinned: the run after the walk starts here");
    }
    Ok(pinned)
}

/// librdkafka's mock cluster, in this process: the demo's broker when none is given.
pub struct MockBroker(
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
);

impl MockBroker {
    /// One mock broker with `topic` (one partition).
    pub fn start(topic: &str) -> Result<Self, Error> {
        let mock = rdkafka::mocking::MockCluster::new(1)?;
        mock.create_topic(topic, 1, 1)?;
        Ok(Self(mock))
    }

    /// Its `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.0.bootstrap_servers()
    }
}
