//! Credentials: trusted CAs from a grid CA folder, an X.509 proxy (RFC 3820) as TLS client
//! certificate, a bearer token. Proxy and token files are re-read when they change on disk,
//! so an operator (or a cron job running voms-proxy-init / htgettoken) can rotate them
//! without restarting dcflow.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dcflow_core::config::{AuthConfig, CredentialPath, Origin, TokenCandidate};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("CA folder {path} ({origin}): {why}")]
    CaPath {
        path: PathBuf,
        origin: String,
        why: String,
    },
    #[error("proxy {path} ({origin}): {why}")]
    Proxy {
        path: PathBuf,
        origin: String,
        why: String,
    },
    #[error("token {what}: {why}")]
    Token { what: String, why: String },
}

/// A bearer token. Its value is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The crypto provider every TLS connection of dcflow uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Trusted CAs: every certificate in `*.0`..`*.9`, `*.pem` and `*.crt` files of the folder;
/// CRLs (`*.r0`), signing policies, namespaces and other files are skipped.
pub fn load_roots(capath: &CredentialPath) -> Result<(RootCertStore, usize), CredentialError> {
    let err = |why: String| CredentialError::CaPath {
        path: capath.path.clone(),
        origin: capath.origin.to_string(),
        why,
    };
    let entries = std::fs::read_dir(&capath.path).map_err(|e| {
        err(format!(
            "cannot read: {e}; set [local] capath, or $X509_CERT_DIR, to the folder of the \
             trusted CA certificates (hashed *.0 files, as in /etc/grid-security/certificates)"
        ))
    })?;
    let mut roots = RootCertStore::empty();
    let mut files = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let is_cert =
            ext == "pem" || ext == "crt" || (ext.len() == 1 && ext.as_bytes()[0].is_ascii_digit());
        if !is_cert {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut bytes.as_slice())
            .flatten()
            .collect();
        let (added, ignored) = roots.add_parsable_certificates(certs);
        if ignored > 0 {
            tracing::debug!(file = %path.display(), ignored, "unusable CA certificate skipped");
        }
        files += usize::from(added > 0);
    }
    if roots.is_empty() {
        return Err(err("holds no CA certificate (*.0 or *.pem)".into()));
    }
    Ok((roots, files))
}

/// What a proxy file holds, once checked.
#[derive(Debug, Clone)]
pub struct ProxyInfo {
    pub path: PathBuf,
    pub origin: Origin,
    pub subject: String,
    pub not_after: OffsetDateTime,
    pub chain_len: usize,
}

impl ProxyInfo {
    pub fn expired(&self) -> bool {
        self.not_after < OffsetDateTime::now_utc()
    }
}

/// Reads a proxy file: certificates in order (proxy first, then the user certificate and any
/// chain) and one private key (PKCS#1 `RSA PRIVATE KEY`, PKCS#8, or SEC1 EC key).
fn read_proxy(
    path: &Path,
    origin: &Origin,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, ProxyInfo), CredentialError> {
    let err = |why: String| CredentialError::Proxy {
        path: path.to_owned(),
        origin: origin.to_string(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    // Grid tools refuse a proxy that others can read (its key is in it); so does dcflow.
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "readable by others (mode {mode:04o}): its private key is exposed; \
                 `chmod 600 {}` (voms-proxy-init writes 0600)",
                path.display()
            )));
        }
    }
    let mut chain = Vec::new();
    let mut key: Option<PrivateKeyDer<'static>> = None;
    for item in rustls_pemfile::read_all(&mut bytes.as_slice()) {
        match item.map_err(|e| err(format!("not PEM: {e}")))? {
            rustls_pemfile::Item::X509Certificate(c) => chain.push(c),
            rustls_pemfile::Item::Pkcs1Key(k) => key = key.or(Some(k.into())),
            rustls_pemfile::Item::Pkcs8Key(k) => key = key.or(Some(k.into())),
            rustls_pemfile::Item::Sec1Key(k) => key = key.or(Some(k.into())),
            _ => {}
        }
    }
    let first = chain
        .first()
        .ok_or_else(|| err("holds no certificate".into()))?;
    let key = key.ok_or_else(|| err("holds no private key (PKCS#1 or PKCS#8)".into()))?;
    let (_, cert) =
        X509Certificate::from_der(first).map_err(|e| err(format!("bad certificate: {e}")))?;
    let not_after = cert.validity().not_after.to_datetime();
    let subject = cert.subject().to_string();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| err(format!("unusable private key: {e}")))?;
    let info = ProxyInfo {
        path: path.to_owned(),
        origin: origin.clone(),
        subject,
        not_after,
        chain_len: chain.len(),
    };
    Ok((Arc::new(CertifiedKey::new(chain, signing)), info))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The client certificate, re-read when the proxy file changes.
#[derive(Debug)]
pub struct ProxyResolver {
    provider: Arc<CryptoProvider>,
    cached: Mutex<(Option<SystemTime>, Arc<CertifiedKey>, ProxyInfo)>,
}

impl ProxyResolver {
    pub fn info(&self) -> ProxyInfo {
        self.refresh();
        self.cached.lock().expect("proxy lock").2.clone()
    }

    fn refresh(&self) {
        let mut cached = self.cached.lock().expect("proxy lock");
        let now = mtime(&cached.2.path);
        if now == cached.0 {
            return;
        }
        match read_proxy(&cached.2.path, &cached.2.origin, &self.provider) {
            Ok((key, info)) => {
                tracing::info!(proxy = %info.path.display(), not_after = %info.not_after, "proxy reloaded");
                *cached = (now, key, info);
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy changed but cannot be loaded; keeping the previous one")
            }
        }
    }
}

impl ResolvesClientCert for ProxyResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        let cached = self.cached.lock().expect("proxy lock");
        if cached.2.expired() {
            tracing::error!(proxy = %cached.2.path.display(), not_after = %cached.2.not_after, "proxy expired: renew it");
        }
        Some(cached.1.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A token read from a file, re-read when the file changes, or given as a value.
#[derive(Debug)]
pub struct TokenSource {
    file: Option<PathBuf>,
    origin: String,
    cached: Mutex<(Option<SystemTime>, Secret)>,
}

impl TokenSource {
    fn read(path: &Path) -> Result<Secret, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        let token = text.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err("must hold one token on one line".into());
        }
        Ok(Secret(token.to_owned()))
    }

    /// The current token (re-read if its file changed).
    pub fn get(&self) -> Secret {
        let mut cached = self.cached.lock().expect("token lock");
        if let Some(path) = &self.file {
            let now = mtime(path);
            if now != cached.0 {
                match Self::read(path) {
                    Ok(t) => *cached = (now, t),
                    Err(e) => {
                        tracing::warn!(token = %path.display(), error = %e, "token changed but cannot be read")
                    }
                }
            }
        }
        cached.1.clone()
    }

    /// When the token expires, if it says: the `exp` claim of a JWT (WLCG, SciTokens, OIDC).
    /// A macaroon's validity is a caveat that only dCache reads: `None`.
    pub fn expires(&self) -> Option<i64> {
        jwt_exp(self.get().expose())
    }

    /// Where the token comes from, for summaries and error hints.
    pub fn describe(&self) -> String {
        match &self.file {
            Some(p) => format!("{} ({})", p.display(), self.origin),
            None => self.origin.clone(),
        }
    }
}

/// The `exp` claim (Unix seconds) of a JWT's payload, without checking the signature (only
/// for telling the operator when it runs out).
fn jwt_exp(token: &str) -> Option<i64> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

/// Everything needed to talk to the door.
#[derive(Debug)]
pub struct Credentials {
    pub roots: RootCertStore,
    pub ca_files: usize,
    pub capath: CredentialPath,
    pub proxy: Option<Arc<ProxyResolver>>,
    pub token: Option<Arc<TokenSource>>,
}

/// The first proxy candidate that exists (an explicitly named one must), checked.
fn load_proxy(auth: &AuthConfig) -> Result<Option<Arc<ProxyResolver>>, CredentialError> {
    let provider = provider();
    for candidate in &auth.proxy {
        if !candidate.required() && !candidate.path.exists() {
            continue;
        }
        let (key, info) = read_proxy(&candidate.path, &candidate.origin, &provider)?;
        if info.expired() {
            return Err(CredentialError::Proxy {
                path: info.path.clone(),
                origin: info.origin.to_string(),
                why: format!(
                    "expired at {}: renew it (voms-proxy-init / grid-proxy-init)",
                    info.not_after
                ),
            });
        }
        let stamp = mtime(&candidate.path);
        return Ok(Some(Arc::new(ProxyResolver {
            provider: provider.clone(),
            cached: Mutex::new((stamp, key, info)),
        })));
    }
    Ok(None)
}

/// The first bearer token candidate that is available (a named file must be).
fn load_token(auth: &AuthConfig) -> Result<Option<TokenSource>, CredentialError> {
    for candidate in &auth.token {
        match candidate {
            TokenCandidate::Value(v) => {
                return Ok(Some(TokenSource {
                    file: None,
                    origin: "$BEARER_TOKEN".into(),
                    cached: Mutex::new((None, Secret(v.clone()))),
                }));
            }
            TokenCandidate::File(c) if !c.required() && !c.path.exists() => continue,
            TokenCandidate::File(c) => {
                let secret = TokenSource::read(&c.path).map_err(|why| CredentialError::Token {
                    what: format!("{} ({})", c.path.display(), c.origin),
                    why,
                })?;
                return Ok(Some(TokenSource {
                    file: Some(c.path.clone()),
                    origin: c.origin.to_string(),
                    cached: Mutex::new((mtime(&c.path), secret)),
                }));
            }
        }
    }
    Ok(None)
}

impl Credentials {
    /// Loads credentials as configured; an explicitly named file that is missing or bad is an
    /// error, a default location that does not exist is skipped.
    pub fn load(auth: &AuthConfig) -> Result<Self, CredentialError> {
        let (roots, ca_files) = load_roots(&auth.capath)?;
        let proxy = load_proxy(auth)?;
        let token = load_token(auth)?;
        Ok(Self {
            roots,
            ca_files,
            capath: auth.capath.clone(),
            proxy,
            token: token.map(Arc::new),
        })
    }

    /// Every problem of the credentials at once (the CA folder, the proxy, the token, each
    /// checked on its own), for `check-config`; [`Credentials::load`] stops at the first.
    pub fn problems(auth: &AuthConfig) -> Vec<CredentialError> {
        [
            load_roots(&auth.capath).err(),
            load_proxy(auth).err(),
            load_token(auth).err(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// When each credential in use expires (Unix seconds), for `/metrics`: the proxy's
    /// `notAfter` (re-read when the file changes), a JWT token's `exp`.
    pub fn expiries(&self) -> Vec<(&'static str, i64)> {
        let mut out = Vec::new();
        if let Some(p) = &self.proxy {
            out.push(("proxy", p.info().not_after.unix_timestamp()));
        }
        if let Some(exp) = self.token.as_ref().and_then(|t| t.expires()) {
            out.push(("token", exp));
        }
        out
    }

    /// The TLS configuration for every connection: these roots, this client certificate.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, rustls::Error> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.proxy {
            Some(p) => builder.with_client_cert_resolver(p.clone()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A likely cause for a 401/403, naming the credential in use (never its value).
    pub fn auth_hint(&self) -> String {
        let mut hints = Vec::new();
        if let Some(t) = &self.token {
            hints.push(format!(
                "the bearer token from {} was rejected (expired, wrong audience or scope?)",
                t.describe()
            ));
        }
        if let Some(p) = &self.proxy {
            let info = p.info();
            if info.expired() {
                hints.push(format!(
                    "the proxy {} expired at {}",
                    info.path.display(),
                    info.not_after
                ));
            } else {
                hints.push(format!(
                    "the proxy {} ({}) is not authorised (VO membership, gridmap?)",
                    info.path.display(),
                    info.subject
                ));
            }
        }
        if hints.is_empty() {
            hints.push("no credential is configured (set local.proxy or local.token)".into());
        }
        hints.join("; ")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_jwt_tells_when_it_expires_and_a_macaroon_does_not() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"ES256"}"#),
            b64(r#"{"sub":"x","exp":1796400000}"#)
        );
        assert_eq!(super::jwt_exp(&jwt), Some(1796400000));
        assert_eq!(
            super::jwt_exp("MDAxY2xvY2F0aW9uIE9wdGlvbmFsLmVtcHR5CjAwMThpZGVudGlmaWVy"),
            None
        );
    }
}
