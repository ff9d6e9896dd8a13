//! The pool's movers: one-time uuids, the file's bytes with pool faults on the wire.

use super::*;

pub(super) async fn pool(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if let Some(a) = req.headers().get(header::AUTHORIZATION) {
        state
            .pool_auth_headers
            .lock()
            .expect("lock")
            .push(String::from_utf8_lossy(a.as_bytes()).into_owned());
    }
    if req.method() != Method::GET {
        return Ok(full(StatusCode::METHOD_NOT_ALLOWED, ""));
    }
    let uuid = req
        .uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("dcache-http-uuid="))
        })
        .map(str::to_owned);
    let Some(uuid) = uuid else {
        return Ok(full(
            StatusCode::BAD_REQUEST,
            "Query string does not include any UUID.\n",
        ));
    };
    let Some(path) = door_path(&req) else {
        return Ok(full(StatusCode::BAD_REQUEST, "bad path\n"));
    };
    // One-time: removed on first use.
    let known = state.uuids.lock().expect("lock").remove(&uuid);
    let Some((_, identity, peer)) = known.filter(|(p, _, _)| p == &path) else {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "Request is no longer valid. Please resubmit to door.\n",
        ));
    };
    state.pool_gets.fetch_add(1, Ordering::Relaxed);
    let meta = state.files.lock().expect("lock").get(&path).cloned();
    let Some(meta) = meta else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    let file = tokio::fs::File::open(state.storage.join(path.trim_start_matches('/'))).await?;
    let fault = state.faults.take(&path, Stage::Pool);
    let mut r = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, meta.size);
    if state.cfg.digest_on_get {
        let wrong = state.faults.take(&path, Stage::Digest).is_some();
        if let Some(d) =
            digest_header(&meta, &wanted_digests(&req), wrong).filter(|_| state.cfg.checksums)
        {
            r = r.header("Digest", d);
        }
    }
    // Once the whole body is sent, dCache bills the read: the pool's `transfer` (isWrite
    // "read") and the door's `request` (without moverInfo), as dCache 12.0.1 publishes them.
    // (At the last byte: with a Content-Length, hyper does not poll the body to its end.)
    let started = Instant::now();
    let size = meta.size;
    let state_bills_reads = state.cfg.bill_reads;
    let bill = move || {
        let ns_path = format!("{}{}", state.cfg.root, path);
        let (pool_msg, _) = pool_transfer(&meta, &ns_path, &ns_path, started.elapsed(), "read");
        state.billing.emit(&pool_msg);
        let door = door_request(&state, &identity, peer, &path, Some(&meta), 0, "", None);
        state.billing.emit(&door);
    };
    let mut bill = Some(bill).filter(|_| state_bills_reads);
    if size == 0 {
        if let Some(b) = bill.take() {
            b();
        }
    }
    let mut sent = 0u64;
    let billed = file_stream(file, fault).inspect(move |chunk| {
        if let Ok(c) = chunk {
            sent += c.len() as u64;
            if sent >= size {
                if let Some(b) = bill.take() {
                    b();
                }
            }
        }
    });
    let body = StreamBody::new(billed.map(|r| r.map(Frame::data)));
    Ok(r.body(body.boxed_unsync()).expect("response"))
}

/// The file's bytes in chunks, with a pool fault applied on the wire.
pub(super) fn file_stream(
    file: tokio::fs::File,
    fault: Option<Fault>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    struct S {
        file: tokio::fs::File,
        sent: u64,
        fault: Option<Fault>,
        done: bool,
    }
    let start = Instant::now();
    futures_util::stream::unfold(
        S {
            file,
            sent: 0,
            fault,
            done: false,
        },
        move |mut s| async move {
            if s.done {
                return None;
            }
            let mut buf = BytesMut::zeroed(CHUNK);
            let mut limit = CHUNK;
            match s.fault {
                Some(Fault::Truncate { at }) | Some(Fault::Stall { at, .. }) if s.sent < at => {
                    limit = limit.min((at - s.sent) as usize);
                }
                Some(Fault::Truncate { at }) if s.sent >= at => {
                    s.done = true;
                    // Let what was sent reach the client before the connection drops.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Some((Err(std::io::Error::other("injected truncation")), s));
                }
                Some(Fault::Stall { seconds, .. }) => {
                    tokio::time::sleep(secs(seconds)).await;
                    s.fault = None;
                }
                _ => {}
            }
            let n = match s.file.read(&mut buf[..limit]).await {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
            };
            buf.truncate(n);
            match s.fault {
                Some(Fault::FlipByte { at }) if at >= s.sent && at < s.sent + n as u64 => {
                    buf[(at - s.sent) as usize] ^= 0x5a;
                }
                Some(Fault::SlowLink { bytes_per_second }) if bytes_per_second > 0 => {
                    let due = Duration::from_secs_f64(
                        (s.sent + n as u64) as f64 / bytes_per_second as f64,
                    );
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                _ => {}
            }
            s.sent += n as u64;
            Some((Ok(buf.freeze()), s))
        },
    )
}
