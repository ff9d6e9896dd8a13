//! Checksum throughput on one core: dcflow's streaming `Hasher` (adler32, and md5) over a
//! 64 MiB buffer in 512 KiB chunks (as the engine feeds it), against the memory-bandwidth
//! reference, a plain copy of the same buffer. Run by bench/run_all.sh:
//! `cargo run --release -p dcflow-transfer --example checksum_speed`.

use std::hint::black_box;
use std::time::Instant;

use dcflow_core::ChecksumAlgo;
use dcflow_transfer::checksum::Hasher;

const SIZE: usize = 64 << 20;
const CHUNK: usize = 512 << 10;
const ROUNDS: usize = 8;

/// GB/s of `f` over `ROUNDS` passes of the buffer, best of 3.
fn gbps(mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..ROUNDS {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (SIZE * ROUNDS) as f64 / best / 1e9
}

fn main() {
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut copy = vec![0u8; SIZE];
    let memcpy = gbps(|| {
        copy.copy_from_slice(black_box(&data));
        black_box(&copy);
    });
    let hash = |algos: &'static [ChecksumAlgo]| {
        gbps(|| {
            let mut h = Hasher::new(algos);
            for chunk in data.chunks(CHUNK) {
                h.update(black_box(chunk));
            }
            black_box(h.finish());
        })
    };
    let adler = hash(&[ChecksumAlgo::Adler32]);
    let md5 = hash(&[ChecksumAlgo::Md5]);
    println!("| one core, 64 MiB buffer, 512 KiB chunks, best of 3 | GB/s | / memory copy |");
    println!("|---|---|---|");
    println!("| memory copy (the bandwidth limit) | {memcpy:.2} | 1.00 |");
    println!(
        "| adler32 (dcflow's default) | {adler:.2} | {:.2} |",
        adler / memcpy
    );
    println!(
        "| md5 (checksums = [\"md5\"]) | {md5:.2} | {:.2} |",
        md5 / memcpy
    );
}
