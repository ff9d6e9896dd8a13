//! The door's WebDAV listing, streamed: PROPFIND `Depth: 1` of one folder at a time, its
//! multistatus parsed as it arrives, so that a folder of a million entries is never held
//! whole; [`walk`] goes through a tree level by level.
//!
//! Each entry carries what dCache 12 says of a file in the same listing (seen on 12.0.1):
//! the size, the pnfsid in the ETag (`"<pnfsid>_<number>"`), `dcache:Checksums`
//! (`adler32=96d12daf`), `srm:FileLocality` (`ONLINE`, `NEARLINE`, `ONLINE_AND_NEARLINE`,
//! `LOST`, `UNAVAILABLE`), `srm:RetentionPolicy` and the modification time. dCache's
//! `NEARLINE` means "not on a pool that serves reads": on tape only, or (seen on 12.0.1) a
//! disk-only `REPLICA` file on a pool that others copy from when it is read, which a `GET`
//! reads at once and dCache's tape API refuses to stage ("Cannot stage DISK only files"):
//! only a `CUSTODIAL` file is [`Locality::Nearline`] here. Properties the door does not have for an
//! entry come back in a propstat of their own with status 404: they are ignored. Namespace
//! prefixes vary from one answer to the next (`ns1:FileLocality`): elements are matched by
//! their local name.

use std::collections::VecDeque;

use futures_util::StreamExt;
use reqwest::Method;
use tokio::sync::mpsc;
use url::Url;

use crate::checksum::Checksum;
use crate::engine::Engine;
use crate::error::TransferError;

/// The body of every PROPFIND: the properties dcflow reads.
const PROPFIND: &str = r#"<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:" xmlns:srm="http://srm.lbl.gov/StorageResourceManager" xmlns:dc="http://www.dcache.org/2013/webdav"><d:prop><d:resourcetype/><d:getcontentlength/><d:getetag/><d:getlastmodified/><dc:Checksums/><srm:FileLocality/><srm:RetentionPolicy/></d:prop></d:propfind>"#;

/// Where a file's bytes are, as dCache says (`srm:FileLocality`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locality {
    Online,
    /// On tape only: staged before it can be read.
    Nearline,
    /// dCache's `NEARLINE` for a disk-only (`REPLICA`) file: on a pool that does not serve
    /// reads, copied pool to pool when read. A `GET` works now; a stage would be refused.
    OnOtherPool,
    OnlineAndNearline,
    Lost,
    Unavailable,
    Other(String),
}

impl Locality {
    pub fn parse(s: &str) -> Self {
        match s.trim() {
            "ONLINE" => Self::Online,
            "NEARLINE" => Self::Nearline,
            "ONLINE_AND_NEARLINE" => Self::OnlineAndNearline,
            "LOST" => Self::Lost,
            "UNAVAILABLE" => Self::Unavailable,
            other => Self::Other(other.to_owned()),
        }
    }

    /// A copy can start now (a disk copy exists).
    pub fn is_online(&self) -> bool {
        matches!(
            self,
            Self::Online | Self::OnOtherPool | Self::OnlineAndNearline
        )
    }

    /// What dCache's `srm:FileLocality` means given the file's `srm:RetentionPolicy`: its
    /// `NEARLINE` is a tape-only file only when the file is `CUSTODIAL` (PoolMonitorV5 also
    /// answers `NEARLINE` for a file that is not stored but can be copied pool to pool).
    pub fn with_retention(self, retention: Option<&str>) -> Self {
        match (self, retention.map(str::trim)) {
            (Self::Nearline, Some(r)) if r != "CUSTODIAL" => Self::OnOtherPool,
            (l, _) => l,
        }
    }
}

/// One entry of a folder, as the door reports it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Entry {
    /// The path of the entry's URL on the door, percent-decoded, without a trailing `/`.
    pub path: String,
    pub is_dir: bool,
    pub size: Option<u64>,
    /// `ETag`: dCache's is `"<pnfsid>_<number>"`.
    pub etag: Option<String>,
    /// `Last-Modified`, as written (an HTTP date).
    pub modified: Option<String>,
    /// `dcache:Checksums`.
    pub checksums: Vec<Checksum>,
    /// `srm:FileLocality`, read with `srm:RetentionPolicy` ([`Locality::with_retention`]);
    /// `None` from a door that does not say.
    pub locality: Option<Locality>,
    /// `srm:RetentionPolicy` (`CUSTODIAL`, `REPLICA`).
    pub retention: Option<String>,
}

impl Entry {
    /// A file whose upload has not ended: dCache's door lists it without a size (no
    /// `getcontentlength`) and answers a GET of it with 500 until the upload is complete. Its
    /// storage event (or the next sync) comes once it is.
    pub fn being_written(&self) -> bool {
        !self.is_dir && self.size.is_none()
    }

    /// The pnfsid dCache's door puts in the ETag (milton's `uniqueId_modDateHash`, the unique
    /// id being the pnfsid): a re-uploaded path is a new file with a new pnfsid.
    pub fn pnfsid(&self) -> Option<String> {
        let tag = self.etag.as_deref()?.trim().trim_start_matches("W/");
        let id = tag.trim_matches('"').split('_').next()?;
        dcflow_core::PnfsId::parse(id).ok().map(|p| p.to_string())
    }

    /// `Last-Modified` as Unix seconds.
    pub fn modified_unix(&self) -> Option<i64> {
        let t = httpdate::parse_http_date(self.modified.as_deref()?.trim()).ok()?;
        Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
    }
}

/// Parses a multistatus as its bytes arrive: whole `response` elements are taken from the
/// front of what was fed so far; the rest waits for more bytes.
#[derive(Default)]
pub struct MultistatusParser {
    buf: Vec<u8>,
}

impl MultistatusParser {
    /// Feeds bytes; returns the entries they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Entry>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut consumed = 0;
        while let Some(end) = response_end(&self.buf[consumed..]) {
            let segment = &self.buf[consumed..consumed + end];
            if let Some(entry) = parse_response(segment)? {
                out.push(entry);
            }
            consumed += end;
        }
        self.buf.drain(..consumed);
        Ok(out)
    }

    /// The end of the body: nothing but the closing of the multistatus may be left.
    pub fn finish(self) -> Result<(), String> {
        if response_start(&self.buf).is_some() {
            return Err("the listing ended inside an entry (truncated)".into());
        }
        Ok(())
    }
}

/// The index just past the first `</prefix:response>` in `buf`.
fn response_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&buf[from..], b"</") {
        let start = from + i + 2;
        let close = memchr::memchr(b'>', &buf[start..])? + start;
        let name = &buf[start..close];
        let local = name.rsplit(|&b| b == b':').next().unwrap_or(name);
        if local.trim_ascii_end() == b"response" {
            return Some(close + 1);
        }
        from = close + 1;
    }
    None
}

/// Whether `buf` holds the start of a `response` element.
fn response_start(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'<', &buf[from..]) {
        let start = from + i + 1;
        let end = buf[start..]
            .iter()
            .position(|b| matches!(b, b'>' | b' ' | b'/'))
            .map_or(buf.len(), |e| e + start);
        let name = &buf[start..end];
        let local = name.rsplit(|&b| b == b':').next().unwrap_or(name);
        if local == b"response" {
            return Some(start);
        }
        from = start;
    }
    None
}

/// One `response` element (with whatever came before it: the XML declaration, the opening of
/// the multistatus). Elements are matched by local name; props of a propstat whose status is
/// not 200 are ignored.
fn parse_response(segment: &[u8]) -> Result<Option<Entry>, String> {
    use quick_xml::events::Event;
    let text = String::from_utf8_lossy(segment);
    let mut reader = quick_xml::Reader::from_str(&text);
    reader.config_mut().trim_text(true);
    reader.config_mut().check_end_names = false;
    let mut entry = Entry::default();
    let mut href = None::<String>;
    // The values of the current propstat, kept until its status says whether they count.
    let mut pending = Entry::default();
    let mut pending_dir = false;
    let mut current: Vec<u8> = Vec::new();
    let mut in_response = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("not a WebDAV multistatus: {e}"))?;
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                match name.as_slice() {
                    b"response" => in_response = true,
                    b"propstat" => {
                        pending = Entry::default();
                        pending_dir = false;
                    }
                    b"collection" => pending_dir = true,
                    _ => {}
                }
                current = name;
            }
            Event::Empty(e) if e.local_name().as_ref() == b"collection" => pending_dir = true,
            Event::Text(t) if in_response => {
                let value = t
                    .unescape()
                    .map_err(|e| format!("not a WebDAV multistatus: {e}"))?
                    .into_owned();
                match current.as_slice() {
                    b"href" => href = Some(value),
                    b"getcontentlength" => pending.size = value.trim().parse().ok(),
                    b"getetag" => pending.etag = Some(value),
                    b"getlastmodified" => pending.modified = Some(value),
                    b"Checksums" => pending.checksums = parse_checksums(&value),
                    b"FileLocality" => pending.locality = Some(Locality::parse(&value)),
                    b"RetentionPolicy" => pending.retention = Some(value),
                    // "HTTP/1.1 200 OK": this propstat's values are the entry's.
                    b"status" if value.split_whitespace().nth(1) == Some("200") => {
                        let p = std::mem::take(&mut pending);
                        entry.is_dir |= pending_dir;
                        entry.size = p.size.or(entry.size);
                        entry.etag = p.etag.or(entry.etag.take());
                        entry.modified = p.modified.or(entry.modified.take());
                        if !p.checksums.is_empty() {
                            entry.checksums = p.checksums;
                        }
                        entry.locality = p.locality.or(entry.locality.take());
                        entry.retention = p.retention.or(entry.retention.take());
                    }
                    _ => {}
                }
            }
            Event::End(e) => {
                if e.local_name().as_ref() == b"response" {
                    break;
                }
                current.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let Some(href) = href else {
        return Ok(None);
    };
    // hrefs may be absolute URLs or paths; either way the decoded path.
    let path = Url::parse(&href)
        .map(|u| u.path().to_owned())
        .unwrap_or(href);
    let path = percent_encoding::percent_decode_str(&path)
        .decode_utf8_lossy()
        .trim_end_matches('/')
        .to_owned();
    let locality = entry
        .locality
        .take()
        .map(|l| l.with_retention(entry.retention.as_deref()));
    Ok(Some(Entry {
        path,
        locality,
        ..entry
    }))
}

/// `adler32=96d12daf,md5=...`: the kinds dcflow knows (the `Digest` header's syntax).
fn parse_checksums(value: &str) -> Vec<Checksum> {
    Checksum::parse_digest_header(value)
}

impl Engine {
    /// PROPFIND `Depth: 1` of the folder at `url` (the door's origin only: the token goes
    /// there). Its children are sent to `tx` as they are parsed; the folder itself is not.
    /// Bounded by the transfer timeout; a stall of `stalltimeout` once the answer has begun
    /// ends it too.
    pub async fn list_folder(
        &self,
        url: &Url,
        tx: &mpsc::Sender<Entry>,
    ) -> Result<u64, TransferError> {
        let mut url = url.clone();
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let own = percent_encoding::percent_decode_str(url.path())
            .decode_utf8_lossy()
            .trim_end_matches('/')
            .to_owned();
        let settings = self.settings();
        // dCache 12.0.1 builds the whole answer before its first byte (a folder of 10,000
        // entries: 2.4 s, then 5.7 MB in 14 ms): a big folder is silent for minutes, which is
        // not a stall. The wait for the answer is bounded by `timeout` only (the request's
        // whole time); `stalltimeout` applies once the body flows.
        let resp = self
            .api(
                Method::from_bytes(b"PROPFIND").expect("method"),
                url.clone(),
            )
            .header("Depth", "1")
            .header("Content-Type", "application/xml; charset=utf-8")
            .body(PROPFIND)
            .timeout(settings.timeout)
            .send()
            .await
            .map_err(|e| self.network_error(&url, e))?;
        match resp.status().as_u16() {
            207 => {}
            404 => {
                return Err(TransferError::NotFound {
                    url: url.to_string(),
                })
            }
            401 | 403 => {
                return Err(TransferError::Auth {
                    status: resp.status().as_u16(),
                    url: url.to_string(),
                    hint: self.credentials().auth_hint(),
                })
            }
            status => {
                return Err(TransferError::Http {
                    status,
                    url: url.to_string(),
                    hint: ": PROPFIND".into(),
                })
            }
        }
        let mut parser = MultistatusParser::default();
        let mut body = resp.bytes_stream();
        let mut sent = 0u64;
        loop {
            let chunk = tokio::time::timeout(settings.stall_timeout, body.next())
                .await
                .map_err(|_| TransferError::Stalled {
                    seconds: settings.stall_timeout.as_secs(),
                })?;
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| self.network_error(&url, e))?;
            let entries = parser.feed(&chunk).map_err(|why| TransferError::Http {
                status: 207,
                url: url.to_string(),
                hint: format!(": {why}"),
            })?;
            for entry in entries {
                if entry.path == own {
                    continue;
                }
                sent += 1;
                if tx.send(entry).await.is_err() {
                    return Ok(sent); // the receiver stopped listening
                }
            }
        }
        parser.finish().map_err(|why| TransferError::Http {
            status: 207,
            url: url.to_string(),
            hint: format!(": {why}"),
        })?;
        Ok(sent)
    }
}

/// Every entry below the folder at `root`, level by level: files and folders alike are sent
/// to `tx` (a folder before what it holds). Only the folders still to be listed are kept
/// (their URLs), never a whole level's files.
pub async fn walk(
    engine: &Engine,
    root: &Url,
    tx: mpsc::Sender<Entry>,
) -> Result<u64, TransferError> {
    let mut folders = VecDeque::from([root.clone()]);
    let mut listed = 0u64;
    while let Some(folder) = folders.pop_front() {
        let (ftx, mut frx) = mpsc::channel::<Entry>(256);
        // The listing owns the sender: the channel closes when the listing ends.
        let here = folder.clone();
        let listing = async move { engine.list_folder(&here, &ftx).await };
        let forward = async {
            while let Some(entry) = frx.recv().await {
                if entry.is_dir {
                    let mut url = folder.clone();
                    url.set_path(&encode_path(&entry.path));
                    folders.push_back(url);
                }
                if tx.send(entry).await.is_err() {
                    return false;
                }
            }
            true
        };
        let (listed_here, go_on) = tokio::join!(listing, forward);
        listed += listed_here?;
        if !go_on {
            break;
        }
    }
    Ok(listed)
}

/// A decoded URL path, each segment percent-encoded again.
fn encode_path(path: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'?')
        .add(b'<')
        .add(b'>')
        .add(b'`')
        .add(b'{')
        .add(b'}');
    let mut out: String = path
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/");
    out.push('/');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What dCache 12.0.1's door answered (shortened), with its namespace prefixes and the
    /// 404 propstat of the properties a file lacks.
    const DCACHE: &str = r#"<?xml version="1.0" encoding="utf-8" ?>
<d:multistatus xmlns:cal="urn:ietf:params:xml:ns:caldav" xmlns:d="DAV:"><d:response><d:href>/public/run001/</d:href><d:propstat><d:prop><d:resourcetype><d:collection/></d:resourcetype><d:getetag>"00004EA52D868B7C43DF9C01ACD1F03CAEA6_1105998741"</d:getetag><d:getlastmodified>Fri, 04 Dec 2026 16:38:48 GMT</d:getlastmodified></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat><d:propstat><d:prop><FileLocality/><Checksums/><d:getcontentlength/></d:prop><d:status>HTTP/1.1 404 Not Found</d:status></d:propstat></d:response><d:response><d:href>/public/run001/image-0005.fits</d:href><d:propstat><d:prop><ns1:FileLocality xmlns:ns1="http://srm.lbl.gov/StorageResourceManager">ONLINE</ns1:FileLocality><d:getcontentlength>4197035</d:getcontentlength><d:getetag>"0000003AD37EF61B4D10886BFB5164BD99F9_1105998182"</d:getetag><ns2:Checksums xmlns:ns2="http://www.dcache.org/2013/webdav">adler32=96d12daf</ns2:Checksums><d:getlastmodified>Fri, 04 Dec 2026 16:38:47 GMT</d:getlastmodified></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat><d:propstat><d:prop><d:resourcetype/></d:prop><d:status>HTTP/1.1 404 Not Found</d:status></d:propstat></d:response><d:response><d:href>/public/run001/with%20space%201.dat</d:href><d:propstat><d:prop><ns1:FileLocality xmlns:ns1="http://srm.lbl.gov/StorageResourceManager">NEARLINE</ns1:FileLocality><d:getcontentlength>3824</d:getcontentlength></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response></d:multistatus>"#;

    /// dCache 12.0.1's answers for a disk-only file on `pool_write` (which does not serve
    /// reads) and for a flushed file on `/tape`: both NEARLINE, only the CUSTODIAL one on tape.
    #[test]
    fn a_replica_file_s_nearline_is_not_tape() {
        let xml = r#"<?xml version="1.0" encoding="utf-8" ?>
<d:multistatus xmlns:ns1="http://srm.lbl.gov/StorageResourceManager" xmlns:d="DAV:"><d:response><d:href>/public/beside/d-0.raw</d:href><d:propstat><d:prop><ns1:FileLocality>NEARLINE</ns1:FileLocality><ns1:RetentionPolicy>REPLICA</ns1:RetentionPolicy></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response><d:response><d:href>/tape/t-0.raw</d:href><d:propstat><d:prop><ns1:FileLocality>NEARLINE</ns1:FileLocality><ns1:RetentionPolicy>CUSTODIAL</ns1:RetentionPolicy></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response><d:response><d:href>/other/n.raw</d:href><d:propstat><d:prop><ns1:FileLocality>NEARLINE</ns1:FileLocality></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response></d:multistatus>"#;
        let e = parse_in_chunks(xml.as_bytes(), 37);
        assert_eq!(e[0].locality, Some(Locality::OnOtherPool));
        assert!(e[0].locality.as_ref().is_some_and(Locality::is_online));
        assert_eq!(e[1].locality, Some(Locality::Nearline));
        assert_eq!(e[1].retention.as_deref(), Some("CUSTODIAL"));
        // A door that does not say: NEARLINE is taken at its word.
        assert_eq!(e[2].locality, Some(Locality::Nearline));
    }

    fn parse_in_chunks(xml: &[u8], chunk: usize) -> Vec<Entry> {
        let mut p = MultistatusParser::default();
        let mut out = Vec::new();
        for c in xml.chunks(chunk) {
            out.extend(p.feed(c).unwrap());
        }
        p.finish().unwrap();
        out
    }

    #[test]
    fn dcache_s_listing_parses_whatever_the_chunks() {
        let whole = parse_in_chunks(DCACHE.as_bytes(), DCACHE.len());
        assert_eq!(whole.len(), 3);
        assert!(whole[0].is_dir && whole[0].path == "/public/run001");
        let f = &whole[1];
        assert!(!f.is_dir);
        assert_eq!(f.path, "/public/run001/image-0005.fits");
        assert_eq!(f.size, Some(4197035));
        assert_eq!(
            f.pnfsid().as_deref(),
            Some("0000003AD37EF61B4D10886BFB5164BD99F9")
        );
        assert_eq!(f.checksums.len(), 1);
        assert_eq!(f.checksums[0].to_string(), "adler32:96d12daf");
        assert_eq!(f.locality, Some(Locality::Online));
        assert_eq!(f.modified_unix(), Some(1796402327));
        assert_eq!(whole[2].path, "/public/run001/with space 1.dat");
        assert_eq!(whole[2].locality, Some(Locality::Nearline));
        for chunk in [1, 2, 7, 64, 1000] {
            assert_eq!(
                parse_in_chunks(DCACHE.as_bytes(), chunk),
                whole,
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_listing_cut_inside_an_entry_is_an_error_and_memory_stays_one_entry() {
        let mut p = MultistatusParser::default();
        let cut = &DCACHE.as_bytes()[..DCACHE.len() - 200];
        assert_eq!(p.feed(cut).unwrap().len(), 2);
        assert!(
            p.buf.len() < 600,
            "only the unfinished entry is kept: {}",
            p.buf.len()
        );
        assert!(p.finish().is_err());
    }
}
