//! The emulator against dCache's own formats (`fixtures/billing`) and behaviour.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dcache_sim::{BillingOrder, Sim, SimConfig};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../fixtures/billing/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

async fn sim_with(order: BillingOrder) -> (Sim, tempfile::TempDir, reqwest::Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SimConfig::new(&dir.path().join("sim"));
    cfg.order = order;
    let sim = Sim::start(cfg).await.unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&sim.pki.ca_pem).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    (sim, dir, client)
}

fn messages(sim: &Sim) -> Vec<Value> {
    sim.billing_messages()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn upload_billing_messages_have_dcache_shape() {
    let (sim, _dir, client) = sim_with(BillingOrder::PoolFirst).await;
    let resp = client
        .put(format!("{}/a/f.dat", sim.door_url))
        .bearer_auth(&sim.token)
        .body(vec![7u8; 1234])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let msgs = messages(&sim);
    assert_eq!(msgs.len(), 2);
    let (pool, door) = (&msgs[0], &msgs[1]);

    assert_eq!(
        keys(pool),
        keys(&fixture("transfer-pool-upload.json")),
        "pool transfer keys"
    );
    // A token user has no DN: dCache's owner is then the user name (dCache 12.0.1 wrote
    // "owner":"admin" for a macaroon; DoorRequestInfoMessageTest says the same).
    let door_keys = keys(door);
    assert!(door_keys.contains("owner"), "the user name as owner");
    assert_eq!(
        door_keys,
        keys(&fixture("request-door-upload.json")),
        "door request keys"
    );
    assert_eq!(
        keys(&door["moverInfo"]),
        keys(&fixture("request-door-upload.json")["moverInfo"]),
        "moverInfo keys"
    );
    assert_eq!(pool["pnfsid"], door["pnfsid"], "one upload, one pnfsid");
    let pnfsid = pool["pnfsid"].as_str().unwrap();
    assert!(
        pnfsid.len() == 36
            && pnfsid
                .chars()
                .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
    );
    assert_eq!(pool["isWrite"], "write");
    assert_eq!(pool["isP2p"], false);
    assert_eq!(pool["billingPath"], "/pnfs/example.org/data/a/f.dat");
    assert_eq!(pool["fileSize"], 1234);
    assert!(pool.get("VERSION").is_none() && pool["version"] == "1.0");
    assert!(door.get("version").is_none() && door["VERSION"] == "1.0");
    let date = pool["date"].as_str().unwrap();
    assert!(date.ends_with("+02:00") && date.contains('T'), "{date}");

    // Java's Double.toString: E-notation for large values, never a bare integer.
    let raw = &sim.billing_messages()[0];
    let bw = raw
        .split("\"meanWriteBandwidth\":")
        .nth(1)
        .unwrap()
        .split([',', '}'])
        .next()
        .unwrap();
    assert!(bw.contains('E') || bw.contains('.'), "{bw}");

    // DELETE: 204 and the door's remove message, then the pool's.
    let resp = client
        .delete(format!("{}/a/f.dat", sim.door_url))
        .bearer_auth(&sim.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let msgs = messages(&sim);
    let remove_keys = keys(&msgs[2]);
    assert_eq!(
        remove_keys,
        keys(&fixture("remove-door.json")),
        "door remove keys"
    );
    assert_eq!(
        keys(&msgs[3]),
        keys(&fixture("remove-pool.json")),
        "pool remove keys"
    );
    assert_eq!(msgs[3]["billingPath"], "Unknown");
}

#[tokio::test]
async fn door_redirects_to_a_one_time_pool_url_and_checks_auth() {
    let (sim, _dir, client) = sim_with(BillingOrder::DoorFirst).await;
    client
        .put(format!("{}/b/g", sim.door_url))
        .bearer_auth(&sim.token)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(
        messages(&sim)[0]["msgType"],
        "request",
        "door first when asked"
    );

    let anon = client
        .get(format!("{}/b/g", sim.door_url))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status().as_u16(), 401);
    let wrong = client
        .get(format!("{}/b/g", sim.door_url))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);

    let resp = client
        .get(format!("{}/b/g", sim.door_url))
        .bearer_auth(&sim.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&sim.pool_url) && location.contains("dcache-http-uuid="),
        "{location}"
    );
    let body = client
        .get(&location)
        .header("Want-Digest", "adler32")
        .send()
        .await
        .unwrap();
    assert_eq!(body.status().as_u16(), 200);
    assert_eq!(body.headers()["digest"], "adler32=062c0215");
    assert_eq!(body.text().await.unwrap(), "hello");
    let reused = client.get(&location).send().await.unwrap();
    assert_eq!(reused.status().as_u16(), 404, "a uuid works once");
    let missing = client
        .get(format!("{}/b/g", sim.pool_url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 400);
    assert!(sim.pool_authorization_headers().is_empty());

    let head = client
        .head(format!("{}/b/g", sim.door_url))
        .bearer_auth(&sim.token)
        .header("Want-Digest", "md5, adler32;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.headers()["digest"],
        "md5=XUFAKrxLKna5cZ2REBfFkg==,adler32=062c0215"
    );
}

#[tokio::test]
async fn proxy_certificates_authenticate_and_expired_ones_do_not() {
    let (sim, _dir, _) = sim_with(BillingOrder::Random).await;
    // reqwest's Identity checks the key against the certificate with WebPKI, which refuses
    // proxy certificates; a resolver hands rustls the chain as it is, as dcflow does.
    let with_identity = |pem: &[u8]| {
        let mut chain = Vec::new();
        let mut key = None;
        for item in rustls_pemfile::read_all(&mut &pem[..]).map(Result::unwrap) {
            match item {
                rustls_pemfile::Item::X509Certificate(c) => chain.push(c),
                rustls_pemfile::Item::Pkcs1Key(k) => key = Some(k.into()),
                rustls_pemfile::Item::Pkcs8Key(k) => key = Some(k.into()),
                _ => {}
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider
            .key_provider
            .load_private_key(key.unwrap())
            .unwrap();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, signer));
        let ca = std::fs::read(&sim.pki.ca_pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_pemfile::certs(&mut &ca[..]).map(Result::unwrap));
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(Fixed(certified)));
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    };
    let good = with_identity(&std::fs::read(&sim.pki.proxy).unwrap());
    let resp = good
        .put(format!("{}/c/h", sim.door_url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let door = messages(&sim)
        .into_iter()
        .find(|m| m["msgType"] == "request")
        .unwrap();
    assert_eq!(
        door["owner"], "/O=dcache-sim/OU=users/CN=Jane Doe",
        "identity from the proxy's end-entity certificate"
    );

    let expired = with_identity(&std::fs::read(&sim.pki.expired_proxy).unwrap());
    assert!(
        expired
            .get(format!("{}/c/h", sim.door_url))
            .send()
            .await
            .is_err(),
        "expired proxy refused in the handshake"
    );
}

#[tokio::test]
async fn a_file_being_uploaded_answers_500_upload_not_completed() {
    let (sim, _dir, client) = sim_with(BillingOrder::Random).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let url = format!("{}/d/slow", sim.door_url);
    let put = tokio::spawn(
        client
            .put(&url)
            .bearer_auth(&sim.token)
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    tx.send(Ok(vec![1; 1000])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = client
        .get(&url)
        .bearer_auth(&sim.token)
        .send()
        .await
        .unwrap();
    assert_eq!(during.status().as_u16(), 500);
    assert!(during
        .text()
        .await
        .unwrap()
        .contains("File upload not yet completed"));
    drop(tx);
    assert_eq!(put.await.unwrap().unwrap().status().as_u16(), 201);
    let incomplete = messages(&sim)
        .into_iter()
        .find(|m| m["status"]["code"] == 10022)
        .expect("billing for the refused GET");
    assert_eq!(incomplete["status"]["msg"], "File upload not yet completed");
}

/// Always offers the same client certificate chain.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}
