//! `dcflow demo`: the whole flow on an embedded default. Starts the dCache emulator
//! in-process, publishing its billing messages to Kafka: librdkafka's mock cluster (in this
//! process, so the real Kafka code path runs) or, with `--kafka HOST:PORT`, a real broker.
//! Runs the daemon's loop (`dcflow run`) on that topic while files are uploaded through the
//! emulator's WebDAV door, shows live progress, stops once every file is handled, and checks
//! every copy against the original.
//!
//! With `--dcache URL` the same runs against a real dCache instead of the emulator: uploads
//! through its WebDAV door (PUT, following the 307 to a pool mover), its own billing messages
//! on the site's broker (`--kafka`, `--topic`), the site's credentials (`--proxy` or
//! `--token`, `--capath`), in a new folder below URL's path.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dcache_sim::{Sim, SimConfig, SimKafka};
use dcflow_core::{Config, Env};
use dcflow_transfer::engine::human_bytes;
use tokio_util::sync::CancellationToken;

use dcflow_workflow::{Stats, Summary};

use super::Failure;

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub files: usize,
    pub max_size: u64,
    /// A real broker instead of the in-process mock cluster.
    pub kafka: Option<String>,
    /// A real dCache instead of the emulator.
    pub dcache: Option<RealDcache>,
}

/// A site's dCache for `demo --dcache`.
pub struct RealDcache {
    /// The door and the folder to work in, e.g. `https://door:2880/public/tests`.
    pub url: url::Url,
    /// The billing topic the door and pools publish to.
    pub topic: String,
    pub proxy: Option<PathBuf>,
    pub token: Option<PathBuf>,
    pub capath: PathBuf,
}

/// Where the demo's files are uploaded.
enum Door {
    Sim(Arc<Sim>),
    Real {
        client: reqwest::Client,
        token: Option<String>,
        /// The door's origin, and the demo's folder below its root.
        origin: url::Url,
        folder: String,
    },
}

impl Door {
    /// PUT `rel` below the demo's folder, as a user's client does: at the door, then (dCache
    /// redirects uploads to a pool mover) again to the mover, without the credentials.
    async fn upload(&self, rel: &str, data: Vec<u8>) -> Result<()> {
        let (client, token, origin, folder) = match self {
            Door::Sim(sim) => return sim.upload(&format!("/lsst/user/j/jdoe/{rel}"), data).await,
            Door::Real {
                client,
                token,
                origin,
                folder,
            } => (client, token, origin, folder),
        };
        let mut url = origin.clone();
        url.path_segments_mut()
            .map_err(|_| anyhow::anyhow!("the door URL cannot have a path"))?
            .extend(
                folder
                    .split('/')
                    .chain(rel.split('/'))
                    .filter(|p| !p.is_empty()),
            );
        let body = bytes::Bytes::from(data);
        let mut req = client.put(url.clone()).body(body.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await.with_context(|| format!("PUT {url}"))?;
        if resp.status().is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .context("a redirect without a Location")?;
            anyhow::ensure!(
                to.scheme() == "https",
                "the door redirected the upload to {}",
                to.scheme()
            );
            resp = client
                .put(to)
                .body(body)
                .send()
                .await
                .context("PUT at the pool mover")?;
        }
        anyhow::ensure!(resp.status().is_success(), "PUT {url}: {}", resp.status());
        Ok(())
    }

    fn sim(&self) -> Option<&Arc<Sim>> {
        match self {
            Door::Sim(sim) => Some(sim),
            Door::Real { .. } => None,
        }
    }
}

/// File sizes of a realistic mix: empty, small, a few MiB, up to `max`.
fn sizes(n: usize, max: u64) -> Vec<u64> {
    let ladder = [
        0u64,
        1,
        1000,
        16 << 10,
        1 << 20,
        7 << 20,
        32 << 20,
        100 << 20,
    ];
    (0..n)
        .map(|i| ladder[i % ladder.len()].min(max) + (i as u64 * 7919) % 4096)
        .collect()
}

fn names(i: usize) -> String {
    match i % 5 {
        0 => format!("run001/image-{i:04}.fits"),
        1 => format!("run001/with space {i}.dat"),
        2 => format!("run002/hash#percent%plus+{i}.root"),
        3 => format!("run002/näme-ünïcode-{i}.txt"),
        _ => format!("run003/deep/er/file-{i}.bin"),
    }
}

// Long on purpose: the demo's script in the order a user sees it (broker, site, daemon,
// uploads, live progress, the byte comparison, the summary), each phase printing its lines.
pub async fn demo(opts: DemoOptions) -> Result<(Summary, PathBuf)> {
    let dir = match opts.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("dcflow-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    // The mock cluster lives as long as this function.
    let mock;
    let (brokers, bus) = match &opts.kafka {
        Some(b) => (b.clone(), format!("Kafka broker {b}")),
        None => {
            mock = dcflow_kafka::MockBroker::start("billing")
                .context("starting librdkafka's mock cluster with a billing topic")?;
            let b = mock.bootstrap_servers();
            (
                b.clone(),
                format!("librdkafka mock cluster {b} (in this process)"),
            )
        }
    };
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp()
    );
    let topic = if opts.kafka.is_some() {
        format!("dcflow-demo-billing-{run_id}")
    } else {
        "billing".to_owned()
    };
    let config_path = dir.join("dcflow.toml");
    let download = dir.join("download");
    let (door, config_text) = match &opts.dcache {
        None => emulator_site(&dir, &download, &brokers, &topic, &run_id, &bus).await?,
        Some(real) => real_site(real, &dir, &download, &config_path, &brokers, &run_id, &bus)?,
    };
    std::fs::write(&config_path, config_text)?;
    let config = Config::load(&config_path, &Env::from_process()).map_err(anyhow::Error::msg)?;
    let kafka = config
        .kafka
        .clone()
        .context("the demo configuration has [kafka]")?;
    let pipeline = Arc::new(crate::pipeline(&config)?);

    // The daemon's loop, as `dcflow run` runs it.
    let shutdown = CancellationToken::new();
    let daemon = {
        let (p, s) = (pipeline.clone(), shutdown.clone());
        tokio::spawn(async move {
            super::run::run_kafka(p, &kafka, s, Duration::from_secs(60), false).await
        })
    };

    // Uploads through the door, as users would, while the daemon runs.
    let plan: Vec<(String, u64)> = sizes(opts.files, opts.max_size)
        .into_iter()
        .enumerate()
        .map(|(i, size)| (names(i), size))
        .collect();
    let total: u64 = plan.iter().map(|(_, s)| s).sum();
    println!(
        "uploading         {} files, {} (0 B to {}), odd names included",
        plan.len(),
        human_bytes(total),
        human_bytes(plan.iter().map(|(_, s)| *s).max().unwrap_or(0))
    );
    let started = Instant::now();
    let door = Arc::new(door);
    let uploaded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let uploads = {
        let plan = plan.clone();
        let door = door.clone();
        let uploaded = uploaded.clone();
        tokio::spawn(async move {
            let mut originals = Vec::new();
            for (i, (rel, size)) in plan.into_iter().enumerate() {
                let data = content(i, size);
                door.upload(&rel, data.clone()).await?;
                if let Some(sim) = door.sim() {
                    sim.flush_billing();
                }
                uploaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                originals.push((rel, data));
            }
            anyhow::Ok(originals)
        })
    };

    // Live progress until every file is handled (copied, present, or failed and recorded).
    let stats = &pipeline.stats;
    let tty = std::io::stdout().is_terminal();
    let mut last_line: Option<Instant> = None;
    // The rate shown is the one of the last seconds (bytes of finished and running copies),
    // not the average since the start.
    let mut rate_from = (Instant::now(), 0u64);
    let mut rate = 0.0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = Stats::get(&stats.copied)
            + Stats::get(&stats.already_present)
            + Stats::get(&stats.failed);
        let finished = done >= plan.len() as u64;
        let bytes = Stats::get(&stats.bytes) + pipeline.activity.bytes_in_flight();
        let since = rate_from.0.elapsed().as_secs_f64();
        if since >= 1.0 {
            rate = bytes.saturating_sub(rate_from.1) as f64 * 8.0 / 1e6 / since;
            rate_from = (Instant::now(), bytes);
        }
        if tty || finished || last_line.is_none_or(|l| l.elapsed() >= Duration::from_secs(2)) {
            let up = uploaded.load(std::sync::atomic::Ordering::Relaxed);
            let uploading = if up < plan.len() {
                format!("uploaded {up}/{}, ", plan.len())
            } else {
                String::new()
            };
            let line = format!(
                "progress          {uploading}{done}/{} files done, {} copied, {rate:.0} Mbps now, {} in flight, {} retries, {} failed",
                plan.len(),
                human_bytes(bytes),
                stats.in_flight.get(),
                Stats::get(&stats.retries),
                Stats::get(&stats.failed),
            );
            if tty {
                print!("\r{line}\x1b[K");
                let _ = std::io::stdout().flush();
            } else {
                println!("{line}");
            }
            last_line = Some(Instant::now());
        }
        if finished {
            break;
        }
        if Instant::now() > deadline {
            shutdown.cancel();
            bail!("not every file was handled within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if tty {
        println!();
    }
    let secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let summary = daemon.await.context("the daemon task")??;
    let originals = uploads.await.context("the upload task")??;

    let mut verified = 0;
    for (rel, data) in &originals {
        let got = std::fs::read(download.join(rel)).with_context(|| format!("{rel} missing"))?;
        if &got != data {
            bail!("{rel} differs from the uploaded bytes");
        }
        verified += 1;
    }
    println!();
    println!(
        "copied            {} files, {}, verified (adler32) and fsynced",
        summary.copied,
        human_bytes(summary.bytes)
    );
    println!(
        "identical         {verified}/{} files byte for byte to the uploads",
        originals.len()
    );
    println!("failed            {}", summary.failed);
    println!(
        "time              {:.1} s from the first upload, {:.0} Mbps",
        secs,
        summary.bytes as f64 * 8.0 / 1e6 / secs.max(1e-3)
    );
    println!();
    println!("files             {}", download.display());
    println!(
        "records           {}/success.csv, {}/failed.csv",
        dir.display(),
        dir.display()
    );
    println!("configuration     {}", config_path.display());
    println!(
        "next              dcflow check-config --config {}",
        config_path.display()
    );
    // Every client of the mock cluster goes before the cluster does.
    drop(pipeline);
    drop(door);
    Ok((summary, dir))
}

/// Deterministic bytes for file `i`.
fn content(i: usize, size: u64) -> Vec<u8> {
    (0..size)
        .map(|b| {
            (b as u32)
                .wrapping_mul(2654435761)
                .rotate_left(i as u32 % 31) as u8
        })
        .collect()
}

/// The emulator's site: a dCache emulator publishing to the demo's broker, and its
/// configuration.
async fn emulator_site(
    dir: &std::path::Path,
    download: &std::path::Path,
    brokers: &str,
    topic: &str,
    run_id: &str,
    bus: &str,
) -> Result<(Door, String)> {
    let mut sim_config = SimConfig::new(&dir.join("dcache"));
    sim_config.kafka = Some(SimKafka {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        partitions: 1,
    });
    let sim = Arc::new(
        Sim::start(sim_config)
            .await
            .context("starting the dCache emulator")?,
    );
    println!(
        "dCache emulator   door {} (state in {})",
        sim.door_url,
        dir.join("dcache").display()
    );
    println!("event bus         {bus}, topic {topic}");
    let text = format!(
        r#"# Written by `dcflow demo`: the emulator's door and credentials, the demo's broker.
[kafka]
topic = "{topic}"
servers = ["{brokers}"]
consumergroup = "dcflow-demo-{run_id}"
[dcache]
url = "{door}"
pool = "/pnfs/example.org/data"
folder = "/lsst/user/j/jdoe"
retryseconds = 1
retrytimes = 5
maxdownloads = 4
timeout = 120
[local]
proxy = "{proxy}"
capath = "{capath}"
downloadfolder = "{download}"
permissions = '2750'
failedtasksfile = "{dir}/failed.csv"
successfultaskfile = "{dir}/success.csv"
"#,
        door = sim.door_url,
        proxy = sim.pki.proxy.display(),
        capath = sim.pki.capath.display(),
        download = download.display(),
        dir = dir.display(),
    );
    Ok((Door::Sim(sim), text))
}

/// A site's own dCache (`--dcache`): its door, a folder of this run's, and its configuration.
fn real_site(
    real: &RealDcache,
    dir: &std::path::Path,
    download: &std::path::Path,
    config_path: &std::path::Path,
    brokers: &str,
    run_id: &str,
    bus: &str,
) -> Result<(Door, String)> {
    let mut origin = real.url.clone();
    origin.set_path("");
    let folder = format!(
        "{}/dcflow-demo-{run_id}",
        real.url.path().trim_end_matches('/')
    );
    println!("dCache            door {origin}, folder {folder}");
    println!("event bus         {bus}, topic {}", real.topic);
    let auth = match (&real.proxy, &real.token) {
        (Some(p), _) => format!("proxy = \"{}\"", p.display()),
        (None, Some(t)) => format!("token = \"{}\"", t.display()),
        (None, None) => bail!("demo --dcache needs --proxy or --token"),
    };
    let text = format!(
        r#"# Written by `dcflow demo --dcache`: the site's door, broker and credentials.
[kafka]
topic = "{topic}"
servers = ["{brokers}"]
consumergroup = "dcflow-demo-{run_id}"
[dcache]
url = "{origin}"
pool = "/"
folder = "{folder}"
retryseconds = 1
retrytimes = 5
maxdownloads = 4
timeout = 300
[local]
{auth}
capath = "{capath}"
downloadfolder = "{download}"
permissions = '2750'
failedtasksfile = "{dir}/failed.csv"
successfultaskfile = "{dir}/success.csv"
"#,
        topic = real.topic,
        origin = origin.as_str().trim_end_matches('/'),
        capath = real.capath.display(),
        download = download.display(),
        dir = dir.display(),
    );
    std::fs::write(config_path, &text)?;
    let config = Config::load(config_path, &Env::from_process()).map_err(anyhow::Error::msg)?;
    let creds = dcflow_transfer::Credentials::load(&config.local.auth)
        .context("loading the credentials")?;
    let tls = creds.tls_config().context("the TLS configuration")?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("the upload client")?;
    let token = creds.token.as_ref().map(|t| t.get().expose().to_owned());
    Ok((
        Door::Real {
            client,
            token,
            origin,
            folder,
        },
        text,
    ))
}

/// What `--dcache` and its companions say: the door URL, the billing topic, the proxy, the
/// token, the CA folder.
pub type DcacheArgs = (
    url::Url,
    String,
    Option<PathBuf>,
    Option<PathBuf>,
    Option<PathBuf>,
);

/// `dcflow demo`: exit 0 when every file landed, 1 otherwise.
pub async fn command(
    dir: Option<PathBuf>,
    files: usize,
    max_size_mib: u64,
    kafka: Option<String>,
    dcache: Option<DcacheArgs>,
) -> Result<(), Failure> {
    let dcache = match dcache {
        Some((url, topic, proxy, token, Some(capath))) if proxy.is_some() || token.is_some() => {
            Some(RealDcache {
                url,
                topic,
                proxy,
                token,
                capath,
            })
        }
        Some(_) => {
            return Err(Failure::setup(
                "dcflow demo",
                anyhow::anyhow!("--dcache needs --proxy or --token"),
            ))
        }
        None => None,
    };
    match demo(DemoOptions {
        dir,
        files,
        max_size: max_size_mib << 20,
        kafka,
        dcache,
    })
    .await
    {
        Ok((summary, _)) if summary.failed == 0 => Ok(()),
        Ok(_) => Err(Failure::Work {
            who: "dcflow demo",
            error: None,
        }),
        Err(e) => Err(Failure::work("dcflow demo", e)),
    }
}
