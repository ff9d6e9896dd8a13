//! The frontend's SSE stream, with its fault points.

use super::*;
/// `/api/v1/events/...`: channels, subscriptions, the stream.
// Long on purpose: one SSE handler: the frontend's stream with its fault points in order.
pub(super) async fn events(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let fe = &state.frontend;
    let path = req.uri().path().to_owned();
    let rest = path.trim_start_matches("/api/v1/events/channels");
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let not_found = || {
        let mut r = full(
            StatusCode::NOT_FOUND,
            r#"{"errors":[{"message":"Not Found","status":"404"}]}"#,
        );
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            "application/json".parse().expect("header"),
        );
        r
    };
    let method = req.method().clone();
    match (method.as_str(), parts.as_slice()) {
        ("POST", []) => {
            let url = fe.create_channel();
            let mut r = full(StatusCode::CREATED, "");
            r.headers_mut()
                .insert(header::LOCATION, url.parse().expect("header"));
            Ok(r)
        }
        ("PATCH", [id]) if fe.exists(id) => Ok(full(StatusCode::NO_CONTENT, "")),
        ("DELETE", [id]) if fe.delete_channel(id) => Ok(full(StatusCode::NO_CONTENT, "")),
        ("GET", [id]) => {
            let wants_stream = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("text/event-stream"));
            if !wants_stream {
                return Ok(if fe.exists(id) {
                    full(StatusCode::OK, r#"{"timeout":300}"#)
                } else {
                    not_found()
                });
            }
            let last = req
                .headers()
                .get("Last-Event-ID")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            match fe.stream(id, last) {
                crate::frontend::Stream::NotFound => Ok(not_found()),
                crate::frontend::Stream::Events(mut rx) => {
                    let body = futures_util::stream::poll_fn(move |cx| {
                        rx.poll_recv(cx).map(|b| {
                            b.map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b)))
                        })
                    });
                    Ok(Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .header(header::CACHE_CONTROL, "no-cache")
                        .body(http_body_util::BodyExt::boxed_unsync(
                            http_body_util::StreamBody::new(body),
                        ))
                        .expect("response"))
                }
            }
        }
        ("POST", [id, "subscriptions", "inotify"]) => {
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            let selector: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return Ok(full(StatusCode::BAD_REQUEST, format!("Bad selector: {e}"))),
            };
            let Some(watched) = selector["path"].as_str().map(str::to_owned) else {
                return Ok(full(StatusCode::BAD_REQUEST, "Bad selector: no path"));
            };
            let valid = watched == "/" || (watched.starts_with('/') && !watched.ends_with('/'));
            let door = watched.strip_prefix(state.cfg.root.as_str());
            let is_dir = match door {
                Some(d) if valid => state.storage.join(d.trim_start_matches('/')).is_dir(),
                _ => false,
            };
            if !is_dir {
                return Ok(full(
                    StatusCode::BAD_REQUEST,
                    format!("Not found: Problem with path: {watched}"),
                ));
            }
            match fe.subscribe(id, &watched) {
                None => Ok(not_found()),
                Some((url, created)) => {
                    let mut r = full(
                        if created {
                            StatusCode::CREATED
                        } else {
                            StatusCode::SEE_OTHER
                        },
                        "",
                    );
                    r.headers_mut()
                        .insert(header::LOCATION, url.parse().expect("header"));
                    Ok(r)
                }
            }
        }
        _ => Ok(not_found()),
    }
}
