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
    // A visible file's pnfsid: dCache's door gives it in the ETag (milton's
    // `"<uniqueId>_<modification date hash>"`, the unique id being the pnfsid).
    let visible = |p: &str| {
        state
            .files
            .lock()
            .expect("lock")
            .get(p)
            .filter(|m| Instant::now() >= m.visible_at)
            .map(|m| m.pnfsid.clone())
    };
    let encode = |p: &str| {
        p.split('/')
            .map(|s| percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/")
    };
    let entry = |p: &str, dir: bool, size: u64, pnfsid: Option<String>| {
        let kind = if dir { "<d:collection/>" } else { "" };
        let length = if dir {
            String::new()
        } else {
            format!("<d:getcontentlength>{size}</d:getcontentlength>")
        };
        let length = match pnfsid {
            Some(id) => format!("{length}<d:getetag>\"{id}_0\"</d:getetag>"),
            None => length,
        };
        format!(
            "<d:response><d:href>{}</d:href><d:propstat><d:prop><d:resourcetype>{kind}</d:resourcetype>{length}</d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>",
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
    body.push_str(&entry(&self_path, meta.is_dir(), meta.len(), visible(path)));
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
                body.push_str(&entry(&format!("{child}/"), true, 0, None));
            } else if let Some(id) = visible(&child) {
                body.push_str(&entry(&child, false, m.len(), Some(id)));
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
