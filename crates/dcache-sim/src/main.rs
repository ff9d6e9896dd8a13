//! `dcache-sim serve`: run the emulator until interrupted, for scripts and benchmarks.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use dcache_sim::{BillingOrder, ProxyKey, Sim, SimConfig};

#[derive(Parser)]
#[command(about = "A dCache emulator: WebDAV door and pool over TLS, billing messages, faults")]
enum Cmd {
    /// Start door and pool; write their addresses and credentials to <dir>/sim.json.
    Serve {
        /// State folder (PKI, token, stored files, billing.jsonl).
        #[arg(long)]
        dir: PathBuf,
        /// Namespace path served at the door's `/`.
        #[arg(long, default_value = "/pnfs/example.org/data")]
        root: String,
        #[arg(long, default_value_t = 0)]
        door_port: u16,
        #[arg(long, default_value_t = 0)]
        pool_port: u16,
        /// Answer door GETs with 307 instead of 302.
        #[arg(long)]
        redirect_307: bool,
        /// The pool does not answer Want-Digest (only the door's HEAD does).
        #[arg(long)]
        no_digest_on_get: bool,
        /// Proxy key as ECDSA/PKCS#8 instead of RSA/PKCS#1.
        #[arg(long)]
        ecdsa_proxy: bool,
        /// Also publish billing messages to this Kafka broker (host:port), as dCache does.
        #[arg(long)]
        kafka: Option<String>,
        /// Billing topic.
        #[arg(long, default_value = "billing")]
        topic: String,
        /// Partitions of the billing topic when it is created.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let Cmd::Serve {
        dir,
        root,
        door_port,
        pool_port,
        redirect_307,
        no_digest_on_get,
        ecdsa_proxy,
        kafka,
        topic,
        partitions,
    } = Cmd::parse();
    let mut cfg = SimConfig::new(&dir);
    cfg.root = root;
    cfg.door_port = door_port;
    cfg.pool_port = pool_port;
    cfg.redirect_status = if redirect_307 { 307 } else { 302 };
    cfg.digest_on_get = !no_digest_on_get;
    cfg.order = BillingOrder::Random;
    cfg.proxy_key = if ecdsa_proxy {
        ProxyKey::EcdsaPkcs8
    } else {
        ProxyKey::RsaPkcs1
    };
    cfg.kafka = kafka.map(|brokers| dcache_sim::SimKafka {
        brokers,
        topic,
        partitions,
    });
    let billing = cfg.billing_file.clone();
    let sim = Sim::start(cfg).await?;
    let info = serde_json::json!({
        "door_url": sim.door_url,
        "pool_url": sim.pool_url,
        "capath": sim.pki.capath,
        "ca_pem": sim.pki.ca_pem,
        "proxy": sim.pki.proxy,
        "user_cert": sim.pki.user_cert,
        "user_key": sim.pki.user_key,
        "token_file": sim.token_file,
        "billing_file": billing,
        "root": sim.namespace_path(""),
    });
    std::fs::write(dir.join("sim.json"), serde_json::to_vec_pretty(&info)?)?;
    println!("{info}");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
