//! The door's WebDAV listing: PROPFIND answered as dCache's door answers it.

use super::*;

/// `PROPFIND` with `Depth: 0` or `1`: a WebDAV multistatus of the entry and its children
/// (name, collection or not, size), as dCache's door answers.
pub(super) async fn propfind(
    state: &State,
    req: &Request<Incoming>,
    path: &str,
) -> Result<Response<Body>, std::io::Error> {
    let depth = req
        .headers()
        .get("Depth")
        .and_then(|d| d.to_str().ok())
        .unwrap_or("1");
    if let Some(Fault::ListStatus { code }) = state.faults.take(path, Stage::List) {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(full(status, format!("injected {code}\n")));
    }
    let on_disk = state.storage.join(path.trim_start_matches('/'));
    let Ok(meta) = tokio::fs::metadata(&on_disk).await else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    // A visible file: dCache's door gives its pnfsid in the ETag (milton's
    // `"<uniqueId>_<modification date hash>"`, the unique id being the pnfsid), its adler32 in
    // `dcache:Checksums` and its locality in `srm:FileLocality`.
    let visible = |p: &str| {
        state
            .files
            .lock()
            .expect("lock")
            .get(p)
            .filter(|m| Instant::now() >= m.visible_at)
            .map(|m| {
                let retention = if m.custodial { "CUSTODIAL" } else { "REPLICA" };
                (m.pnfsid.clone(), m.adler32, m.locality.clone(), retention)
            })
    };
    let encode = |p: &str| {
        p.split('/')
            .map(|s| percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    let checksums = state.cfg.checksums;
    // As dCache 12.0.1 answers: what an entry has in a 200 propstat, what it lacks in a 404
    // one; the SRM and dCache properties under prefixes of their own.
    let entry = |p: &str,
                 dir: bool,
                 size: u64,
                 modified: Option<std::time::SystemTime>,
                 file: Option<(String, u32, String, &str)>| {
        let date = modified
            .map(|m| {
                format!(
                    "<d:getlastmodified>{}</d:getlastmodified>",
                    httpdate::fmt_http_date(m)
                )
            })
            .unwrap_or_default();
        let (found, missing) = match (dir, file) {
            (true, _) => (
                format!("<d:resourcetype><d:collection/></d:resourcetype>{date}"),
                "<FileLocality/><RetentionPolicy/><Checksums/><d:getcontentlength/>".to_owned(),
            ),
            (false, Some((id, adler32, locality, retention))) => (
                format!(
                    "<ns1:FileLocality xmlns:ns1=\"http://srm.lbl.gov/StorageResourceManager\">{locality}</ns1:FileLocality><ns1:RetentionPolicy xmlns:ns1=\"http://srm.lbl.gov/StorageResourceManager\">{retention}</ns1:RetentionPolicy><d:getcontentlength>{size}</d:getcontentlength><d:getetag>\"{id}_0\"</d:getetag>{}{date}",
                    if checksums {
                        format!("<ns2:Checksums xmlns:ns2=\"http://www.dcache.org/2013/webdav\">adler32={adler32:08x}</ns2:Checksums>")
                    } else {
                        String::new()
                    }
                ),
                "<d:resourcetype/>".to_owned(),
            ),
            (false, None) => (
                format!("<d:getcontentlength>{size}</d:getcontentlength>{date}"),
                "<d:resourcetype/>".to_owned(),
            ),
        };
        format!(
            "<d:response><d:href>{}</d:href><d:propstat><d:prop>{found}</d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat><d:propstat><d:prop>{missing}</d:prop><d:status>HTTP/1.1 404 Not Found</d:status></d:propstat></d:response>",
            encode(p)
        )
    };
    let mut body =
        String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><d:multistatus xmlns:d=\"DAV:\">");
    let self_path = if meta.is_dir() && !path.ends_with('/') {
        format!("{path}/")
    } else {
        path.to_owned()
    };
    body.push_str(&entry(
        &self_path,
        meta.is_dir(),
        meta.len(),
        meta.modified().ok(),
        visible(path),
    ));
    if meta.is_dir() && depth != "0" {
        let mut rd = tokio::fs::read_dir(&on_disk).await?;
        while let Some(e) = rd.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") {
                continue;
            }
            let child = format!("{}/{name}", path.trim_end_matches('/'));
            let m = e.metadata().await?;
            if m.is_dir() {
                body.push_str(&entry(
                    &format!("{child}/"),
                    true,
                    0,
                    m.modified().ok(),
                    None,
                ));
            } else if let Some(file) = visible(&child) {
                body.push_str(&entry(
                    &child,
                    false,
                    m.len(),
                    m.modified().ok(),
                    Some(file),
                ));
            }
        }
    }
    body.push_str("</d:multistatus>");
    Ok(Response::builder()
        .status(StatusCode::MULTI_STATUS)
        .header(header::CONTENT_TYPE, "application/xml; charset=utf-8")
        .body(full(StatusCode::OK, body).into_body())
        .expect("response"))
}

/// A query value, percent-encoded as dCache writes `dcache-http-ref`.
pub(super) fn url_escape(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Path segments as the door writes them in hrefs.
pub(super) const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'&')
    .add(b'+');
