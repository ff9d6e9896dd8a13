//! The door's WebDAV listing (PROPFIND, Depth 1) and the upload message of a file that a
//! storage event or a listing reports.

use anyhow::{bail, Context as _, Result};
use md5::{Digest, Md5};
use reqwest::Method;
use url::Url;

use crate::Source;

impl Source {
    /// The door URL of a namespace path.
    pub(crate) fn door_url(&self, ns_path: &str) -> Result<Url> {
        let rel = ns_path
            .strip_prefix(&self.pool)
            .with_context(|| format!("{ns_path} is not under {}", self.pool))?;
        let mut url = self.door.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| anyhow::anyhow!("door URL cannot have a path"))?;
            segs.pop_if_empty();
            for part in rel.split('/').filter(|p| !p.is_empty()) {
                segs.push(part);
            }
        }
        Ok(url)
    }

    /// PROPFIND Depth 1: each child, by namespace path.
    pub(crate) async fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let mut url = self.door_url(dir)?;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let resp = self
            .api(Method::from_bytes(b"PROPFIND").expect("method"), url.clone())
            .header("Depth", "1")
            .header("Content-Type", "application/xml")
            .body(r#"<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/><d:getcontentlength/><d:getetag/><d:getlastmodified/></d:prop></d:propfind>"#)
            // A listing of many entries takes a while: bounded by the transfer timeout.
            .timeout(self.pipeline.engine().settings().timeout)
            .send()
            .await
            .with_context(|| format!("PROPFIND {url}"))?;
        if resp.status().as_u16() != 207 {
            bail!("PROPFIND {url}: {}", resp.status());
        }
        let xml = resp.text().await?;
        let own = percent_encoding::percent_decode_str(url.path())
            .decode_utf8_lossy()
            .trim_end_matches('/')
            .to_owned();
        let mut out = Vec::new();
        for entry in parse_multistatus(&xml)? {
            let path = percent_encoding::percent_decode_str(&entry.path)
                .decode_utf8_lossy()
                .into_owned();
            // hrefs may be absolute URLs or paths.
            let path = Url::parse(&path)
                .map(|u| u.path().to_owned())
                .unwrap_or(path);
            let trimmed = path.trim_end_matches('/');
            if trimmed == own || trimmed.is_empty() {
                continue;
            }
            let door_base = self.door.path().trim_end_matches('/');
            let rel = trimmed.strip_prefix(door_base).unwrap_or(trimmed);
            out.push(Entry {
                path: format!("{}{}", self.pool, rel),
                ..entry
            });
        }
        Ok(out)
    }
}

/// One entry of a directory: not empty, not `.` or `..`, without `/` or NUL.
pub(crate) fn plain_name(name: &str) -> bool {
    !matches!(name, "" | "." | "..") && !name.contains(['/', '\0'])
}

/// One entry of a directory listing (or a HEAD), as the door reports it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The namespace path (the href, in [`parse_multistatus`]).
    pub(crate) path: String,
    pub(crate) is_dir: bool,
    pub(crate) size: Option<u64>,
    /// `ETag`: dCache's is `"<pnfsid>_<number>"`.
    pub(crate) etag: Option<String>,
    /// `Last-Modified`.
    pub(crate) modified: Option<String>,
}

impl Entry {
    /// The pnfsid dCache's door puts in the ETag (milton's `uniqueId_modDateHash`, the
    /// unique id being the pnfsid): a re-uploaded path is a new file with a new pnfsid.
    pub(crate) fn pnfsid(&self) -> Option<String> {
        let tag = self.etag.as_deref()?.trim().trim_start_matches("W/");
        let id = tag.trim_matches('"').split('_').next()?;
        dcflow_core::PnfsId::parse(id).ok().map(|p| p.to_string())
    }
}

/// A billing-like upload message for a file reported complete by a storage event or found by
/// a resynchronisation. The pnfsid is dCache's (from the ETag) or, for a door that gives none,
/// a stand-in: 36 hex digits of a hash of the path, the size and the ETag or modification
/// time, the same for one file whoever reports it and new for a re-upload.
pub(crate) fn upload_message(entry: &Entry) -> Vec<u8> {
    let pnfsid = entry.pnfsid().unwrap_or_else(|| {
        let mut h = Md5::new();
        h.update(b"dcflow-sse\0");
        h.update(entry.path.as_bytes());
        h.update(b"\0");
        h.update(
            entry
                .size
                .map(|s| s.to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(b"\0");
        h.update(
            entry
                .etag
                .as_deref()
                .or(entry.modified.as_deref())
                .unwrap_or("")
                .as_bytes(),
        );
        let digest: [u8; 16] = h.finalize().into();
        let hex: String = digest.iter().map(|b| format!("{b:02X}")).collect();
        format!("0000{hex}")
    });
    dcflow_core::upload_message("sse", &pnfsid, &entry.path, entry.size)
}

/// Each response of a WebDAV multistatus (href as given).
pub(crate) fn parse_multistatus(xml: &str) -> Result<Vec<Entry>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    let mut out = Vec::new();
    let mut entry = Entry::default();
    let mut href = None::<String>;
    let mut current: Vec<u8> = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_vec();
                if name == b"response" {
                    entry = Entry::default();
                    href = None;
                }
                if name == b"collection" {
                    entry.is_dir = true;
                }
                current = name;
            }
            Event::Empty(e) if e.local_name().as_ref() == b"collection" => entry.is_dir = true,
            Event::Text(t) => {
                let text = t.unescape()?.into_owned();
                match current.as_slice() {
                    b"href" => href = Some(text),
                    b"getcontentlength" => entry.size = text.trim().parse().ok(),
                    b"getetag" => entry.etag = Some(text),
                    b"getlastmodified" => entry.modified = Some(text),
                    _ => {}
                }
            }
            Event::End(e) => {
                if e.local_name().as_ref() == b"response" {
                    if let Some(h) = href.take() {
                        out.push(Entry {
                            path: h,
                            ..std::mem::take(&mut entry)
                        });
                    }
                }
                current.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multistatus_and_stand_in_ids() {
        let xml = r#"<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">
<d:response><d:href>/a/dir/</d:href><d:propstat><d:prop><d:resourcetype><d:collection/></d:resourcetype></d:prop></d:propstat></d:response>
<d:response><d:href>/a/dir/f%20one.dat</d:href><d:propstat><d:prop><d:resourcetype/><d:getcontentlength>42</d:getcontentlength><d:getetag>"0000C9B4E0D1A3B24F2AA5E9B2A1C6D3E4F5_-1912412442"</d:getetag></d:prop></d:propstat></d:response>
</d:multistatus>"#;
        let got = parse_multistatus(xml).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].path.as_str(), got[0].is_dir), ("/a/dir/", true));
        assert_eq!(got[1].path, "/a/dir/f%20one.dat");
        assert_eq!((got[1].is_dir, got[1].size), (false, Some(42)));
        assert_eq!(
            got[1].pnfsid().as_deref(),
            Some("0000C9B4E0D1A3B24F2AA5E9B2A1C6D3E4F5"),
            "dCache's pnfsid, from the ETag"
        );
        let file = |size, etag: Option<&str>| Entry {
            path: "/p/x".into(),
            size,
            etag: etag.map(String::from),
            ..Entry::default()
        };
        let a = upload_message(&file(Some(1), None));
        let b = upload_message(&file(Some(1), None));
        let c = upload_message(&file(Some(2), None));
        assert_eq!(a, b, "one file, one stand-in pnfsid");
        assert_ne!(a, c);
        let msg = dcflow_core::BillingMessage::decode(&a).unwrap();
        assert!(msg.upload().is_ok(), "an upload for the pipeline");
    }

    /// Issue 14, item 4: the stand-in id was a hash of the path and size only, so a re-upload
    /// of a path with new content of the same size was the same file for ever.
    #[test]
    fn a_reupload_of_a_path_with_the_same_size_is_a_new_file() {
        let upload = |etag: &str| {
            let raw = upload_message(&Entry {
                path: "/p/x".into(),
                size: Some(7),
                etag: Some(etag.into()),
                ..Entry::default()
            });
            dcflow_core::BillingMessage::decode(&raw)
                .unwrap()
                .upload()
                .unwrap()
                .pnfsid
        };
        let first = upload("\"0000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA_1\"");
        let again = upload("\"0000BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB_2\"");
        assert_ne!(first, again);
        assert_eq!(first.as_str(), "0000AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        // A door without dCache's ETag: the ETag (or modification time) still tells them apart.
        assert_ne!(upload("\"v1\""), upload("\"v2\""));
    }
}
