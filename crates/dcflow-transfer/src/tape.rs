//! Files whose only copy is on tape: a file's locality, and dCache's WLCG Tape REST API (the
//! one FTS uses), as seen on dCache 12.0.1:
//!
//! ```text
//! POST {api}/stage {"files":[{"path":"/tape/f","diskLifetime":"PT86400S"}]}
//!      → 201, Location: {api}/stage/<id>, {"requestId":"<id>"}
//! GET  {api}/stage/<id> → {"id":..,"files":[{"path":..,"state":"COMPLETED"}]}   (SUBMITTED,
//!      STARTED, COMPLETED, FAILED with "error", CANCELLED)
//! POST {api}/release/<id> {"paths":[..]} → 200
//! PROPFIND Depth 0 → srm:FileLocality NEARLINE, then ONLINE_AND_NEARLINE once staged
//!      (a REPLICA file's NEARLINE is not tape: see crate::listing)
//! ```
//!
//! Paths are namespace paths. The bearer token goes to the API's origin only when it is one of
//! the configured ones ([`Engine::api`]).

use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use url::Url;

use crate::engine::Engine;
use crate::error::TransferError;
use crate::listing::{Entry, Locality, MultistatusParser};

/// The state of one file of a stage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageState {
    /// Accepted, not yet on disk (SUBMITTED, STARTED, or a state this version does not know).
    Waiting,
    Completed,
    /// FAILED or CANCELLED, with dCache's reason.
    Failed(String),
}

#[derive(Deserialize)]
struct Progress {
    #[serde(default)]
    files: Vec<FileProgress>,
}

#[derive(Deserialize)]
struct FileProgress {
    path: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: Option<String>,
}

impl Engine {
    /// A file's locality (PROPFIND `Depth: 0`, `srm:FileLocality` read with
    /// `srm:RetentionPolicy`); `None` from a door that does not say.
    pub async fn locality(&self, url: &Url) -> Result<Option<Locality>, TransferError> {
        let resp = self
            .api(Method::from_bytes(b"PROPFIND").expect("method"), url.clone())
            .header("Depth", "0")
            .header("Content-Type", "application/xml; charset=utf-8")
            .body(r#"<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:" xmlns:srm="http://srm.lbl.gov/StorageResourceManager"><d:prop><srm:FileLocality/><srm:RetentionPolicy/></d:prop></d:propfind>"#)
            .timeout(self.settings().stall_timeout)
            .send()
            .await
            .map_err(|e| self.network_error(url, e))?;
        match resp.status().as_u16() {
            207 => {}
            404 => {
                return Err(TransferError::NotFound {
                    url: url.to_string(),
                })
            }
            status => {
                return Err(TransferError::Http {
                    status,
                    url: url.to_string(),
                    hint: ": PROPFIND for the locality".into(),
                })
            }
        }
        let body = resp.bytes().await.map_err(|e| self.network_error(url, e))?;
        let mut parser = MultistatusParser::default();
        let entries: Vec<Entry> = parser.feed(&body).map_err(|why| TransferError::Http {
            status: 207,
            url: url.to_string(),
            hint: format!(": {why}"),
        })?;
        Ok(entries.into_iter().find_map(|e| e.locality))
    }

    /// Asks dCache to bring `paths` back from tape, to stay on disk for `lifetime`; the URL
    /// of the request, to poll and release.
    pub async fn stage(
        &self,
        api: &Url,
        paths: &[String],
        lifetime: Duration,
    ) -> Result<Url, TransferError> {
        let url = join(api, "stage")?;
        let files: Vec<_> = paths
            .iter()
            .map(|p| serde_json::json!({"path": p, "diskLifetime": format!("PT{}S", lifetime.as_secs())}))
            .collect();
        let resp = self
            .api(Method::POST, url.clone())
            .header("Content-Type", "application/json")
            .body(serde_json::json!({ "files": files }).to_string())
            .timeout(self.settings().stall_timeout)
            .send()
            .await
            .map_err(|e| self.network_error(&url, e))?;
        let status = resp.status().as_u16();
        if status != 201 && status != 200 {
            return Err(self.api_error(resp, &url, "stage request").await);
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok());
        let request = match location {
            Some(l) => l,
            None => {
                #[derive(Deserialize)]
                struct Created {
                    #[serde(rename = "requestId")]
                    request_id: String,
                }
                let body = resp
                    .bytes()
                    .await
                    .map_err(|e| self.network_error(&url, e))?;
                let created: Created =
                    serde_json::from_slice(&body).map_err(|e| TransferError::Http {
                        status,
                        url: url.to_string(),
                        hint: format!(
                            ": a stage request answered without Location or requestId: {e}"
                        ),
                    })?;
                join(api, &format!("stage/{}", created.request_id))?
            }
        };
        // The request id is on the API's own origin: anything else is not followed.
        if request.origin() != api.origin() {
            return Err(TransferError::RedirectRefused {
                from: url.to_string(),
                to: request.to_string(),
                why: "a stage request on another host",
            });
        }
        Ok(request)
    }

    /// Each file of a stage request and where it stands.
    pub async fn stage_progress(
        &self,
        request: &Url,
    ) -> Result<Vec<(String, StageState)>, TransferError> {
        let resp = self
            .api(Method::GET, request.clone())
            .timeout(self.settings().stall_timeout)
            .send()
            .await
            .map_err(|e| self.network_error(request, e))?;
        if !resp.status().is_success() {
            return Err(self.api_error(resp, request, "stage progress").await);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.network_error(request, e))?;
        let progress: Progress =
            serde_json::from_slice(&body).map_err(|e| TransferError::Http {
                status: 200,
                url: request.to_string(),
                hint: format!(": not a stage request's progress: {e}"),
            })?;
        Ok(progress
            .files
            .into_iter()
            .map(|f| {
                let state = match f.state.as_str() {
                    "COMPLETED" => StageState::Completed,
                    "FAILED" | "CANCELLED" => {
                        StageState::Failed(f.error.unwrap_or_else(|| f.state.to_lowercase()))
                    }
                    _ => StageState::Waiting,
                };
                (f.path, state)
            })
            .collect())
    }

    /// Tells dCache that the staged copies of `paths` are no longer needed.
    pub async fn release(&self, request: &Url, paths: &[String]) -> Result<(), TransferError> {
        let id = request
            .path_segments()
            .and_then(|mut s| s.next_back())
            .unwrap_or_default()
            .to_owned();
        let url = request
            .join(&format!("../release/{id}"))
            .map_err(|e| TransferError::Http {
                status: 0,
                url: request.to_string(),
                hint: format!(": {e}"),
            })?;
        let resp = self
            .api(Method::POST, url.clone())
            .header("Content-Type", "application/json")
            .body(serde_json::json!({ "paths": paths }).to_string())
            .timeout(self.settings().stall_timeout)
            .send()
            .await
            .map_err(|e| self.network_error(&url, e))?;
        if !resp.status().is_success() {
            return Err(self.api_error(resp, &url, "release").await);
        }
        Ok(())
    }

    async fn api_error(&self, resp: reqwest::Response, url: &Url, what: &str) -> TransferError {
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return TransferError::Auth {
                status,
                url: url.to_string(),
                hint: self.credentials().auth_hint(),
            };
        }
        let body = resp.text().await.unwrap_or_default();
        TransferError::Http {
            status,
            url: url.to_string(),
            hint: format!(": {what}: {}", dcflow_core::text::bounded(body.trim(), 300)),
        }
    }
}

/// `{api}/{rest}`, `api` taken as a folder.
fn join(api: &Url, rest: &str) -> Result<Url, TransferError> {
    let mut base = api.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join(rest).map_err(|e| TransferError::Http {
        status: 0,
        url: api.to_string(),
        hint: format!(": {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dcache_s_stage_progress_reads() {
        let body = r#"{"id":"a19","createdAt":1,"files":[{"path":"/tape/a","state":"COMPLETED"},{"path":"/tape/b","state":"STARTED"},{"path":"/tape/c","state":"FAILED","error":"no such file on tape"}]}"#;
        let p: Progress = serde_json::from_str(body).unwrap();
        assert_eq!(p.files.len(), 3);
        assert_eq!(p.files[2].error.as_deref(), Some("no such file on tape"));
        let api = Url::parse("https://fe:3881/api/v1/tape").unwrap();
        assert_eq!(
            join(&api, "stage").unwrap().as_str(),
            "https://fe:3881/api/v1/tape/stage"
        );
        let request = Url::parse("https://fe:3881/api/v1/tape/stage/a19").unwrap();
        assert_eq!(
            request.join("../release/a19").unwrap().as_str(),
            "https://fe:3881/api/v1/tape/release/a19"
        );
    }
}
