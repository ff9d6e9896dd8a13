//! Tape, as dCache 12.0.1 showed it: a file's locality (`srm:FileLocality` in PROPFIND), the
//! WLCG Tape REST API on the frontend (`/api/v1/tape`: stage, its progress, release,
//! archiveinfo), `store` and `restore` billing messages, and a `GET` of a file on tape only
//! that hangs as a restore does.

use super::*;

/// One stage request.
pub(super) struct StageRequest {
    /// Namespace paths.
    files: Vec<String>,
    created: Instant,
}

#[derive(Default)]
pub(super) struct Tape {
    pub(super) requests: HashMap<String, StageRequest>,
    /// How long a stage takes (the tape).
    pub(super) delay: Duration,
    /// Door paths whose stage fails, with dCache's reason.
    pub(super) failures: HashMap<String, String>,
    /// Namespace paths of each stage request, in order (a test counts the batches).
    pub(super) history: Vec<Vec<String>>,
    /// Releases received, as namespace paths.
    pub(super) released: Vec<String>,
    /// GETs at the door of files on tape only (a client that did not stage first).
    pub(super) nearline_gets: u64,
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut r = full(status, value.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    r
}

/// `/api/v1/tape/...` on the door's address.
pub(super) async fn tape_api(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req
        .uri()
        .path()
        .trim_start_matches("/api/v1/tape/")
        .to_owned();
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let door = |ns: &str| {
        ns.strip_prefix(state.cfg.root.as_str())
            .unwrap_or(ns)
            .to_owned()
    };
    match (method.as_str(), path.split_once('/')) {
        ("POST", None) if path == "stage" => {
            let files: Vec<String> = v["files"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f["path"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let id = uuid::Uuid::new_v4().to_string();
            let mut tape = state.tape.lock().expect("lock");
            tape.history.push(files.clone());
            tape.requests.insert(
                id.clone(),
                StageRequest {
                    files,
                    created: Instant::now(),
                },
            );
            let base = state.frontend.base.lock().expect("lock").clone();
            let mut r = json(StatusCode::CREATED, serde_json::json!({ "requestId": id }));
            r.headers_mut().insert(
                header::LOCATION,
                format!("{}/api/v1/tape/stage/{id}", base.trim_end_matches('/'))
                    .parse()
                    .expect("header"),
            );
            Ok(r)
        }
        ("GET", Some(("stage", id))) => {
            let tape = state.tape.lock().expect("lock");
            let (delay, failures) = (tape.delay, tape.failures.clone());
            let Some(request) = tape.requests.get(id) else {
                return Ok(json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"title": "no such request"}),
                ));
            };
            let done = request.created.elapsed() >= delay;
            let files = request.files.clone();
            let mut out = Vec::new();
            for ns in &files {
                let d = door(ns);
                let custodial = state
                    .files
                    .lock()
                    .expect("lock")
                    .get(&d)
                    .map(|m| m.custodial);
                let entry = match (failures.get(&d), custodial, done) {
                    (Some(why), _, _) => {
                        serde_json::json!({"path": ns, "state": "FAILED", "error": why})
                    }
                    (None, None, _) => {
                        serde_json::json!({"path": ns, "state": "FAILED", "error": "No such file or directory"})
                    }
                    // dCache's bulk service (StageActivity.checkStageable) refuses what is not
                    // CUSTODIAL.
                    (None, Some(false), _) => {
                        serde_json::json!({"path": ns, "state": "FAILED", "error": "Cannot stage DISK only files"})
                    }
                    (None, Some(true), false) => {
                        serde_json::json!({"path": ns, "state": "STARTED"})
                    }
                    (None, Some(true), true) => {
                        restored(&state, &d);
                        serde_json::json!({"path": ns, "state": "COMPLETED"})
                    }
                };
                out.push(entry);
            }
            Ok(json(
                StatusCode::OK,
                serde_json::json!({"id": id, "files": out}),
            ))
        }
        ("POST", Some(("release", _))) => {
            let paths: Vec<String> = v["paths"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            state.tape.lock().expect("lock").released.extend(paths);
            Ok(full(StatusCode::OK, ""))
        }
        ("POST", None) if path == "archiveinfo" => {
            let files = state.files.lock().expect("lock");
            let out: Vec<_> = v["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .map(|ns| match files.get(&door(ns)) {
                    None => serde_json::json!({"path": ns, "error": "No such file or directory"}),
                    Some(m) => {
                        serde_json::json!({"path": ns, "locality": match m.locality.as_str() {
                            "ONLINE" => "DISK",
                            "NEARLINE" => "TAPE",
                            "ONLINE_AND_NEARLINE" => "DISK_AND_TAPE",
                            other => other,
                        }})
                    }
                })
                .collect();
            Ok(json(StatusCode::OK, serde_json::Value::Array(out)))
        }
        _ => Ok(full(StatusCode::NOT_FOUND, "no such tape API call\n")),
    }
}

/// A stage finished: the file is on disk again, and the pool bills the restore (dCache's
/// `restore` message names no path: `"billingPath":"Unknown"`).
fn restored(state: &State, door_path: &str) {
    let mut files = state.files.lock().expect("lock");
    let Some(meta) = files.get_mut(door_path) else {
        return;
    };
    if meta.locality != "NEARLINE" || !meta.custodial {
        return;
    }
    meta.locality = "ONLINE_AND_NEARLINE".into();
    let msg = tape_message("restore", &meta.pnfsid, "Unknown", meta.size);
    drop(files);
    state.billing.emit(&msg);
}

/// A pool's `store` or `restore` message, in dCache 12.0.1's shape.
pub(super) fn tape_message(kind: &str, pnfsid: &str, billing_path: &str, size: u64) -> Msg {
    Msg::default()
        .put("version", "1.0")
        .put("msgType", kind)
        .put("date", super::billing::now())
        .put("queuingTime", 0)
        .put(
            "cellName",
            if kind == "store" {
                "pool_write"
            } else {
                "pool_read"
            },
        )
        .put("cellType", "pool")
        .put("cellDomain", "dCacheDomain")
        .put("status", serde_json::json!({"code": 0, "msg": ""}))
        .put(
            "hsm",
            serde_json::json!({"type": "osm", "instance": "osm", "provider": "copy"}),
        )
        .put("locations", [format!("osm://osm/{pnfsid}")])
        .put("pnfsid", pnfsid)
        .put("billingPath", billing_path)
        .put("fileSize", size)
        .put("storageInfo", "test:tape@osm")
        .put("transferTime", 23)
}
