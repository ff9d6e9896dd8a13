//! `dcflow demo`: the whole flow on an embedded default. Starts the dCache emulator
//! in-process, uploads a set of files through its WebDAV door (each upload produces dCache's
//! billing messages), then runs those messages through the same pipeline as `dcflow replay`
//! and checks every copied file against the original.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dcache_sim::{Sim, SimConfig};
use dcflow_core::{Config, Env};

use crate::pipeline::Pipeline;
use crate::replay::{replay, Summary};

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub files: usize,
    pub max_size: u64,
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

pub async fn demo(opts: DemoOptions) -> Result<(Summary, PathBuf)> {
    let dir = match opts.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("dcflow-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let sim = Sim::start(SimConfig::new(&dir.join("dcache")))
        .await
        .context("starting the dCache emulator")?;
    println!(
        "dCache emulator: door {} (pool {}), state in {}",
        sim.door_url,
        sim.pool_url,
        dir.join("dcache").display()
    );

    let config_path = dir.join("dcflow.toml");
    let download = dir.join("download");
    let config_text = format!(
        r#"# Written by `dcflow demo`: the emulator's door and credentials.
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
    std::fs::write(&config_path, config_text)?;
    let config = Config::load(&config_path, &Env::from_process()).map_err(anyhow::Error::msg)?;

    // Upload through the door with the emulator's token, as a user would.
    let started = Instant::now();
    let mut originals = Vec::new();
    let mut total = 0u64;
    for (i, size) in sizes(opts.files, opts.max_size).into_iter().enumerate() {
        let rel = names(i);
        let data: Vec<u8> = (0..size)
            .map(|b| {
                (b as u32)
                    .wrapping_mul(2654435761)
                    .rotate_left(i as u32 % 31) as u8
            })
            .collect();
        sim.upload(&format!("/lsst/user/j/jdoe/{rel}"), data.clone())
            .await?;
        total += size;
        originals.push((rel, data));
    }
    println!(
        "uploaded {} files ({}) in {:.1} s; billing messages in {}",
        originals.len(),
        dcflow_transfer::engine::human_bytes(total),
        started.elapsed().as_secs_f64(),
        dir.join("dcache/billing.jsonl").display()
    );

    let pipeline = Arc::new(Pipeline::try_new(&config)?);
    let started = Instant::now();
    let summary = replay(pipeline, &dir.join("dcache/billing.jsonl")).await?;
    let secs = started.elapsed().as_secs_f64();
    let mut verified = 0;
    for (rel, data) in &originals {
        let got = std::fs::read(download.join(rel)).with_context(|| format!("{rel} missing"))?;
        if &got != data {
            bail!("{rel} differs from the uploaded bytes");
        }
        verified += 1;
    }
    println!("\n{summary}");
    println!(
        "{verified}/{} files byte-identical to the uploads; {:.1} s, {:.0} Mbps",
        originals.len(),
        secs,
        summary.bytes as f64 * 8.0 / 1e6 / secs.max(1e-3)
    );
    println!("files:   {}", download.display());
    println!(
        "records: {}/success.csv, {}/failed.csv",
        dir.display(),
        dir.display()
    );
    println!(
        "config:  {} (try: dcflow check-config --config {})",
        config_path.display(),
        config_path.display()
    );
    Ok((summary, dir))
}
