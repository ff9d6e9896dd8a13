#!/usr/bin/env python3
"""Small files: dcflow versus curl and rclone on the same files from the same emulator.

5,000 files of 16 KiB (--files, --size-kib) are uploaded to the dCache emulator, then copied
at 32 parallel transfers (--parallel) by:
- curl --parallel --parallel-max 32 in one process (GET at the door, following the 302 to the
  pool), its URLs from a config file;
- rclone copy with the WebDAV backend, --transfers 32 (listing by PROPFIND, then GET);
- dcflow replay of the uploads' billing messages, maxdownloads = 32 (adler32 verified against
  dCache's, every file fsynced and renamed into place, one CSV row each).
Each run ends with `sync`. Files per second, medians of --runs, and the ratios. Needs curl
and rclone (Debian packages).
"""

import argparse
import datetime
import http.client
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from large_files import build, run_dcflow, run_rclone, start_sim, sync, write_config  # noqa: E402


def upload_many(info, folder, count, size):
    """PUTs `count` files over one keep-alive TLS connection (a user's client)."""
    url = urllib.parse.urlparse(info["door_url"])
    ctx = ssl.create_default_context(cafile=info["ca_pem"])
    token = Path(info["token_file"]).read_text().strip()
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
    for i in range(count):
        body = os.urandom(size)
        conn.request("PUT", f"{folder}/file-{i:05d}.dat", body=body,
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            sys.exit(f"upload {i}: {resp.status}")
    conn.close()


def run_curl(info, folder, count, out, parallel):
    token = Path(info["token_file"]).read_text().strip()
    cfg = out.parent / "curl.cfg"
    with open(cfg, "w") as f:
        for i in range(count):
            f.write(f'url = "{info["door_url"]}{folder}/file-{i:05d}.dat"\n')
            f.write(f'output = "{out}/file-{i:05d}.dat"\n')
    t = time.monotonic()
    sh = subprocess.run(["curl", "-sS", "-f", "-L", "--no-progress-meter", "--parallel", "--parallel-max", str(parallel),
                         "--cacert", info["ca_pem"], "-H", f"Authorization: Bearer {token}",
                         "-K", str(cfg)])
    if sh.returncode != 0:
        sys.exit("curl failed")
    sync()
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--size-kib", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/dcflow-bench-small")
    ap.add_argument("--dcflow", metavar="BINARY",
                    help="time this dcflow binary instead of building the tree's")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="also time this other dcflow binary in the same rounds (an A/B)")
    a = ap.parse_args()
    for tool in ("curl", "rclone"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (apt-get install {tool})")

    dcflow, sim_bin = build()
    if a.dcflow:
        dcflow = Path(a.dcflow).resolve()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim, info = start_sim(sim_bin, work / "sim")
    folder = "/bench/small"
    try:
        upload_many(info, folder, a.files, a.size_kib * 1024)
        events = work / "small.jsonl"
        shutil.copy(info["billing_file"], events)
        times = {"curl": [], "rclone": [], "dcflow": []}
        if a.baseline:
            times["baseline"] = []
        for run in range(a.runs):
            for tool in times:
                # Outputs stay until the end: ext4 without a journal skips recently deleted
                # inodes one by one when it allocates new ones, which made whichever client
                # ran right after a deletion up to twice as slow.
                out = work / f"{tool}-out-{run}"
                out.mkdir()
                if tool == "curl":
                    secs = run_curl(info, folder, a.files, out, a.parallel)
                elif tool == "rclone":
                    secs = run_rclone(info, folder, out, a.parallel)
                else:
                    binary = dcflow if tool == "dcflow" else Path(a.baseline).resolve()
                    cfg = write_config(info, work, out, a.parallel, f"small-{tool}-{run}")
                    secs = run_dcflow(binary, cfg, events)
                got = sum(1 for p in out.rglob("*") if p.is_file())
                if got != a.files:
                    sys.exit(f"{tool} wrote {got} files, expected {a.files}")
                times[tool].append(secs)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  file=sys.stderr)
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    med = {k: statistics.median(v) for k, v in times.items()}
    n = a.files
    print(f"\n#### small-files benchmark — {datetime.date.today()} — commit {commit}")
    print(f"machine: {os.cpu_count()} cores; server: dcache-sim on 127.0.0.1; {n} × {a.size_kib} KiB, "
          f"{a.parallel} parallel, each run ending with `sync`, median of {a.runs}\n")
    print("| client | time | files/s | dcflow ahead by |")
    print("|---|---|---|---|")
    for k in ("curl", "rclone"):
        print(f"| {k} | {med[k]:.2f} s | {n / med[k]:,.0f} | {med[k] / med['dcflow']:.2f} × |")
    if a.baseline:
        print(f"| dcflow {a.baseline} | {med['baseline']:.2f} s | {n / med['baseline']:,.0f} "
              f"| {med['baseline'] / med['dcflow']:.2f} × |")
    print(f"| dcflow replay (verified, fsynced) | {med['dcflow']:.2f} s | {n / med['dcflow']:,.0f} | |")
    # Issue 19's measure: dcflow's time over curl's in the same round, every round.
    ratios = [d / c for d, c in zip(times["dcflow"], times["curl"])]
    print(f"\ndcflow's time / curl's, round by round: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f})")
    print("\n(runs: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)} s" for k, v in times.items()) + ")")

if __name__ == "__main__":
    main()
