//! Typed dCache billing messages, decoded from the JSON dCache publishes to Kafka.
//!
//! Wire facts (see `fixtures/billing/README.md`): keys arrive in any order, an absent key means
//! null, door messages say `"VERSION"` and the others `"version"`, `date` is RFC 3339 with a
//! variable fraction, bandwidths may be `1.8710797E8`, `isWrite` is the string `"write"` or
//! `"read"`, `pnfsid` is 36 upper-case hex characters (24 for files from the PNFS era).
//! Unknown keys and unknown message types are tolerated; a wrong type is a [`DecodeError`].

use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;

/// Why a billing message could not be decoded. Carries the reason, never panics.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid billing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid pnfsid {0:?}: expected 24 or 36 hexadecimal characters")]
    Pnfsid(String),
}

/// The `msgType` of a billing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageType {
    Transfer,
    Request,
    Remove,
    Store,
    Restore,
    Hit,
    Warning,
    /// A type this version of dcflow does not know; kept by name, never an error.
    Other(String),
}

impl MessageType {
    fn from_wire(s: &str) -> Self {
        match s {
            "transfer" => Self::Transfer,
            "request" => Self::Request,
            "remove" => Self::Remove,
            "store" => Self::Store,
            "restore" => Self::Restore,
            "hit" => Self::Hit,
            "warning" => Self::Warning,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Transfer => "transfer",
            Self::Request => "request",
            Self::Remove => "remove",
            Self::Store => "store",
            Self::Restore => "restore",
            Self::Hit => "hit",
            Self::Warning => "warning",
            Self::Other(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for MessageType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::from_wire(&s))
    }
}

/// Direction of a mover: dCache sends the strings `"write"` and `"read"` in `isWrite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Write,
    Read,
}

/// `status` of a billing message: code 0 is success.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub code: i64,
    #[serde(default)]
    pub msg: String,
}

/// A pnfsid, normalised to upper case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PnfsId(String);

impl PnfsId {
    pub fn parse(s: &str) -> Result<Self, DecodeError> {
        let ok = (s.len() == 36 || s.len() == 24) && s.bytes().all(|b| b.is_ascii_hexdigit());
        if ok {
            Ok(Self(s.to_ascii_uppercase()))
        } else {
            Err(DecodeError::Pnfsid(s.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PnfsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One billing message of any kind. Fields a kind does not carry are `None`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BillingMessage {
    /// `version` (pool, PoolManager) or `VERSION` (door).
    #[serde(alias = "VERSION")]
    pub version: Option<String>,
    pub msg_type: MessageType,
    #[serde(default, deserialize_with = "rfc3339_opt")]
    pub date: Option<OffsetDateTime>,
    pub cell_name: Option<String>,
    pub cell_type: Option<String>,
    pub cell_domain: Option<String>,
    #[serde(default)]
    pub status: Status,
    pub session: Option<String>,
    pub transaction: Option<String>,
    pub initiator: Option<String>,
    #[serde(default, rename = "pnfsid")]
    pnfsid_raw: Option<String>,
    pub billing_path: Option<String>,
    pub transfer_path: Option<String>,
    pub file_size: Option<u64>,
    /// `filesize` (lower-case s) in `hit` messages.
    #[serde(rename = "filesize")]
    pub hit_file_size: Option<u64>,
    pub transfer_size: Option<u64>,
    pub transfer_time: Option<i64>,
    pub queuing_time: Option<i64>,
    pub is_write: Option<Direction>,
    pub is_p2p: Option<bool>,
    pub mean_read_bandwidth: Option<f64>,
    pub mean_write_bandwidth: Option<f64>,
    pub storage_info: Option<String>,
    pub owner: Option<String>,
    #[serde(rename = "mappedUID")]
    pub mapped_uid: Option<i64>,
    #[serde(rename = "mappedGID")]
    pub mapped_gid: Option<i64>,
    #[serde(default)]
    pub subject: Vec<String>,
    pub client: Option<String>,
    /// The pool's `transfer` message embedded in door `request` messages (dCache >= 6.2).
    pub mover_info: Option<Box<BillingMessage>>,
    #[serde(skip)]
    pnfsid: Option<PnfsId>,
}

fn rfc3339_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| {
        OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| serde::de::Error::custom(format!("date {s:?} is not RFC 3339: {e}")))
    })
    .transpose()
}

/// The type and path of a billing message, read without building the whole message: most
/// of the billing traffic (reads, p2p, stores, hits, other folders) is dismissed on these.
/// Only a message that may announce an upload under the handled prefix is decoded in full,
/// so a wrong type in a field of an unrelated message is not reported as malformed.
#[derive(Debug, Deserialize)]
pub struct Peek<'a> {
    #[serde(rename = "msgType", borrow)]
    msg_type: std::borrow::Cow<'a, str>,
    #[serde(rename = "billingPath", borrow, default)]
    billing_path: Option<std::borrow::Cow<'a, str>>,
}

/// What a [`Peek`] tells about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glance {
    /// Neither a `transfer` nor a `request`: cannot announce an upload.
    NotUpload,
    /// A transfer or request whose billing path is not under the prefix.
    Outside,
    /// May announce an upload under the prefix: decode it in full.
    Candidate,
}

impl<'a> Peek<'a> {
    pub fn parse(json: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// Classifies against the handled namespace prefix (`pool + folder`, no trailing slash).
    pub fn glance(&self, prefix: &str) -> Glance {
        self.glance_also(prefix, &[])
    }

    /// As [`Peek::glance`], with more message types (`remove`, `store`...) that count as
    /// candidates when under the prefix.
    pub fn glance_also(&self, prefix: &str, also: &[&str]) -> Glance {
        let wanted = self.msg_type == "transfer"
            || self.msg_type == "request"
            || also.contains(&self.msg_type.as_ref());
        if !wanted {
            return Glance::NotUpload;
        }
        let under = self
            .billing_path
            .as_deref()
            .and_then(|p| p.strip_prefix(prefix))
            .is_some_and(|rest| rest.starts_with('/'));
        if under {
            Glance::Candidate
        } else {
            Glance::Outside
        }
    }
}

/// Sorts billing messages against the handled namespace prefix (`pool + folder`, no trailing
/// slash), the cheap way first.
///
/// Most of a site's billing traffic is about other folders. A message whose bytes do not
/// contain the prefix at all cannot have a billing path under it, provided that it holds no
/// JSON escape (`\/` or `\u` could spell the prefix differently). Such a message is dismissed
/// as [`Glance::Outside`] without parsing, if it is one whole JSON object by its first and last
/// bytes and valid UTF-8: a truncated or binary message is still parsed and reported as
/// malformed, since it may be a damaged upload of ours.
///
/// Under the prefix, the reads of its files are dismissed the same way, as
/// [`Glance::NotUpload`]: a message with a `"isWrite":"read"` mover and no `"write"` string
/// anywhere (every upload signal that names a direction names `"write"`). Each file dcflow
/// copies is read once, so its billing brings two of these (the door's request and the
/// pool's transfer) for every upload. Without an escape, `"isWrite":"read"` can only be that
/// key and value. Everything else gets a [`Peek`].
pub struct Selector {
    prefix: String,
    finder: memchr::memmem::Finder<'static>,
    read: memchr::memmem::Finder<'static>,
    write: memchr::memmem::Finder<'static>,
    also: Vec<&'static str>,
}

impl Selector {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            finder: memchr::memmem::Finder::new(prefix.as_bytes()).into_owned(),
            read: memchr::memmem::Finder::new(br#""isWrite":"read""#),
            write: memchr::memmem::Finder::new(br#""write""#),
            also: Vec::new(),
        }
    }

    /// Also takes these message types (`remove`, `restore`, `store`) as candidates.
    pub fn also(mut self, msg_types: &[&'static str]) -> Self {
        self.also = msg_types.to_vec();
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where `raw` stands; `Err` for a message that cannot be read as a billing message.
    pub fn glance(&self, raw: &[u8]) -> Result<Glance, DecodeError> {
        if let Some(glance) = self.first_look(raw) {
            return Ok(glance);
        }
        Ok(Peek::parse(raw)?.glance_also(&self.prefix, &self.also))
    }

    /// As [`Selector::glance`], and a candidate comes back decoded: one parse for it instead of
    /// a [`Peek`] and a decode. A message that does not decode is malformed only when its
    /// type and path make it a candidate; otherwise it is skipped, as by `glance`.
    pub fn sort(&self, raw: &[u8]) -> Result<Sorted, DecodeError> {
        if let Some(glance) = self.first_look(raw) {
            return Ok(Sorted::Skip(glance));
        }
        match BillingMessage::decode(raw) {
            Ok(msg) => {
                let peek = Peek {
                    msg_type: msg.msg_type.as_str().into(),
                    billing_path: msg.billing_path.as_deref().map(Into::into),
                };
                Ok(match peek.glance_also(&self.prefix, &self.also) {
                    Glance::Candidate => Sorted::Candidate(Box::new(msg)),
                    other => Sorted::Skip(other),
                })
            }
            Err(e) => match Peek::parse(raw)?.glance_also(&self.prefix, &self.also) {
                Glance::Candidate => Err(e),
                other => Ok(Sorted::Skip(other)),
            },
        }
    }

    /// True when `raw` certainly announces nothing under the prefix (see the type's notes).
    pub fn dismisses(&self, raw: &[u8]) -> bool {
        self.first_look(raw).is_some()
    }

    /// What the bytes alone tell: [`Glance::Outside`] or [`Glance::NotUpload`] (a read) for
    /// a message dismissed unparsed, `None` for one that must be parsed (see the type's notes).
    pub fn first_look(&self, raw: &[u8]) -> Option<Glance> {
        let body = raw.trim_ascii();
        let plain = body.first() == Some(&b'{')
            && body.last() == Some(&b'}')
            && memchr::memchr(b'\\', body).is_none();
        if !plain {
            return None;
        }
        let glance = if self.finder.find(body).is_none() {
            Glance::Outside
        } else if self.read.find(body).is_some() && self.write.find(body).is_none() {
            Glance::NotUpload
        } else {
            return None;
        };
        simdutf8::basic::from_utf8(body).is_ok().then_some(glance)
    }
}

/// What [`Selector::sort`] made of a message.
#[derive(Debug)]
pub enum Sorted {
    /// May announce an upload (or a taken event) under the prefix, decoded.
    Candidate(Box<BillingMessage>),
    /// [`Glance::NotUpload`] or [`Glance::Outside`].
    Skip(Glance),
}

/// What announced a completed upload. Door and pool messages of one upload share a pnfsid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadSignal {
    /// Pool `transfer`, `isWrite=write`, status 0, not p2p: the canonical signal.
    PoolTransfer,
    /// Door `request` embedding a successful write `moverInfo` (same upload as the pool's).
    DoorRequest,
    /// SRM `putDone` door `request` (dCache >= 10.1): the file is now at its final path.
    SrmPutDone,
}

impl UploadSignal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PoolTransfer => "pool-transfer",
            Self::DoorRequest => "door-request",
            Self::SrmPutDone => "srm-putdone",
        }
    }
}

/// A completed upload announced by a billing message.
#[derive(Debug, Clone)]
pub struct Upload {
    pub pnfsid: PnfsId,
    /// Where the file lives once committed; the path dcflow maps and fetches.
    pub billing_path: String,
    /// Where it was written; differs from `billing_path` for SRM and upload-directory flows,
    /// in which case the file appears at `billing_path` only after commit (dCache #5285).
    pub transfer_path: Option<String>,
    pub size: Option<u64>,
    pub signal: UploadSignal,
}

impl Upload {
    /// True when the file may not be visible at its billing path yet (dCache issue #5285).
    pub fn awaits_commit(&self) -> bool {
        self.transfer_path
            .as_deref()
            .is_some_and(|t| t != self.billing_path)
    }

    /// True for a message written before the file was committed at its billing path: the
    /// pool's transfer (and the door's request) of an upload-directory flow. The SRM
    /// `putDone` request is written once the commit is done: when the earlier message's copy
    /// ran out of 404 retries, the `putDone` is the one that can work.
    pub fn precedes_commit(&self) -> bool {
        self.awaits_commit() && self.signal != UploadSignal::SrmPutDone
    }
}

/// Why a decoded message does not start a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAnUpload {
    /// A kind that never announces an upload (remove, store, hit, warning, unknown...).
    Kind(String),
    /// A read (download) mover.
    Read,
    /// A pool-to-pool replication, not a client upload.
    P2p,
    /// An upload that failed: dCache's status code and message.
    Failed { code: i64, msg: String },
    /// A door request that says nothing about direction (pre-6.2, or from the billing cell
    /// without `moverInfo`): the pool's `transfer` message carries the upload.
    DoorWithoutMover,
    /// A message that would announce an upload but lacks a field it needs.
    Missing(&'static str),
}

impl NotAnUpload {
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kind(_) => "not-upload-kind",
            Self::Read => "read",
            Self::P2p => "p2p",
            Self::Failed { .. } => "failed-upload",
            Self::DoorWithoutMover => "door-without-mover",
            Self::Missing(_) => "missing-field",
        }
    }
}

impl BillingMessage {
    /// Decodes one billing message (one Kafka record value, one JSONL line).
    pub fn decode(json: &[u8]) -> Result<Self, DecodeError> {
        let mut msg: Self = serde_json::from_slice(json)?;
        msg.pnfsid = msg.pnfsid_raw.as_deref().map(PnfsId::parse).transpose()?;
        if let Some(inner) = msg.mover_info.as_mut() {
            inner.pnfsid = inner.pnfsid_raw.as_deref().map(PnfsId::parse).transpose()?;
        }
        Ok(msg)
    }

    pub fn pnfsid(&self) -> Option<&PnfsId> {
        self.pnfsid.as_ref()
    }

    fn is(&self, cell_type: &str) -> bool {
        self.cell_type.as_deref() == Some(cell_type)
    }

    /// Applies dCache's upload-complete rule: `msgType=="transfer" && cellType=="pool" &&
    /// isWrite=="write" && status.code==0 && !isP2p`; also accepts the door `request` that
    /// embeds such a mover, and the SRM `putDone` request (dCache >= 10.1).
    pub fn upload(&self) -> Result<Upload, NotAnUpload> {
        let signal = match self.msg_type {
            MessageType::Transfer if self.is("pool") => {
                mover_is_upload(self)?;
                UploadSignal::PoolTransfer
            }
            MessageType::Request if self.is("door") => {
                if self.status.code != 0 {
                    return Err(NotAnUpload::Failed {
                        code: self.status.code,
                        msg: self.status.msg.clone(),
                    });
                }
                match &self.mover_info {
                    Some(mover) => {
                        mover_is_upload(mover)?;
                        UploadSignal::DoorRequest
                    }
                    None if self.is_srm_put_done() => UploadSignal::SrmPutDone,
                    None => return Err(NotAnUpload::DoorWithoutMover),
                }
            }
            ref other => return Err(NotAnUpload::Kind(other.as_str().to_owned())),
        };
        let pnfsid = self.pnfsid.clone().ok_or(NotAnUpload::Missing("pnfsid"))?;
        let billing_path = self
            .billing_path
            .clone()
            .filter(|p| p.starts_with('/'))
            .ok_or(NotAnUpload::Missing("billingPath"))?;
        let size = match signal {
            UploadSignal::DoorRequest => self
                .file_size
                .or(self.mover_info.as_ref().and_then(|m| m.transfer_size)),
            _ => self.file_size,
        };
        Ok(Upload {
            pnfsid,
            billing_path,
            transfer_path: self.transfer_path.clone(),
            size,
            signal,
        })
    }

    /// The SRM manager's `putDone` request. Its `session` format is not documented, so the
    /// cell name is accepted as well.
    fn is_srm_put_done(&self) -> bool {
        let session = self.session.as_deref().unwrap_or("");
        let cell = self.cell_name.as_deref().unwrap_or("");
        session.contains("putDone") || cell.starts_with("SrmManager")
    }
}

/// A pool `transfer` write message, as dCache publishes one, for a file known by other means:
/// a row of the records (`dcflow retry`), a storage event or a door listing (SSE). `cell`
/// (`cellName`) says who made it up. The one builder of such messages: they go through the
/// same decoding and selection as dCache's own.
pub fn upload_message(cell: &str, pnfsid: &str, path: &str, size: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": "1.0", "msgType": "transfer", "cellType": "pool", "cellName": cell,
        "isWrite": "write", "isP2p": false, "status": {"code": 0, "msg": ""},
        "pnfsid": pnfsid, "billingPath": path, "transferPath": path,
        "fileSize": size,
    }))
    .expect("JSON")
}

fn mover_is_upload(mover: &BillingMessage) -> Result<(), NotAnUpload> {
    if mover.msg_type != MessageType::Transfer {
        return Err(NotAnUpload::Kind(mover.msg_type.as_str().to_owned()));
    }
    match mover.is_write {
        Some(Direction::Write) => {}
        Some(Direction::Read) => return Err(NotAnUpload::Read),
        None => return Err(NotAnUpload::Missing("isWrite")),
    }
    if mover.is_p2p == Some(true) {
        return Err(NotAnUpload::P2p);
    }
    if mover.status.code != 0 {
        return Err(NotAnUpload::Failed {
            code: mover.status.code,
            msg: mover.status.msg.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> BillingMessage {
        let path = format!(
            "{}/../../fixtures/billing/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        BillingMessage::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_fixture_decodes_to_its_kind() {
        let cases = [
            ("hit-poolmanager.json", MessageType::Hit),
            ("remove-door.json", MessageType::Remove),
            ("remove-pool.json", MessageType::Remove),
            ("request-door-download.json", MessageType::Request),
            (
                "request-door-get-incomplete-file.json",
                MessageType::Request,
            ),
            ("request-door-upload-pre-6.2.json", MessageType::Request),
            ("request-door-upload-via-billing.json", MessageType::Request),
            ("request-door-upload.json", MessageType::Request),
            ("request-srm-putdone.json", MessageType::Request),
            ("restore-pool.json", MessageType::Restore),
            ("store-pool.json", MessageType::Store),
            ("transfer-pool-download.json", MessageType::Transfer),
            ("transfer-pool-p2p.json", MessageType::Transfer),
            ("transfer-pool-upload-failed.json", MessageType::Transfer),
            ("transfer-pool-upload.json", MessageType::Transfer),
            ("warning-poolmanager.json", MessageType::Warning),
        ];
        for (name, kind) in cases {
            assert_eq!(fixture(name).msg_type, kind, "{name}");
        }
    }

    #[test]
    fn upload_rule_follows_dcache() {
        let up = fixture("transfer-pool-upload.json").upload().unwrap();
        assert_eq!(up.signal, UploadSignal::PoolTransfer);
        assert_eq!(up.pnfsid.as_str(), "00004F0AF7BEAE5A4CBEBF0FBF036D01F4C4");
        assert_eq!(up.billing_path, "/pnfs/in2p3.fr/data/doma/testWebdav");
        assert_eq!(up.size, Some(119936222));
        assert!(!up.awaits_commit());

        let door = fixture("request-door-upload.json").upload().unwrap();
        assert_eq!(door.signal, UploadSignal::DoorRequest);
        assert_eq!(
            door.pnfsid, up.pnfsid,
            "door and pool describe the same upload"
        );

        let srm = fixture("request-srm-putdone.json").upload().unwrap();
        assert_eq!(srm.signal, UploadSignal::SrmPutDone);
        assert!(srm.awaits_commit());
        assert!(
            !srm.precedes_commit(),
            "putDone comes once the file is committed"
        );
        assert!(!up.precedes_commit());
        assert_eq!(srm.billing_path, "/pnfs/in2p3.fr/data/doma/run042.root");

        let not = |n: &str| fixture(n).upload().unwrap_err();
        assert_eq!(not("transfer-pool-download.json"), NotAnUpload::Read);
        assert_eq!(not("request-door-download.json"), NotAnUpload::Read);
        assert_eq!(not("transfer-pool-p2p.json"), NotAnUpload::P2p);
        assert!(matches!(
            not("transfer-pool-upload-failed.json"),
            NotAnUpload::Failed { code: 10004, .. }
        ));
        assert!(matches!(
            not("request-door-get-incomplete-file.json"),
            NotAnUpload::Failed { code: 10022, .. }
        ));
        assert_eq!(
            not("request-door-upload-pre-6.2.json"),
            NotAnUpload::DoorWithoutMover
        );
        assert_eq!(
            not("request-door-upload-via-billing.json"),
            NotAnUpload::DoorWithoutMover
        );
        for n in [
            "remove-door.json",
            "remove-pool.json",
            "store-pool.json",
            "restore-pool.json",
        ] {
            assert!(matches!(not(n), NotAnUpload::Kind(_)), "{n}");
        }
        assert!(matches!(not("hit-poolmanager.json"), NotAnUpload::Kind(_)));
        assert!(matches!(
            not("warning-poolmanager.json"),
            NotAnUpload::Kind(_)
        ));
    }

    #[test]
    fn wire_details() {
        let m = fixture("transfer-pool-upload.json");
        assert_eq!(m.mean_write_bandwidth, Some(1.8710797E8));
        assert_eq!(m.version.as_deref(), Some("1.0"));
        assert_eq!(m.date.unwrap().offset().whole_hours(), 2);
        let door = fixture("request-door-upload.json");
        assert_eq!(
            door.version.as_deref(),
            Some("1.0"),
            "VERSION upper case on doors"
        );
        assert_eq!(door.mapped_uid, Some(3915));
        assert_eq!(
            fixture("hit-poolmanager.json").hit_file_size,
            Some(119936222)
        );
    }

    #[test]
    fn tolerant_of_order_unknown_keys_and_types_and_dates() {
        let json = br#"{"newKey":[1,2],"status":{"msg":"","code":0},"isP2p":false,
            "isWrite":"write","cellType":"pool","msgType":"transfer",
            "pnfsid":"0000abcdefabcdefabcdefabcdefabcdef12","billingPath":"/a/b",
            "date":"2024-01-02T03:04:05Z"}"#;
        let m = BillingMessage::decode(json).unwrap();
        assert_eq!(
            m.pnfsid().unwrap().as_str(),
            "0000ABCDEFABCDEFABCDEFABCDEFABCDEF12"
        );
        assert!(m.upload().is_ok());
        for date in [
            "2024-01-02T03:04:05.1+02:00",
            "2024-01-02T03:04:05.123456789-05:30",
        ] {
            let j = format!(r#"{{"msgType":"x","date":"{date}"}}"#);
            assert!(
                BillingMessage::decode(j.as_bytes()).unwrap().date.is_some(),
                "{date}"
            );
        }
        let other = BillingMessage::decode(br#"{"msgType":"newkind"}"#).unwrap();
        assert_eq!(other.msg_type, MessageType::Other("newkind".into()));
    }

    #[test]
    fn peek_dismisses_unrelated_traffic_cheaply() {
        let prefix = "/pnfs/in2p3.fr/data/doma";
        let glance = |name: &str| {
            let path = format!(
                "{}/../../fixtures/billing/{name}",
                env!("CARGO_MANIFEST_DIR")
            );
            let bytes = std::fs::read(path).unwrap();
            Peek::parse(&bytes).unwrap().glance(prefix)
        };
        assert_eq!(glance("transfer-pool-upload.json"), Glance::Candidate);
        assert_eq!(glance("request-door-upload.json"), Glance::Candidate);
        assert_eq!(glance("request-srm-putdone.json"), Glance::Candidate);
        assert_eq!(glance("store-pool.json"), Glance::NotUpload);
        assert_eq!(glance("hit-poolmanager.json"), Glance::NotUpload);
        assert_eq!(glance("remove-pool.json"), Glance::NotUpload);
        let outside = br#"{"msgType":"transfer","billingPath":"/pnfs/in2p3.fr/data/domain/x"}"#;
        assert_eq!(
            Peek::parse(outside).unwrap().glance(prefix),
            Glance::Outside
        );
        let escaped = br#"{"msgType":"transfer","billingPath":"\/pnfs\/in2p3.fr\/data\/doma\/x"}"#;
        assert_eq!(
            Peek::parse(escaped).unwrap().glance(prefix),
            Glance::Candidate,
            "escapes are decoded"
        );
        for bad in [&b"{"[..], b"[1]", br#"{"msgType":7}"#, b"{}"] {
            assert!(Peek::parse(bad).is_err());
        }
    }

    /// The bad-input corpus and every input the fuzzer ever crashed on (scripts/fuzz.sh keeps
    /// them under fixtures/bad-input/fuzz/) decode or fail cleanly; configurations likewise.
    #[test]
    fn the_bad_input_corpus_and_kept_fuzz_findings_never_panic() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/bad-input");
        let corpus = std::fs::read(format!("{root}/billing-corpus.jsonl")).unwrap();
        let mut inputs: Vec<Vec<u8>> = corpus.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        let kept = |target: &str| -> Vec<Vec<u8>> {
            std::fs::read_dir(format!("{root}/fuzz/{target}"))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| std::fs::read(e.path()).unwrap())
                        .collect()
                })
                .unwrap_or_default()
        };
        inputs.extend(kept("billing_message"));
        assert!(inputs.len() > 30);
        let selector = Selector::new("/pnfs/example.org/data/lsst");
        for raw in &inputs {
            let _ = selector.glance(raw);
            if let Ok(m) = BillingMessage::decode(raw) {
                let _ = m.upload();
            }
        }
        for raw in kept("config") {
            if let Ok(text) = std::str::from_utf8(&raw) {
                let _ = crate::Config::from_toml(text, &crate::Env::default());
            }
        }
    }

    #[test]
    fn sort_agrees_with_glance_and_decodes_candidates_in_one_go() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/billing");
        let mut candidates = 0;
        for prefix in ["/pnfs/in2p3.fr/data/doma", "/pnfs/other/x"] {
            let selector = Selector::new(prefix).also(&["remove"]);
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let raw = std::fs::read(&path).unwrap();
                let glance = selector.glance(&raw).unwrap();
                match selector.sort(&raw).unwrap() {
                    Sorted::Candidate(msg) => {
                        candidates += 1;
                        assert_eq!(glance, Glance::Candidate, "{path:?}");
                        let again = BillingMessage::decode(&raw).unwrap();
                        assert_eq!(format!("{msg:?}"), format!("{again:?}"), "{path:?}");
                    }
                    Sorted::Skip(g) => assert_eq!(g, glance, "{path:?} under {prefix}"),
                }
            }
        }
        assert!(candidates >= 5, "{candidates}");
        // A field of the wrong type: malformed in a candidate, no matter in anything else.
        let selector = Selector::new("/pnfs/in2p3.fr/data/doma");
        let bad_size =
            br#"{"msgType":"transfer","billingPath":"/pnfs/in2p3.fr/data/doma/x","fileSize":"big"}"#;
        assert!(selector.sort(bad_size).is_err());
        let bad_hit = br#"{"msgType":"hit","billingPath":"/pnfs/in2p3.fr/data/doma/x","status":7}"#;
        assert!(matches!(
            selector.sort(bad_hit).unwrap(),
            Sorted::Skip(Glance::NotUpload)
        ));
        let bad_type = br#"{"msgType":3,"billingPath":"/pnfs/in2p3.fr/data/doma/x"}"#;
        assert!(selector.sort(bad_type).is_err());
    }

    #[test]
    fn selector_dismisses_only_what_a_peek_would_not_select() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/billing");
        let mut fixtures = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                fixtures.push(std::fs::read(path).unwrap());
            }
        }
        assert!(fixtures.len() >= 16);
        let mut dismissed = std::collections::BTreeMap::new();
        let mut reads = std::collections::BTreeMap::new();
        for prefix in ["/pnfs/in2p3.fr/data/doma", "/pnfs/other/x"] {
            let selector = Selector::new(prefix);
            for raw in &fixtures {
                let peek = Peek::parse(raw).unwrap().glance(prefix);
                let fast = selector.glance(raw).unwrap();
                match selector.first_look(raw) {
                    Some(Glance::Outside) => {
                        *dismissed.entry(prefix).or_insert(0) += 1;
                        assert_ne!(peek, Glance::Candidate, "{prefix}");
                        assert_eq!(fast, Glance::Outside);
                    }
                    Some(glance) => {
                        // A read under the prefix: a candidate by type and path, and no
                        // upload once decoded.
                        *reads.entry(prefix).or_insert(0) += 1;
                        assert_eq!((glance, fast), (Glance::NotUpload, Glance::NotUpload));
                        let msg = BillingMessage::decode(raw).unwrap();
                        assert!(msg.upload().is_err(), "{msg:?}");
                        assert!(selector.dismisses(raw));
                    }
                    None => {
                        assert!(!selector.dismisses(raw));
                        assert_eq!(fast, peek);
                    }
                }
            }
        }
        // Under another folder every fixture is dismissed unparsed; under the fixtures' own
        // folder only those that name no path in it ("Unknown", /upload/...).
        assert_eq!(dismissed["/pnfs/other/x"], fixtures.len());
        assert!(
            dismissed
                .get("/pnfs/in2p3.fr/data/doma")
                .copied()
                .unwrap_or(0)
                <= 3
        );
        // The door's and the pool's billing of a download.
        assert_eq!(reads.get("/pnfs/in2p3.fr/data/doma"), Some(&2));
        assert_eq!(reads.get("/pnfs/other/x"), None);

        let selector = Selector::new("/pnfs/in2p3.fr/data/doma");
        let escaped = br#"{"msgType":"transfer","billingPath":"\/pnfs\/in2p3.fr\/data\/doma\/x"}"#;
        assert!(!selector.dismisses(escaped), "escapes are parsed");
        assert_eq!(selector.glance(escaped).unwrap(), Glance::Candidate);
        // Damaged messages (truncated, not an object, not UTF-8) are parsed, and so reported,
        // whatever they mention.
        for damaged in [
            &br#"{"msgType":"transfer","billingPath":"/pnfs/x"#[..],
            b"  not json at all }",
            b"{\"msgType\":\"trans\xff\xfefer\"}",
        ] {
            assert!(!selector.dismisses(damaged));
            assert!(selector.glance(damaged).is_err());
        }
        // A whole object about another folder is dismissed, whatever else it holds.
        assert!(selector.dismisses(br#" {"msgType":"transfer","billingPath":"/pnfs/x"} "#));
        // A read is dismissed only when nothing in it says "write", and only unescaped.
        let path = r#""billingPath":"/pnfs/in2p3.fr/data/doma/x""#;
        for (json, read) in [
            (
                format!(r#"{{"msgType":"transfer",{path},"isWrite":"read"}}"#),
                true,
            ),
            (
                format!(r#"{{"msgType":"transfer",{path},"isWrite": "read"}}"#),
                false,
            ),
            (
                format!(
                    r#"{{"msgType":"request",{path},"moverInfo":{{"isWrite":"write"}},"x":{{"isWrite":"read"}}}}"#
                ),
                false,
            ),
            (
                format!(
                    r#"{{"msgType":"transfer",{path},"isWrite":"\u0077rite","note":"\"isWrite\":\"read\""}}"#
                ),
                false,
            ),
        ] {
            assert_eq!(
                selector.first_look(json.as_bytes()).is_some(),
                read,
                "{json}"
            );
        }
    }

    #[test]
    fn bad_input_is_an_error_with_a_reason() {
        let cases: [&[u8]; 8] = [
            b"",
            b"{",
            b"[1,2]",
            br#"{"msgType":7}"#,
            br#"{"msgType":"transfer","fileSize":"big"}"#,
            br#"{"msgType":"transfer","isWrite":"sideways"}"#,
            br#"{"msgType":"transfer","pnfsid":"../../etc"}"#,
            br#"{"msgType":"transfer","date":"yesterday"}"#,
        ];
        for c in cases {
            let err = BillingMessage::decode(c).unwrap_err();
            assert!(!err.to_string().is_empty());
        }
        let err = BillingMessage::decode(br#"{"msgType":"transfer","fileSize":"big"}"#);
        assert!(err.unwrap_err().to_string().contains("invalid type"));
    }
}
