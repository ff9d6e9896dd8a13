//! Admission: one raw message in, one decision out. Decode (a malformed message is recorded
//! and skipped), select (type, folder, workflow rules), merge what one upload announces
//! twice (the door `request` and the pool `transfer`, replays, redeliveries) and take a
//! transfer permit, so that a full pool of `maxdownloads` pauses the source instead of
//! growing a queue.

use std::sync::atomic::Ordering;

use dcflow_core::workflow::EventKind;
use dcflow_core::{BillingMessage, DecodeError, Glance, PnfsId, Record, Sorted};
use dcflow_transfer::engine::human_bytes;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, error, info, warn};

use crate::pipeline::{Pipeline, Unrecorded};
use crate::seen::{Seen, SeenKey};
use crate::stats::Stats;

/// What to do with one message.
pub enum Admission {
    /// Copy it.
    Run(Box<Task>),
    /// Its failure could not be recorded: it must not be acknowledged (the pipeline halts).
    Unrecorded,
    /// The same upload (same pnfsid) is being copied: acknowledge this message only once that
    /// copy ended (`Merged::wait`), never before, or a crash could lose the file.
    Merged(Merged),
    /// Nothing to do (skipped, or recorded as a failure).
    Skip,
}

/// A message merged into the copy of the same upload.
pub struct Merged(watch::Receiver<bool>);

impl Merged {
    /// Returns when the copy it was merged into has ended: true when its outcome is recorded
    /// (copied, or failed and recorded), false when the record could not be written (the
    /// message must then not be acknowledged).
    pub async fn wait(mut self) -> bool {
        // The sender is dropped when the copy ends: changed() then returns an error.
        while self.0.changed().await.is_ok() {}
        let recorded = *self.0.borrow();
        recorded
    }
}

/// Event fields rules and steps use, besides the upload's own.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    pub(crate) storage_info: Option<String>,
    pub(crate) owner: Option<String>,
    pub(crate) uid: Option<i64>,
}

/// An upload that passed selection, with the permit that lets it run.
/// The file an event is about: an upload, or a remove, restore or store.
#[derive(Debug, Clone)]
pub(crate) struct Subject {
    pub(crate) kind: EventKind,
    /// Which message said so (`pool`, `door`, `srm`...), for logs.
    pub(crate) signal: &'static str,
    /// The file may not be visible at its billing path yet (dCache #5285).
    pub(crate) awaits_commit: bool,
    /// Written before the commit (not the SRM `putDone` that follows it): kept apart from
    /// the messages of the same file that follow the commit, see [`SeenKey`].
    pub(crate) precedes_commit: bool,
    pub(crate) pnfsid: PnfsId,
    pub(crate) billing_path: String,
    pub(crate) size: Option<u64>,
    /// dCache's checksums from the listing that found the file (`dcflow sync`), if any.
    pub(crate) listed_checksums: Vec<dcflow_transfer::Checksum>,
}

pub struct Task {
    pub(crate) upload: Subject,
    pub(crate) mapped: dcflow_core::Mapped,
    /// The matching workflows (indices into the pipeline's list).
    pub(crate) workflows: Vec<usize>,
    pub(crate) facts: Facts,
    /// The billing message, for the dead-letter topic.
    pub(crate) raw: Vec<u8>,
    pub(crate) origin: String,
    /// Set to "recorded" and dropped when the copy ends: wakes the messages merged into it.
    pub(crate) ended: watch::Sender<bool>,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl Pipeline {
    /// The cheap first look ([`Selector::first_look`]): true for a message that cannot
    /// concern the handled folder, or that reads a file in it; the others go to
    /// [`Pipeline::admit`]. Count the dismissed ones with [`Pipeline::dismissed`].
    pub fn dismisses(&self, raw: &[u8]) -> bool {
        match self.selector.first_look(raw) {
            Some(Glance::NotUpload) => {
                self.dismissed_reads.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    /// `count` messages were dismissed by [`Pipeline::dismisses`]: counted as reads (not
    /// uploads) or as outside the folder.
    pub fn dismissed(&self, count: u32) {
        let reads = self.dismissed_reads.swap(0, Ordering::Relaxed).min(count);
        self.stats.events.inc_by(count.into());
        self.stats.not_upload.inc_by(reads.into());
        self.stats.outside_folder.inc_by((count - reads).into());
    }

    /// Decodes and selects one raw message. Returns a task to run, or `None` when the message
    /// was skipped or recorded. Waits for a free transfer slot before returning a task.
    ///
    /// `origin` (where the message came from, for logs and records) is formatted only when
    /// it is needed: most messages are dismissed without it.
    // Long on purpose: the admission decisions in the order they are taken (decode, kind,
    // folder, rules, escape, merge, permit); each returns early.
    pub async fn admit(&self, raw: &[u8], origin: &(impl std::fmt::Display + ?Sized)) -> Admission {
        Stats::inc(&self.stats.events);
        // Most billing traffic is dismissed on its type and path alone.
        let msg = match self.selector.sort(raw) {
            Ok(Sorted::Candidate(msg)) => msg,
            Ok(Sorted::Skip(Glance::Outside)) => {
                Stats::inc(&self.stats.outside_folder);
                return Admission::Skip;
            }
            Ok(Sorted::Skip(_)) => {
                Stats::inc(&self.stats.not_upload);
                return Admission::Skip;
            }
            Err(e) => return self.reject_malformed(raw, &origin.to_string(), e).await,
        };
        let upload = match msg.upload() {
            Ok(u) => Subject {
                kind: EventKind::Upload,
                signal: u.signal.as_str(),
                awaits_commit: u.awaits_commit(),
                precedes_commit: u.precedes_commit(),
                pnfsid: u.pnfsid,
                billing_path: u.billing_path,
                size: u.size,
                listed_checksums: Vec::new(),
            },
            Err(why) => match self.other_event(&msg) {
                Some(subject) => subject,
                None => {
                    Stats::inc(&self.stats.not_upload);
                    debug!(
                        %origin,
                        msg_type = msg.msg_type.as_str(),
                        reason = why.reason(),
                        "not an upload: skipped"
                    );
                    return Admission::Skip;
                }
            },
        };
        let mapped = match self.mapper.map(&upload.billing_path) {
            Ok(Some(m)) => m,
            Ok(None) => {
                Stats::inc(&self.stats.outside_folder);
                debug!(%origin, path = %upload.billing_path, "outside {}: skipped", self.mapper.prefix());
                return Admission::Skip;
            }
            Err(escape) => {
                // The twin message of the same upload (door and pool) finds it refused.
                let key = (upload.kind, upload.pnfsid.clone(), upload.precedes_commit);
                {
                    let mut seen = self.seen.lock().expect("seen lock");
                    if seen.get(&key).is_some() {
                        Stats::inc(&self.stats.duplicates);
                        return Admission::Skip;
                    }
                    seen.finish(&key, Seen::Failed);
                }
                Stats::inc(&self.stats.selected);
                Stats::inc(&self.stats.failed);
                error!(pnfsid = %upload.pnfsid, %origin, "refused: {escape}");
                let record = Record {
                    pnfsid: upload.pnfsid.to_string(),
                    billing_path: upload.billing_path.clone(),
                    size: upload.size,
                    error: escape.to_string(),
                    ..Default::default()
                };
                return match self.fail(record, raw, &origin.to_string()).await {
                    Ok(()) => Admission::Skip,
                    Err(Unrecorded) => Admission::Unrecorded,
                };
            }
        };
        let facts = Facts {
            storage_info: msg.storage_info.clone(),
            owner: msg.owner.clone(),
            uid: msg.mapped_uid,
        };
        let rel = mapped.rel.join("/");
        let rule_facts = dcflow_core::workflow::Facts {
            kind: upload.kind,
            billing_path: &upload.billing_path,
            rel: Some(&rel),
            size: upload.size,
            storage_info: facts.storage_info.as_deref(),
            owner: facts.owner.as_deref(),
            uid: facts.uid,
        };
        let workflows: Vec<usize> = (0..self.workflows.len())
            .filter(|&i| self.workflows[i].matcher.matches(&rule_facts))
            .collect();
        if workflows.is_empty() {
            Stats::inc(&self.stats.unmatched);
            debug!(%origin, path = %upload.billing_path, "no workflow matches: skipped");
            return Admission::Skip;
        }
        let ended = {
            let mut seen = self.seen.lock().expect("seen lock");
            let key = (upload.kind, upload.pnfsid.clone(), upload.precedes_commit);
            match seen.get(&key).cloned() {
                Some(Seen::InFlight(copy_running)) => {
                    Stats::inc(&self.stats.duplicates);
                    debug!(pnfsid = %upload.pnfsid, signal = upload.signal, "same event being handled: merged");
                    return Admission::Merged(Merged(copy_running));
                }
                // The door's and the pool's message of one upload: whichever comes second
                // finds the first one's outcome. A failure is recorded once per delivery; it is
                // re-run by `dcflow retry`, not by its twin message.
                Some(Seen::Done) | Some(Seen::Failed) => {
                    Stats::inc(&self.stats.duplicates);
                    debug!(pnfsid = %upload.pnfsid, signal = upload.signal, "same event already handled");
                    return Admission::Skip;
                }
                _ => {
                    let (ended, copy_running) = watch::channel(false);
                    seen.start(&key, copy_running);
                    ended
                }
            }
        };
        Stats::inc(&self.stats.selected);
        let tag = match upload.kind {
            EventKind::Upload => "UPLOAD",
            EventKind::Remove => "REMOVE",
            EventKind::Restore => "RESTORE",
            EventKind::Store => "STORE",
        };
        info!(
            pnfsid = %upload.pnfsid,
            %origin,
            signal = upload.signal,
            size = upload.size,
            "{tag} {} ({})",
            upload.billing_path,
            upload.size.map(human_bytes).unwrap_or_else(|| "size unknown".into())
        );
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        Admission::Run(Box::new(Task {
            upload,
            mapped,
            workflows,
            facts,
            raw: raw.to_vec(),
            origin: origin.to_string(),
            ended,
            _permit: permit,
        }))
    }

    /// A storage event (SSE) that cannot be used: counted, logged and recorded as a failure,
    /// like a malformed billing message.
    pub async fn reject_malformed_event(
        &self,
        raw: &[u8],
        origin: &str,
        reason: &str,
    ) -> Result<(), Unrecorded> {
        Stats::inc(&self.stats.malformed);
        warn!(
            origin,
            reason, "malformed storage event skipped ({origin}): {reason}"
        );
        let record = Record::malformed_input("storage event", origin, &reason, raw);
        self.fail(record, raw, origin).await
    }

    async fn reject_malformed(&self, raw: &[u8], origin: &str, e: DecodeError) -> Admission {
        Stats::inc(&self.stats.malformed);
        warn!(origin, error = %e, "malformed billing message skipped ({origin}): {e}");
        match self
            .fail(Record::malformed(origin, &e, raw), raw, origin)
            .await
        {
            Ok(()) => Admission::Skip,
            Err(Unrecorded) => Admission::Unrecorded,
        }
    }

    pub(crate) fn mark(&self, key: &SeenKey, state: Seen) {
        self.seen.lock().expect("seen lock").finish(key, state);
    }

    /// A remove, restore or store under the folder that some workflow takes.
    fn other_event(&self, msg: &BillingMessage) -> Option<Subject> {
        use dcflow_core::event::MessageType;
        let kind = match msg.msg_type {
            MessageType::Remove => EventKind::Remove,
            MessageType::Restore => EventKind::Restore,
            MessageType::Store => EventKind::Store,
            _ => return None,
        };
        if !self.other_kinds.contains(&kind) || msg.status.code != 0 {
            return None;
        }
        Some(Subject {
            kind,
            signal: if msg.cell_type.as_deref() == Some("door") {
                "door"
            } else {
                "pool"
            },
            awaits_commit: false,
            precedes_commit: false,
            pnfsid: msg.pnfsid()?.clone(),
            billing_path: msg.billing_path.clone().filter(|p| p.starts_with('/'))?,
            size: msg.file_size.or(msg.hit_file_size),
            listed_checksums: Vec::new(),
        })
    }
}
