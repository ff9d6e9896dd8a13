//! A grid PKI made at run time: a test CA laid out like `/etc/grid-security/certificates`, a
//! host certificate for door and pool, a user certificate and an RFC 3820 proxy of it, and the
//! door's client-certificate check that accepts proxy chains (which WebPKI does not: a proxy is
//! issued by an end-entity certificate).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// OID of the RFC 3820 ProxyCertInfo extension.
pub const PROXY_CERT_INFO: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 14];
const PROXY_CERT_INFO_STR: &str = "1.3.6.1.5.5.7.1.14";
/// DER of `ProxyCertInfo { proxyPolicy { id-ppl-inheritAll } }`.
const INHERIT_ALL_POLICY: &[u8] = &[
    0x30, 0x0c, 0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x15, 0x01,
];

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Key type for the user's proxy: grid proxies are usually RSA (key as PKCS#1 PEM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKey {
    /// RSA 2048, key written as `BEGIN RSA PRIVATE KEY` (PKCS#1), as voms-proxy-init does.
    RsaPkcs1,
    /// ECDSA P-256, key written as `BEGIN PRIVATE KEY` (PKCS#8).
    EcdsaPkcs8,
}

/// What a PKI writes to disk.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// CA folder: `<hash>.0`, `<hash>.signing_policy`, `<hash>.r0`.
    pub capath: PathBuf,
    /// The CA certificate alone (for curl's `--cacert`).
    pub ca_pem: PathBuf,
    /// Proxy file: proxy certificate, its key, then the user certificate.
    pub proxy: PathBuf,
    /// An already expired proxy of the same user.
    pub expired_proxy: PathBuf,
    pub user_cert: PathBuf,
    pub user_key: PathBuf,
    /// The user's DN, as dCache's `owner` shows it.
    pub user_dn: String,
}

/// The CA and server identity the emulator runs with.
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    pub files: PkiFiles,
}

impl Pki {
    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.server_key.clone()).expect("PKCS#8 server key")
    }

    /// Creates the CA, host, user and proxy credentials under `dir`.
    // Long on purpose: the test PKI's certificates one after the other (CA, host, user,
    // proxies); each step is a few builder calls that read best in order.
    pub fn create(dir: &Path, proxy_key: ProxyKey) -> Result<Self> {
        let capath = dir.join("certificates");
        std::fs::create_dir_all(&capath)?;
        let now = OffsetDateTime::now_utc();

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = dn(&[
            (DnType::OrganizationName, "dcache-sim"),
            (DnType::CommonName, "dcache-sim Test CA"),
        ]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.not_before = now - Duration::days(1);
        ca_params.not_after = now + Duration::days(365);
        let ca = ca_params.self_signed(&ca_key)?;
        let hash = format!("{:08x}", adler2::adler32_slice(ca.der().as_ref()));
        write(
            &capath.join(format!("{hash}.0")),
            ca.pem().as_bytes(),
            0o644,
        )?;
        write(
            &capath.join(format!("{hash}.signing_policy")),
            b"access_id_CA X509 '/O=dcache-sim/CN=dcache-sim Test CA'\npos_rights globus CA:sign\ncond_subjects globus '\"/O=dcache-sim/*\"'\n",
            0o644,
        )?;
        let crl = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(30),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca, &ca_key)?;
        write(
            &capath.join(format!("{hash}.r0")),
            crl.pem()?.as_bytes(),
            0o644,
        )?;
        let ca_pem = dir.join("ca.pem");
        write(&ca_pem, ca.pem().as_bytes(), 0o644)?;

        let server_key = KeyPair::generate()?;
        let mut host = CertificateParams::default();
        host.distinguished_name = dn(&[
            (DnType::OrganizationName, "dcache-sim"),
            (DnType::CommonName, "localhost"),
        ]);
        host.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress("127.0.0.1".parse()?),
        ];
        host.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        host.not_before = now - Duration::days(1);
        host.not_after = now + Duration::days(30);
        let host_cert = host.signed_by(&server_key, &ca, &ca_key)?;

        let user_key = KeyPair::generate()?;
        let mut user = CertificateParams::default();
        user.distinguished_name = dn(&[
            (DnType::OrganizationName, "dcache-sim"),
            (DnType::OrganizationalUnitName, "users"),
            (DnType::CommonName, "Jane Doe"),
        ]);
        user.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        user.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        user.not_before = now - Duration::days(1);
        user.not_after = now + Duration::days(365);
        let user_cert = user.signed_by(&user_key, &ca, &ca_key)?;
        let user_cert_path = dir.join("usercert.pem");
        let user_key_path = dir.join("userkey.pem");
        write(&user_cert_path, user_cert.pem().as_bytes(), 0o644)?;
        write(&user_key_path, user_key.serialize_pem().as_bytes(), 0o600)?;

        let proxy = dir.join("x509up");
        let expired_proxy = dir.join("x509up-expired");
        for (path, not_after) in [
            (&proxy, now + Duration::hours(12)),
            (&expired_proxy, now - Duration::hours(1)),
        ] {
            let (key_der, key_pem) = proxy_keypair(proxy_key)?;
            let key = KeyPair::try_from(key_der.as_slice())?;
            let mut p = CertificateParams::default();
            let serial: u32 = rand::random::<u32>() >> 1;
            p.distinguished_name = dn(&[
                (DnType::OrganizationName, "dcache-sim"),
                (DnType::OrganizationalUnitName, "users"),
                (DnType::CommonName, "Jane Doe"),
                // A second CN (the proxy's serial): rcgen keeps one entry per type, so the
                // same OID is pushed as a custom type.
                (DnType::CustomDnType(vec![2, 5, 4, 3]), &serial.to_string()),
            ]);
            p.serial_number = Some(SerialNumber::from(serial as u64));
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let mut pci =
                CustomExtension::from_oid_content(PROXY_CERT_INFO, INHERIT_ALL_POLICY.to_vec());
            pci.set_criticality(true);
            p.custom_extensions = vec![pci];
            p.not_before = now - Duration::hours(2);
            p.not_after = not_after;
            let cert = p.signed_by(&key, &user_cert, &user_key)?;
            let pem = format!("{}{}{}", cert.pem(), key_pem, user_cert.pem());
            write(path, pem.as_bytes(), 0o600)?;
        }

        Ok(Self {
            ca_der: ca.der().clone(),
            server_chain: vec![host_cert.der().clone()],
            server_key: server_key.serialize_der(),
            files: PkiFiles {
                capath,
                ca_pem,
                proxy,
                expired_proxy,
                user_cert: user_cert_path,
                user_key: user_key_path,
                user_dn: "/O=dcache-sim/OU=users/CN=Jane Doe".into(),
            },
        })
    }
}

fn dn(parts: &[(DnType, &str)]) -> rcgen::DistinguishedName {
    let mut d = rcgen::DistinguishedName::new();
    for (ty, v) in parts {
        d.push(ty.clone(), *v);
    }
    d
}

/// Returns (PKCS#8 DER for signing, PEM as written into the proxy file).
fn proxy_keypair(kind: ProxyKey) -> Result<(Vec<u8>, String)> {
    match kind {
        ProxyKey::EcdsaPkcs8 => {
            let k = KeyPair::generate()?;
            Ok((k.serialize_der(), k.serialize_pem()))
        }
        ProxyKey::RsaPkcs1 => {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            use rsa::pkcs8::EncodePrivateKey;
            let k = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
            let pkcs8 = k.to_pkcs8_der()?.as_bytes().to_vec();
            let pem = k.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)?.to_string();
            Ok((pkcs8, pem))
        }
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).with_context(|| path.display().to_string())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The door's client-certificate check: an end-entity certificate issued by the test CA,
/// optionally preceded by RFC 3820 proxy certificates, each issued by the next one in the
/// chain and named after it plus one CN. Client certificates are optional (tokens also work).
#[derive(Debug)]
pub struct GridClientVerifier {
    ca_der: Vec<u8>,
    algs: WebPkiSupportedAlgorithms,
}

impl GridClientVerifier {
    pub fn new(ca_der: &CertificateDer<'_>) -> Self {
        Self {
            ca_der: ca_der.to_vec(),
            algs: provider().signature_verification_algorithms,
        }
    }

    fn check(&self, chain: &[&[u8]], now: i64) -> Result<()> {
        let (_, ca) = X509Certificate::from_der(&self.ca_der)?;
        let mut certs = Vec::new();
        for der in chain {
            certs.push(
                X509Certificate::from_der(der)
                    .map_err(|e| anyhow::anyhow!("bad certificate: {e}"))?
                    .1,
            );
        }
        for (i, cert) in certs.iter().enumerate() {
            let v = cert.validity();
            if now < v.not_before.timestamp() || now > v.not_after.timestamp() {
                bail!("certificate {} is expired or not yet valid", cert.subject());
            }
            let is_proxy = cert
                .extensions()
                .iter()
                .any(|e| e.oid.to_id_string() == PROXY_CERT_INFO_STR);
            if !is_proxy {
                // The end-entity certificate: must be issued by the CA.
                if cert.issuer() != ca.subject() {
                    bail!(
                        "certificate {} is not issued by a trusted CA",
                        cert.subject()
                    );
                }
                cert.verify_signature(Some(ca.public_key()))
                    .map_err(|e| anyhow::anyhow!("bad CA signature on {}: {e}", cert.subject()))?;
                return Ok(());
            }
            let Some(issuer) = certs.get(i + 1) else {
                bail!(
                    "proxy certificate {} without its issuer in the chain",
                    cert.subject()
                );
            };
            if cert.issuer() != issuer.subject() {
                bail!(
                    "proxy issuer {} does not match the next certificate",
                    cert.issuer()
                );
            }
            let extends = cert.subject().as_raw().len() > issuer.subject().as_raw().len()
                && cert.subject().iter_rdn().count() == issuer.subject().iter_rdn().count() + 1
                && cert
                    .subject()
                    .iter_rdn()
                    .zip(issuer.subject().iter_rdn())
                    .all(|(a, b)| a == b);
            if !extends {
                bail!(
                    "proxy subject {} does not extend its issuer's",
                    cert.subject()
                );
            }
            cert.verify_signature(Some(issuer.public_key()))
                .map_err(|e| anyhow::anyhow!("bad proxy signature: {e}"))?;
        }
        bail!("chain ends with a proxy certificate")
    }
}

impl ClientCertVerifier for GridClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let chain: Vec<&[u8]> = std::iter::once(end_entity.as_ref())
            .chain(intermediates.iter().map(|c| c.as_ref()))
            .collect();
        self.check(&chain, now.as_secs() as i64)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|e| {
                tracing::info!(error = %e, "client certificate refused");
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(std::io::Error::other(e.to_string()))),
                ))
            })
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The door speaks TLS 1.3 only (see `Sim::start`).
        Err(rustls::Error::General(
            "TLS 1.2 client authentication is not offered".into(),
        ))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // WebPKI refuses to parse a proxy certificate (its ProxyCertInfo extension is
        // critical and unknown to it), so the signature is checked against the raw key.
        let (_, parsed) = X509Certificate::from_der(cert)
            .map_err(|e| rustls::Error::General(format!("bad client certificate: {e}")))?;
        let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from(parsed.public_key().raw);
        rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The DN of the end-entity certificate in a client chain, `/O=.../CN=...` style.
pub fn owner_dn(chain: &[CertificateDer<'_>]) -> Option<String> {
    for der in chain {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        if !cert
            .extensions()
            .iter()
            .any(|e| e.oid.to_id_string() == PROXY_CERT_INFO_STR)
        {
            let mut out = String::new();
            for rdn in cert.subject().iter_rdn() {
                for attr in rdn.iter() {
                    let key = match attr.attr_type().to_id_string().as_str() {
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        "2.5.4.3" => "CN",
                        "2.5.4.6" => "C",
                        _ => "X",
                    };
                    out.push_str(&format!("/{key}={}", attr.as_str().unwrap_or("?")));
                }
            }
            return Some(out);
        }
    }
    None
}
