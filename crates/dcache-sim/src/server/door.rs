//! The door: authentication, HEAD and GET (redirect to the pool), PUT (the upload flow and its
//! billing), DELETE, and the control endpoint for faults.

use super::*;

/// Door path from the request URI: percent-decoded, no `..`.
pub(super) fn door_path(req: &Request<Incoming>) -> Option<String> {
    let raw = req.uri().path();
    let decoded = percent_decode_str(raw).decode_utf8().ok()?.into_owned();
    if decoded.split('/').any(|p| p == ".." || p == ".") || decoded.contains('\0') {
        return None;
    }
    Some(decoded)
}

/// Who the client is: the end-entity DN of its certificate chain, or the token's subject.
#[derive(Clone)]
pub(super) enum Identity {
    Cert(String),
    Token,
}

pub(super) fn authenticate(
    state: &State,
    certs: Option<&Vec<CertificateDer<'static>>>,
    req: &Request<Incoming>,
) -> Option<Identity> {
    if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        let token = auth.to_str().ok()?.strip_prefix("Bearer ")?.trim();
        return state.tokens.contains(token).then_some(Identity::Token);
    }
    certs.and_then(|c| owner_dn(c)).map(Identity::Cert)
}

pub(super) async fn door(
    state: Arc<State>,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if req.uri().path() == "/.sim/faults" {
        return control(&state, req).await;
    }
    let Some(identity) = authenticate(&state, certs.as_deref(), &req) else {
        let mut r = full(StatusCode::UNAUTHORIZED, "Unauthorized\n");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"dcache-sim\"".parse().expect("header"),
        );
        return Ok(r);
    };
    if req.uri().path().starts_with("/api/v1/events/") {
        return events(state, req).await;
    }
    if req.uri().path().starts_with("/api/v1/tape/") {
        return super::tape::tape_api(state, req).await;
    }
    let Some(path) = door_path(&req) else {
        return Ok(full(StatusCode::BAD_REQUEST, "bad path\n"));
    };
    match req.method().as_str() {
        "GET" | "HEAD" => door_read(state, identity, peer, req, path).await,
        "PUT" => put(state, identity, peer, req, path).await,
        "DELETE" => delete(state, identity, peer, path).await,
        "MKCOL" => {
            let created = create_dirs(&state, &path).await?;
            Ok(full(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::METHOD_NOT_ALLOWED
                },
                "",
            ))
        }
        "PROPFIND" => propfind(&state, &req, &path).await,
        _ => Ok(full(StatusCode::METHOD_NOT_ALLOWED, "")),
    }
}

/// `POST /.sim/faults` with a [`FaultRule`] adds it; `DELETE` clears all.
pub(super) async fn control(
    state: &State,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    match *req.method() {
        Method::DELETE => {
            state.faults.clear();
            Ok(full(StatusCode::NO_CONTENT, ""))
        }
        Method::POST => {
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            match serde_json::from_slice::<FaultRule>(&body) {
                Ok(rule) => {
                    state.faults.add(rule);
                    Ok(full(StatusCode::CREATED, ""))
                }
                Err(e) => Ok(full(StatusCode::BAD_REQUEST, format!("{e}\n"))),
            }
        }
        _ => Ok(full(StatusCode::METHOD_NOT_ALLOWED, "")),
    }
}

/// Algorithms named in `Want-Digest` (RFC 3230), lower-cased, q-values ignored.
pub(super) fn wanted_digests(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get("want-digest")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .filter_map(|p| p.split(';').next())
                .map(|p| p.trim().to_ascii_lowercase())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// `Digest: adler32=<8 lower-case hex>,md5=<base64>` for the wanted algorithms dCache knows.
pub(super) fn digest_header(meta: &FileMeta, wanted: &[String], wrong: bool) -> Option<String> {
    let mut parts = Vec::new();
    for algo in wanted {
        match algo.as_str() {
            "adler32" => {
                let v = if wrong {
                    meta.adler32 ^ 0x0101_0101
                } else {
                    meta.adler32
                };
                parts.push(format!("adler32={v:08x}"));
            }
            "md5" => {
                let mut v = meta.md5;
                if wrong {
                    v[0] ^= 0xff;
                }
                parts.push(format!(
                    "md5={}",
                    base64::engine::general_purpose::STANDARD.encode(v)
                ));
            }
            _ => {}
        }
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

// Long on purpose: one HTTP handler whose branches are dCache's answers (redirect, HEAD
// headers, faults); the emulator mirrors the door case by case.
pub(super) async fn door_read(
    state: Arc<State>,
    identity: Identity,
    peer: SocketAddr,
    req: Request<Incoming>,
    path: String,
) -> Result<Response<Body>, std::io::Error> {
    let is_get = req.method() == Method::GET;
    if is_get {
        state.door_gets.fetch_add(1, Ordering::Relaxed);
    }
    let door_fault = state.faults.take(&path, Stage::Door);
    match door_fault {
        Some(Fault::Status { code }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(full(status, format!("injected {code}\n")));
        }
        Some(Fault::Reset) => return Err(std::io::Error::other("injected connection reset")),
        Some(Fault::Hang) => {
            if !is_get {
                state.hung_heads.lock().expect("lock").push(Instant::now());
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Err(std::io::Error::other("hang ended"));
        }
        _ => {}
    }
    if state.uploading.lock().expect("lock").contains(&path) {
        if is_get {
            let msg = door_request(
                &state,
                &identity,
                peer,
                &path,
                None,
                10022,
                "File upload not yet completed",
                None,
            );
            state.billing.emit(&msg);
        }
        return Ok(full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "File upload not yet completed\n",
        ));
    }
    let meta = state.files.lock().expect("lock").get(&path).cloned();
    let Some(meta) = meta.filter(|m| Instant::now() >= m.visible_at) else {
        // A folder: dCache 12.0.1 answers its HEAD with 200, an ETag and text/html (a GET
        // would be its HTML listing, which nothing here reads).
        let on_disk = state.storage.join(path.trim_start_matches('/'));
        if !is_get
            && tokio::fs::metadata(&on_disk)
                .await
                .is_ok_and(|m| m.is_dir())
        {
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/html;charset=utf-8")
                .header(header::ETAG, format!("\"{}_0\"", dir_id(&path)))
                .body(
                    Full::new(Bytes::new())
                        .map_err(|e: Infallible| match e {})
                        .boxed_unsync(),
                )
                .expect("response"));
        }
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    // On tape only: dCache restores it before it answers, which takes the tape's time (a
    // client that did not stage first holds its connection and its slot meanwhile).
    if is_get && meta.locality == "NEARLINE" && meta.custodial {
        state.tape.lock().expect("lock").nearline_gets += 1;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Err(std::io::Error::other("restore from tape did not end"));
    }
    if !is_get {
        let wrong = state.faults.take(&path, Stage::Digest).is_some();
        let mut r = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, meta.size)
            .header(header::ETAG, format!("\"{}_0\"", meta.pnfsid));
        if let Some(d) =
            digest_header(&meta, &wanted_digests(&req), wrong).filter(|_| state.cfg.checksums)
        {
            r = r.header("Digest", d);
        }
        return Ok(r
            .body(
                Full::new(Bytes::new())
                    .map_err(|e: Infallible| match e {})
                    .boxed_unsync(),
            )
            .expect("response"));
    }
    let uuid = uuid::Uuid::new_v4().to_string();
    state
        .uuids
        .lock()
        .expect("lock")
        .insert(uuid.clone(), (path.clone(), identity.clone(), peer));
    // As dCache 12.0.1 redirects: the one-time uuid and the door it came from.
    let door_ref: String = url_escape(
        state
            .frontend
            .base
            .lock()
            .expect("lock")
            .trim_end_matches('/'),
    );
    let mut location = format!(
        "{}{}?dcache-http-uuid={uuid}&dcache-http-ref={door_ref}",
        state.pool_origin,
        req.uri().path()
    );
    if door_fault == Some(Fault::RedirectHttp) {
        location = location.replacen("https://", "http://", 1);
    }
    let status = StatusCode::from_u16(state.cfg.redirect_status).unwrap_or(StatusCode::FOUND);
    Ok(Response::builder()
        .status(status)
        .header(header::LOCATION, location)
        .body(
            Full::new(Bytes::new())
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
        )
        .expect("response"))
}

// Long on purpose: one HTTP handler: dCache's upload sequence (door, mover, commit, billing)
// with its fault points in order.
pub(super) async fn put(
    state: Arc<State>,
    identity: Identity,
    peer: SocketAddr,
    req: Request<Incoming>,
    path: String,
) -> Result<Response<Body>, std::io::Error> {
    let started = Instant::now();
    let target = state.storage.join(path.trim_start_matches('/'));
    let (dir, name) = split_path(&path);
    create_dirs(&state, dir).await?;
    let ns_dir = format!("{}{}", state.cfg.root, dir);
    state.uploading.lock().expect("lock").insert(path.clone());
    let tmp = target.with_file_name(format!(".upload-{}", uuid::Uuid::new_v4().simple()));
    // Benchmark aid (not dCache): `X-Sim-Link: <door path>` stores a hard link to a file
    // already uploaded instead of a body, so that 64 files of 1 GiB take 1 GiB of disk.
    let link_from = req
        .headers()
        .get("x-sim-link")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let result = async {
        if let Some(from) = link_from {
            let meta = state.files.lock().expect("lock").get(&from).cloned();
            let meta =
                meta.ok_or_else(|| std::io::Error::other(format!("no file {from} to link")))?;
            tokio::fs::hard_link(state.storage.join(from.trim_start_matches('/')), &tmp).await?;
            tokio::fs::rename(&tmp, &target).await?;
            return Ok((meta.size, meta.adler32, meta.md5));
        }
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut adler = adler2::Adler32::new();
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            if let Some(data) = frame.data_ref() {
                adler.write_slice(data);
                md5.update(data);
                size += data.len() as u64;
                file.write_all(data).await?;
            }
        }
        file.flush().await?;
        drop(file);
        tokio::fs::rename(&tmp, &target).await?;
        Ok::<_, std::io::Error>((size, adler.checksum(), md5.finalize().into()))
    }
    .await;
    state.uploading.lock().expect("lock").remove(&path);
    let (size, adler32, md5) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let pnfsid = format!("0000{}", uuid::Uuid::new_v4().simple()).to_ascii_uppercase();
    let upload_dir = match state.faults.peek(&path, Stage::Upload) {
        Some(Fault::UploadDir { seconds }) => Some(seconds),
        _ => None,
    };
    if upload_dir.is_none() {
        // The door creates the entry when the upload starts; the pool closes it once the
        // namespace has the size and checksum (fixtures/sse/03-stream-webdav-upload.txt).
        state
            .frontend
            .notify(&ns_dir, Some(name), &["IN_CREATE"], None);
    }
    let meta = FileMeta {
        pnfsid: pnfsid.clone(),
        size,
        adler32,
        md5,
        visible_at: Instant::now() + secs(upload_dir.unwrap_or(0)),
        locality: "ONLINE".to_owned(),
        custodial: false,
    };
    state
        .files
        .lock()
        .expect("lock")
        .insert(path.clone(), meta.clone());
    let elapsed = started.elapsed();
    let billing_path = format!("{}{}", state.cfg.root, path);
    match upload_dir {
        None => {
            let mover = pool_transfer(&meta, &billing_path, &billing_path, elapsed, "write");
            let door_msg = door_request(
                &state,
                &identity,
                peer,
                &path,
                Some(&meta),
                0,
                "",
                Some(mover.1),
            );
            let door_first = match state.cfg.order {
                BillingOrder::DoorFirst => true,
                BillingOrder::PoolFirst => false,
                BillingOrder::Random => rand::random(),
            };
            if door_first {
                state.billing.emit(&door_msg);
                state.billing.emit(&mover.0);
            } else {
                state.billing.emit(&mover.0);
                state.billing.emit(&door_msg);
            }
            state
                .frontend
                .notify(&ns_dir, Some(name), &["IN_CLOSE_WRITE"], None);
        }
        Some(seconds) => {
            // SRM / upload-directory flow: written under /upload, visible at its final
            // path only once committed; putDone (dCache >= 10.1) announces the commit.
            let name = path.rsplit('/').next().unwrap_or("file");
            let transfer_path = format!(
                "/upload/{}/{}/{name}",
                rand::random::<u8>() % 16,
                uuid::Uuid::new_v4()
            );
            let (pool_msg, _) =
                pool_transfer(&meta, &billing_path, &transfer_path, elapsed, "write");
            state.billing.emit(&pool_msg);
            let state2 = state.clone();
            let (ns_dir, name) = (ns_dir.clone(), name.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(secs(seconds)).await;
                let msg = srm_put_done(&meta, &billing_path, &transfer_path);
                state2.billing.emit(&msg);
                // The commit renames the file out of the upload directory.
                let cookie = base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(&uuid::Uuid::new_v4().as_bytes()[..12]);
                state2
                    .frontend
                    .notify(&ns_dir, Some(&name), &["IN_MOVED_TO"], Some(&cookie));
            });
        }
    }
    Ok(full(StatusCode::CREATED, ""))
}

pub(super) async fn delete(
    state: Arc<State>,
    identity: Identity,
    peer: SocketAddr,
    path: String,
) -> Result<Response<Body>, std::io::Error> {
    let meta = state.files.lock().expect("lock").remove(&path);
    let Some(meta) = meta else {
        return Ok(full(StatusCode::NOT_FOUND, "Not Found\n"));
    };
    tokio::fs::remove_file(state.storage.join(path.trim_start_matches('/'))).await?;
    let (dir, name) = split_path(&path);
    state.frontend.notify(
        &format!("{}{}", state.cfg.root, dir),
        Some(name),
        &["IN_DELETE"],
        None,
    );
    let billing_path = format!("{}{}", state.cfg.root, path);
    let (uid, subject, owner) = principal(&identity, peer);
    let msg = door_common(&state, "remove", peer, &path, &subject, uid, owner)
        .put("sessionDuration", 0)
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", &billing_path)
        .put("fileSize", meta.size)
        .put("status", serde_json::json!({"code": 0, "msg": ""}));
    state.billing.emit(&msg);
    let pool_session = format!("pool:{POOL_CELL}@{POOL_DOMAIN}:{}", session_id());
    let pool_msg = Msg::default()
        .put("version", "1.0")
        .put("msgType", "remove")
        .put("date", now())
        .put("queuingTime", 0)
        .put("transaction", &pool_session)
        .put("session", &pool_session)
        .put("cellName", POOL_CELL)
        .put("cellType", "pool")
        .put("cellDomain", POOL_DOMAIN)
        .put("status", serde_json::json!({"code": 0, "msg": "[>cleaner-disk@namespaceDomain] [PoolRemoveFilesMessage]"}))
        .put("subject", ["UidPrincipal[0]", "GidPrincipal[0,primary]"])
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", "Unknown")
        .put("fileSize", meta.size)
        .put("storageInfo", "disk:sim@osm");
    state.billing.emit(&pool_msg);
    Ok(full(StatusCode::NO_CONTENT, ""))
}

/// A stable pnfsid-shaped id for a folder (the emulator keeps none for folders).
fn dir_id(path: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.trim_end_matches('/').hash(&mut h);
    format!("0000{:032X}", u128::from(h.finish()))
}
