//! The `rucio` step: the verified copy registered as a replica in Rucio, attached to a
//! dataset. Registrations from many files are gathered (up to `[rucio] batch`, for at most
//! `batchwait`) into one `POST /replicas` per RSE and one attach per dataset, as Rucio 41.5.1
//! answered them:
//!
//! ```text
//! GET  /auth/userpass (X-Rucio-Account, -Username, -Password) → X-Rucio-Auth-Token, -Expires
//! POST /replicas/list {"dids":[..],"all_states":true} → one JSON object per line, per file
//!      that has replicas (bytes, adler32, rses)
//! POST /replicas {"rse":R,"files":[{scope,name,bytes,adler32,pfn}]} → 201, also when the
//!      file is there already, even with other bytes or adler32 (Rucio does not compare)
//! POST /dids/S/D/dids {"dids":[..]} → 201; 404 DataIdentifierNotFound (no dataset yet);
//!      409 FileAlreadyExists (one of them attached already)
//! POST /dids/S/D {"type":"DATASET"} → 201; 409 DataIdentifierAlreadyExists
//! ```
//!
//! Rucio accepts a re-registration with other bytes silently, so dcflow compares first: a file
//! that Rucio knows with other bytes or another adler32 is refused (a recorded failure), not
//! overwritten. 401 renews the token once; 5xx, 429 and timeouts are retried by the workflow;
//! other 4xx fail. The password and tokens are never logged.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use dcflow_core::config::{RucioAuth, RucioConfig};
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use dcflow_core::workflow::EventKind;
use dcflow_core::Step;

use super::{retrying, StepError};
use crate::executor::Run;
use crate::pipeline::Pipeline;

impl Pipeline {
    /// The `rucio` step of `run`: the file registered (bytes and adler32 of this workflow's
    /// verified copy, or without a copy dCache's own), attached, its rule added; in a workflow
    /// on `remove` events, its replica declared BAD.
    pub(crate) async fn rucio_step(
        &self,
        run: &mut Run<'_>,
        step: &Step,
        label: &str,
    ) -> Result<(), (String, u32)> {
        let Step::Rucio {
            rse,
            scope,
            name,
            pfn,
            dataset,
            rule,
        } = step
        else {
            return Err(("not a rucio step".into(), 1));
        };
        let Some(rucio) = &self.rucio else {
            return Err(("no [rucio] section".into(), 1));
        };
        let attempts = run.wf.attempts;
        let remove = run.upload.kind == EventKind::Remove;
        let ctx = &run.ctx;
        let value = |k: &str| ctx.values.get(k).cloned().unwrap_or_default();
        let (bytes, adler32) = if remove {
            (0, String::new())
        } else if run.verified_copy {
            let adler32 = adler32_of(&value("checksum")).ok_or((
                "no adler32 from this workflow's copy (dCache gave none?): not registered".into(),
                1,
            ))?;
            let bytes = value("size").parse().map_err(|_| {
                (
                    "no size from this workflow's copy: not registered".to_owned(),
                    1,
                )
            })?;
            (bytes, adler32)
        } else {
            // No copy: dCache's own size and adler32 of the original.
            let url = &run.mapped.source_url;
            let found: std::sync::Mutex<Option<(u64, String)>> = Default::default();
            retrying(label, attempts, &self.retry, || async {
                let (size, sums) = self.engine.describe(url).await.map_err(|e| {
                    StepError::transfer("asking dCache for the file's adler32: ", &e)
                })?;
                let adler32 = sums.iter().find_map(|c| adler32_of(&c.to_string()));
                match (size, adler32) {
                    (Some(size), Some(a)) => {
                        *found.lock().expect("lock") = Some((size, a));
                        Ok(())
                    }
                    _ => Err(StepError::fatal(
                        "dCache gave no size or no adler32 for the file: not registered",
                    )),
                }
            })
            .await
            .map_err(|(e, n)| (e.to_string(), n))?;
            found.into_inner().expect("lock").expect("set on success")
        };
        let registration = || -> Result<Registration, StepError> {
            let scope = ctx.render(scope)?;
            let dataset = match dataset {
                Some(d) if !remove => {
                    let d = ctx.render(d)?;
                    Some(match d.split_once(':') {
                        Some((s, n)) => (s.to_owned(), n.to_owned()),
                        None => (scope.clone(), d),
                    })
                }
                _ => None,
            };
            Ok(Registration {
                rse: ctx.render(rse)?,
                scope,
                name: ctx.render(name)?,
                bytes,
                adler32: adler32.clone(),
                pfn: pfn.as_ref().map(|p| ctx.render(p)).transpose()?,
                dataset,
                rule: rule.clone().filter(|_| !remove),
                bad: remove.then(|| "the file was removed from dCache (dcflow)".to_owned()),
            })
        };
        let reg = registration().map_err(|e| (e.to_string(), 1))?;
        // Waiting for Rucio is no transfer: the slot lets another file in meanwhile, which
        // is also what fills a batch (with the slot held, a batch never outgrew
        // maxdownloads).
        run.slot.release();
        let result = retrying(label, attempts, &self.retry, || rucio.register(reg.clone())).await;
        run.slot.retake().await;
        result.map(drop).map_err(|(e, n)| (e.to_string(), n))
    }
}

/// One file to register.
#[derive(Debug, Clone)]
pub struct Registration {
    pub rse: String,
    pub scope: String,
    pub name: String,
    pub bytes: u64,
    /// Eight lower-case hex digits, as Rucio keeps it.
    pub adler32: String,
    pub pfn: Option<String>,
    /// `(scope, name)` of the dataset to attach the file to.
    pub dataset: Option<(String, String)>,
    /// A replication rule (RSE expression, copies) on the dataset, or on the file without one.
    pub rule: Option<(String, u32)>,
    /// Not a registration: the replica is declared BAD, for this reason (its file was removed
    /// from dCache; Rucio's generic policy lets no account delete a replica).
    pub bad: Option<String>,
}

impl Registration {
    fn did(&self) -> String {
        format!("{}:{}", self.scope, self.name)
    }
}

struct Pending {
    reg: Registration,
    reply: oneshot::Sender<Result<(), StepError>>,
}

/// The client: registrations go through one gathering task.
pub struct Rucio {
    tx: mpsc::Sender<Pending>,
}

impl Rucio {
    /// The client: `[local] capath`'s CAs; with `x509`, `[local] proxy` as the client
    /// certificate.
    pub fn start(
        cfg: RucioConfig,
        creds: &dcflow_transfer::credentials::Credentials,
    ) -> anyhow::Result<Self> {
        let tls = match cfg.auth {
            RucioAuth::X509 => creds.tls_config()?,
            _ => rustls::ClientConfig::builder_with_provider(
                dcflow_transfer::credentials::provider(),
            )
            .with_safe_default_protocol_versions()?
            .with_root_certificates(creds.roots.clone())
            .with_no_client_auth(),
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .user_agent(concat!("dcflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (tx, rx) = mpsc::channel(cfg.batch * 4);
        let api = Api {
            client,
            cfg,
            token: tokio::sync::Mutex::new(None),
        };
        tokio::spawn(gather(api, rx));
        Ok(Self { tx })
    }

    /// Registers one file (with others that arrive meanwhile); `Ok` once the replica and the
    /// dataset membership are in Rucio.
    pub async fn register(&self, reg: Registration) -> Result<(), StepError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { reg, reply })
            .await
            .map_err(|_| StepError::retry("the Rucio client stopped"))?;
        answer
            .await
            .map_err(|_| StepError::retry("the Rucio client stopped"))?
    }
}

/// Takes the first registration, then whatever else comes within `batchwait`, up to `batch`,
/// and registers them together.
async fn gather(api: Api, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + api.cfg.batch_wait;
        while batch.len() < api.cfg.batch {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        api.register(batch).await;
    }
}

/// An answer of Rucio's: status, its exception class (`ExceptionClass` header) and body.
struct Answer {
    status: StatusCode,
    class: String,
    body: String,
}

impl Answer {
    fn error(&self, what: &str) -> StepError {
        let message = format!(
            "Rucio {what}: {} {}{}",
            self.status.as_u16(),
            self.class,
            exception_message(&self.body)
        );
        // Rucio 41.5.1 answers a name its schema refuses (a space in it, say) with 500
        // InvalidObject: that fails the same way every time.
        let refusal = ["InvalidObject", "InvalidPath", "RSEProtocolNotSupported"]
            .contains(&self.class.as_str());
        if !refusal && (self.status.is_server_error() || self.status.as_u16() == 429) {
            StepError::retry(message)
        } else {
            StepError::fatal(message)
        }
    }
}

/// `ExceptionMessage` from Rucio's JSON error body, cut short.
fn exception_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["ExceptionMessage"].as_str().map(str::to_owned))
        .map(|m| format!(" ({})", dcflow_core::text::bounded(&m, 300)))
        .unwrap_or_default()
}

struct Api {
    client: reqwest::Client,
    cfg: RucioConfig,
    /// The userpass token and when to renew it.
    token: tokio::sync::Mutex<Option<(HeaderValue, Instant)>>,
}

impl Api {
    async fn token(&self, renew: bool) -> Result<HeaderValue, StepError> {
        match &self.cfg.auth {
            RucioAuth::TokenFile(path) => {
                let t = std::fs::read_to_string(path).map_err(|e| {
                    StepError::retry(format!(
                        "cannot read [rucio] tokenfile {}: {e}",
                        path.display()
                    ))
                })?;
                sensitive(t.trim())
            }
            auth => {
                let mut cached = self.token.lock().await;
                if let Some((t, renew_at)) = cached.as_ref() {
                    if !renew && Instant::now() < *renew_at {
                        return Ok(t.clone());
                    }
                }
                let (req, who) = match auth {
                    RucioAuth::UserPass { username, password } => (
                        self.client
                            .get(join(&self.cfg.auth_url, "auth/userpass")?)
                            .header("X-Rucio-Username", username)
                            .header("X-Rucio-Password", sensitive(password)?),
                        format!("as {username}"),
                    ),
                    // The client certificate (the [local] proxy) is the credential.
                    _ => (
                        self.client.get(join(&self.cfg.auth_url, "auth/x509")?),
                        "with the X.509 proxy".to_owned(),
                    ),
                };
                let resp = req
                    .header("X-Rucio-Account", &self.cfg.account)
                    .send()
                    .await
                    .map_err(|e| {
                        StepError::retry(format!(
                            "Rucio sign-in: {}",
                            dcflow_core::text::causes(&e.without_url())
                        ))
                    })?;
                let status = resp.status();
                let class = header(&resp, "ExceptionClass");
                let headers = resp.headers().clone();
                if !status.is_success() {
                    let body = resp.text().await.unwrap_or_default();
                    return Err(Answer {
                        status,
                        class,
                        body,
                    }
                    .error(&format!(
                        "refused the sign-in of account {} {who}",
                        self.cfg.account
                    )));
                }
                let token = headers
                    .get("X-Rucio-Auth-Token")
                    .and_then(|t| t.to_str().ok())
                    .ok_or_else(|| StepError::retry("Rucio sign-in: no X-Rucio-Auth-Token"))?;
                // Renewed 5 minutes before Rucio's expiry (1 h on 41.5.1), or after 50 min.
                let lifetime = headers
                    .get("X-Rucio-Auth-Token-Expires")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| httpdate::parse_http_date(v).ok())
                    .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                    .unwrap_or(Duration::from_secs(3600));
                let renew_at = Instant::now() + lifetime.saturating_sub(Duration::from_secs(300));
                let value = sensitive(token)?;
                *cached = Some((value.clone(), renew_at));
                info!(account = %self.cfg.account, "RUCIO signed in {who}");
                Ok(value)
            }
        }
    }

    /// One call; a 401 renews the token and tries once more.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, StepError> {
        let url = join(&self.cfg.url, path)?;
        let mut renewed = false;
        loop {
            let mut req = self
                .client
                .request(method.clone(), url.clone())
                .header("X-Rucio-Auth-Token", self.token(renewed).await?);
            if let Some(b) = &body {
                req = req
                    .header("Content-Type", "application/json")
                    .body(b.to_string());
            }
            let resp = req.send().await.map_err(|e| {
                let what = if e.is_timeout() {
                    format!("no answer within {} s", self.cfg.timeout.as_secs())
                } else {
                    format!(
                        "cannot reach it: {}",
                        dcflow_core::text::causes(&e.without_url())
                    )
                };
                StepError::retry(format!("Rucio {} {path}: {what}", method))
            })?;
            let status = resp.status();
            let class = header(&resp, "ExceptionClass");
            let body = resp.text().await.unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED && !renewed {
                renewed = true;
                continue;
            }
            return Ok(Answer {
                status,
                class,
                body,
            });
        }
    }

    /// Registers a batch and answers each file.
    async fn register(&self, batch: Vec<Pending>) {
        let regs: Vec<Registration> = batch.iter().map(|p| p.reg.clone()).collect();
        let results = self.register_all(&regs).await;
        for (p, r) in batch.into_iter().zip(results) {
            let _ = p.reply.send(r);
        }
    }

    /// One result per registration, in order.
    async fn register_all(&self, regs: &[Registration]) -> Vec<Result<(), StepError>> {
        let mut results: Vec<Result<(), StepError>> = vec![Ok(()); regs.len()];
        let bad: Vec<usize> = (0..regs.len()).filter(|&i| regs[i].bad.is_some()).collect();
        if !bad.is_empty() {
            let outcome = self.declare_bad(regs, &bad).await;
            for (&i, r) in bad.iter().zip(outcome) {
                results[i] = r;
            }
            if bad.len() == regs.len() {
                return results;
            }
        }
        // What Rucio has already: the same bytes and adler32 is fine, others are refused.
        match self.known(regs).await {
            Ok(known) => {
                for (i, r) in regs.iter().enumerate().filter(|(_, r)| r.bad.is_none()) {
                    if let Some((bytes, adler32)) = known.get(&r.did()) {
                        if *bytes != r.bytes || !adler32.eq_ignore_ascii_case(&r.adler32) {
                            results[i] = Err(StepError::fatal(format!(
                                "Rucio has {} with {bytes} bytes and adler32 {adler32}; this copy has {} bytes and adler32 {}: not registered (Rucio would accept it silently)",
                                r.did(),
                                r.bytes,
                                r.adler32
                            )));
                        }
                    }
                }
            }
            Err(e) => return vec![Err(e); regs.len()],
        }
        // One POST /replicas per RSE.
        let mut by_rse: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, r) in regs.iter().enumerate() {
            if results[i].is_ok() && r.bad.is_none() {
                by_rse.entry(&r.rse).or_default().push(i);
            }
        }
        for (rse, idx) in by_rse {
            let outcome = self.add_replicas(rse, regs, &idx).await;
            for (i, r) in idx.into_iter().zip(outcome) {
                results[i] = r;
            }
        }
        // One attach per dataset.
        let mut by_dataset: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        for (i, r) in regs.iter().enumerate() {
            if let (Ok(()), Some((s, n))) = (&results[i], &r.dataset) {
                by_dataset.entry((s, n)).or_default().push(i);
            }
        }
        for ((scope, name), idx) in by_dataset {
            let outcome = self.attach(scope, name, regs, &idx).await;
            for (i, r) in idx.into_iter().zip(outcome) {
                results[i] = r;
            }
        }
        // One rule per dataset (or file) and expression.
        let mut by_rule: BTreeMap<(String, String, &str, u32), Vec<usize>> = BTreeMap::new();
        for (i, r) in regs.iter().enumerate() {
            if let (Ok(()), Some((expr, copies)), None) = (&results[i], &r.rule, &r.bad) {
                let (s, n) = r
                    .dataset
                    .clone()
                    .unwrap_or((r.scope.clone(), r.name.clone()));
                by_rule.entry((s, n, expr, *copies)).or_default().push(i);
            }
        }
        for ((scope, name, expr, copies), idx) in by_rule {
            if let Err(e) = self.rule(&scope, &name, expr, copies).await {
                for i in idx {
                    results[i] = Err(e.clone());
                }
            }
        }
        results
    }

    /// A rule of `copies` on `expr` for `scope:name`; one that exists already (409
    /// `DuplicateRule`) is done.
    async fn rule(
        &self,
        scope: &str,
        name: &str,
        expr: &str,
        copies: u32,
    ) -> Result<(), StepError> {
        let body = json!({
            "dids": [{"scope": scope, "name": name}],
            "copies": copies,
            "rse_expression": expr,
            "account": self.cfg.account,
        });
        let a = self.call(Method::POST, "rules/", Some(body)).await?;
        if a.status.is_success() {
            info!(did = %format!("{scope}:{name}"), rse_expression = expr, "RUCIO_RULE {copies} cop(ies) of {scope}:{name} on {expr}");
            return Ok(());
        }
        if a.status == StatusCode::CONFLICT && a.class == "DuplicateRule" {
            return Ok(());
        }
        let hint = if a.class == "InsufficientAccountLimit" {
            format!(
                " (give account {} a limit on those RSEs: POST /accounts/{}/limits/local/<RSE>)",
                self.cfg.account, self.cfg.account
            )
        } else {
            String::new()
        };
        let e = a.error(&format!("refused a rule on {expr} for {scope}:{name}"));
        Err(match e {
            StepError::Refused(m) => StepError::Refused(m + &hint),
            other => other,
        })
    }

    /// Declares the replicas of `idx` BAD, in one call. Rucio answers which it does not know:
    /// never registered, or gone already; those are done too.
    async fn declare_bad(
        &self,
        regs: &[Registration],
        idx: &[usize],
    ) -> Vec<Result<(), StepError>> {
        let replicas: Vec<Value> = idx
            .iter()
            .map(|&i| json!({"scope": regs[i].scope, "name": regs[i].name, "rse": regs[i].rse}))
            .collect();
        let reason = regs[idx[0]].bad.clone().unwrap_or_default();
        let body = json!({"replicas": replicas, "reason": reason});
        match self.call(Method::POST, "replicas/bad", Some(body)).await {
            Ok(a) if a.status.is_success() => {
                let unknown = serde_json::from_str::<Value>(&a.body)
                    .ok()
                    .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()));
                info!(
                    files = idx.len(),
                    unknown = %unknown.map(|u| u.to_string()).unwrap_or_default(),
                    "RUCIO_BAD {} replica(s) declared bad",
                    idx.len()
                );
                vec![Ok(()); idx.len()]
            }
            Ok(a) => vec![Err(a.error("refused to declare replicas bad")); idx.len()],
            Err(e) => vec![Err(e); idx.len()],
        }
    }

    /// `scope:name` → (bytes, adler32) of the files Rucio has replicas of.
    async fn known(
        &self,
        regs: &[Registration],
    ) -> Result<HashMap<String, (u64, String)>, StepError> {
        let dids: Vec<Value> = regs
            .iter()
            .filter(|r| r.bad.is_none())
            .map(|r| json!({"scope": r.scope, "name": r.name}))
            .collect();
        let a = self
            .call(
                Method::POST,
                "replicas/list",
                Some(json!({"dids": dids, "all_states": true})),
            )
            .await?;
        if !a.status.is_success() {
            return Err(a.error("listing replicas"));
        }
        let mut known = HashMap::new();
        for line in a.body.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| StepError::retry(format!("Rucio's replica list: {e}")))?;
            if let (Some(s), Some(n), Some(b)) =
                (v["scope"].as_str(), v["name"].as_str(), v["bytes"].as_u64())
            {
                let adler32 = v["adler32"].as_str().unwrap_or_default().to_owned();
                known.insert(format!("{s}:{n}"), (b, adler32));
            }
        }
        Ok(known)
    }

    async fn add_replicas(
        &self,
        rse: &str,
        regs: &[Registration],
        idx: &[usize],
    ) -> Vec<Result<(), StepError>> {
        let files = |idx: &[usize]| -> Vec<Value> {
            idx.iter()
                .map(|&i| {
                    let r = &regs[i];
                    let mut f = json!({"scope": r.scope, "name": r.name, "bytes": r.bytes, "adler32": r.adler32});
                    if let Some(pfn) = &r.pfn {
                        f["pfn"] = json!(pfn);
                    }
                    f
                })
                .collect()
        };
        let body = json!({"rse": rse, "files": files(idx)});
        match self.call(Method::POST, "replicas", Some(body)).await {
            Ok(a) if a.status.is_success() => {
                info!(
                    rse,
                    files = idx.len(),
                    "RUCIO_REPLICAS {} file(s) registered on {rse} in one call",
                    idx.len()
                );
                vec![Ok(()); idx.len()]
            }
            // One file refused refuses the call: each on its own, to tell which.
            Ok(a) if a.status.is_client_error() && idx.len() > 1 => {
                warn!(
                    rse,
                    "RUCIO_REPLICAS a batch of {} refused ({} {}): registering one at a time",
                    idx.len(),
                    a.status.as_u16(),
                    a.class
                );
                let mut out = Vec::new();
                for &i in idx {
                    let body = json!({"rse": rse, "files": files(&[i])});
                    out.push(
                        match self.call(Method::POST, "replicas", Some(body)).await {
                            Ok(a) if a.status.is_success() => Ok(()),
                            Ok(a) => Err(a.error(&format!(
                                "refused the replica of {} on {rse}",
                                regs[i].did()
                            ))),
                            Err(e) => Err(e),
                        },
                    );
                }
                out
            }
            Ok(a) => vec![Err(a.error(&format!("refused the replicas on {rse}"))); idx.len()],
            Err(e) => vec![Err(e); idx.len()],
        }
    }

    async fn attach(
        &self,
        scope: &str,
        name: &str,
        regs: &[Registration],
        idx: &[usize],
    ) -> Vec<Result<(), StepError>> {
        let path = format!("dids/{}/{}/dids", seg(scope), seg(name));
        let dids = |idx: &[usize]| -> Value {
            json!({"dids": idx.iter().map(|&i| json!({"scope": regs[i].scope, "name": regs[i].name})).collect::<Vec<_>>()})
        };
        let dataset = format!("{scope}:{name}");
        let mut created = false;
        loop {
            let a = match self.call(Method::POST, &path, Some(dids(idx))).await {
                Ok(a) => a,
                Err(e) => return vec![Err(e); idx.len()],
            };
            if a.status.is_success() {
                info!(
                    dataset,
                    files = idx.len(),
                    "RUCIO_ATTACH {} file(s) attached to {dataset}",
                    idx.len()
                );
                return vec![Ok(()); idx.len()];
            }
            if a.status == StatusCode::NOT_FOUND && a.class == "DataIdentifierNotFound" && !created
            {
                created = true;
                let c = self
                    .call(
                        Method::POST,
                        &format!("dids/{}/{}", seg(scope), seg(name)),
                        Some(json!({"type": "DATASET"})),
                    )
                    .await;
                match c {
                    Ok(c) if c.status.is_success() => {
                        info!(dataset, "RUCIO_DATASET {dataset} created");
                    }
                    Ok(c) if c.status == StatusCode::CONFLICT => {}
                    Ok(c) => {
                        return vec![
                            Err(c.error(&format!("refused to create {dataset}")));
                            idx.len()
                        ]
                    }
                    Err(e) => return vec![Err(e); idx.len()],
                }
                continue;
            }
            // Some were attached already (a redelivery): each on its own, 409 is done.
            if a.status == StatusCode::CONFLICT && idx.len() > 1 {
                let mut out = Vec::new();
                for &i in idx {
                    out.push(
                        match self.call(Method::POST, &path, Some(dids(&[i]))).await {
                            Ok(a) if a.status.is_success() || a.status == StatusCode::CONFLICT => {
                                Ok(())
                            }
                            Ok(a) => Err(a.error(&format!(
                                "refused to attach {} to {dataset}",
                                regs[i].did()
                            ))),
                            Err(e) => Err(e),
                        },
                    );
                }
                return out;
            }
            if a.status == StatusCode::CONFLICT {
                return vec![Ok(())];
            }
            return vec![Err(a.error(&format!("refused to attach to {dataset}"))); idx.len()];
        }
    }
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn sensitive(value: &str) -> Result<HeaderValue, StepError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        StepError::fatal("a Rucio credential holds characters not allowed in a header")
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn join(base: &url::Url, path: &str) -> Result<url::Url, StepError> {
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join(path)
        .map_err(|e| StepError::fatal(format!("Rucio URL {base} + {path}: {e}")))
}

/// A scope or name as one path segment.
fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `adler32:0a5a0001` (the copy's record) → `0a5a0001`.
pub fn adler32_of(checksum: &str) -> Option<String> {
    let (kind, value) = checksum.split_once(':')?;
    (kind.eq_ignore_ascii_case("adler32") && value.len() == 8).then(|| value.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_s_adler32_is_what_rucio_keeps() {
        assert_eq!(adler32_of("adler32:0A5A0001").as_deref(), Some("0a5a0001"));
        assert_eq!(adler32_of("md5:00"), None);
        assert_eq!(adler32_of(""), None);
    }

    #[test]
    fn rucio_s_error_body_gives_its_message() {
        let body = r#"{"ExceptionClass": "DataIdentifierNotFound", "ExceptionMessage": "Data identifier 'test:nope' not found"}"#;
        assert_eq!(
            exception_message(body),
            " (Data identifier 'test:nope' not found)"
        );
        assert_eq!(exception_message("<html>"), "");
    }

    #[test]
    fn a_500_that_is_a_refusal_is_not_retried() {
        let answer = |status: u16, class: &str| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            class: class.into(),
            body: String::new(),
        };
        // Seen on 41.5.1 for a name with a space: 500 InvalidObject.
        assert!(!answer(500, "InvalidObject").error("x").is_retryable());
        assert!(answer(500, "DatabaseException").error("x").is_retryable());
        assert!(answer(503, "").error("x").is_retryable());
        assert!(!answer(409, "InsufficientAccountLimit")
            .error("x")
            .is_retryable());
    }
}
