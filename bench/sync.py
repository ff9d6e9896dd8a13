#!/usr/bin/env python3
"""`dcflow sync` against rclone on the same tree of the same emulator door.

10,000 files of 4 KiB (--files, --size-kib) in 100 folders (--folders) are uploaded to the
dCache emulator, then, at 16 parallel transfers (--parallel):
- nothing at the destination yet: `dcflow sync` (listing, GET, adler32 verified, fsync, rename,
  one CSV row each) against `rclone copy` (WebDAV backend: PROPFIND, GET);
- everything at the destination already (the common case: a restart): `dcflow sync` (listing,
  then for each file its size and checksum compared with dCache's: a HEAD and an adler32 of
  the local file) against `rclone check` and `rclone sync` (sizes and times; the WebDAV
  backend has no hashes to compare).
Each run ends with `sync`. Medians of --runs, every run's figure, and the peak resident memory
of each client (its own ru_maxrss, from wait4). Needs rclone (Debian package).
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
from large_files import build, start_sim, sync  # noqa: E402

FOLDER = "/bench/sync"


def upload_tree(info, count, folders, size):
    """PUTs `count` files spread over `folders` folders, over one keep-alive connection."""
    url = urllib.parse.urlparse(info["door_url"])
    ctx = ssl.create_default_context(cafile=info["ca_pem"])
    token = Path(info["token_file"]).read_text().strip()
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
    for i in range(count):
        conn.request("PUT", f"{FOLDER}/d{i % folders:03d}/f-{i:05d}.dat", body=os.urandom(size),
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 201:
            sys.exit(f"upload {i}: {resp.status}")
    conn.close()


def timed(cmd, env=None):
    """Seconds (ending with `sync`) and the peak RSS in MiB of one command; its exit code."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    sync()
    return time.monotonic() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def rclone_env(info):
    return {"RCLONE_CONFIG_DC_TYPE": "webdav",
            "RCLONE_CONFIG_DC_URL": info["door_url"],
            "RCLONE_CONFIG_DC_VENDOR": "other",
            "RCLONE_CONFIG_DC_BEARER_TOKEN": Path(info["token_file"]).read_text().strip()}


def rclone(verb, info, out, parallel):
    return ["rclone", verb, f"dc:{FOLDER}", str(out), "--transfers", str(parallel),
            "--checkers", str(parallel), "--ca-cert", info["ca_pem"], "-q",
            "--multi-thread-streams", "0"]


def dcflow_config(info, work, download, parallel, name):
    cfg = work / f"{name}.toml"
    cfg.write_text(f"""[dcache]
url = "{info['door_url']}"
pool = "{info['root']}"
folder = "{FOLDER}"
retryseconds = 1
retrytimes = 3
maxdownloads = {parallel}
timeout = 3600
[local]
token = "{info['token_file']}"
capath = "{info['capath']}"
downloadfolder = "{download}"
permissions = '0755'
failedtasksfile = "{work}/{name}-failed.csv"
successfultaskfile = "{work}/{name}-success.csv"
""")
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--size-kib", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/dcflow-bench-sync")
    a = ap.parse_args()
    if not shutil.which("rclone"):
        sys.exit("rclone is needed (apt-get install rclone)")
    dcflow, sim_bin = build()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim, info = start_sim(sim_bin, work / "sim")
    cases = {"dcflow sync (empty)": [], "rclone copy (empty)": [],
             "dcflow sync (present)": [], "rclone check (present)": [], "rclone sync (present)": []}
    memory = {k: [] for k in cases}

    def record(case, secs, mib, code, out=None):
        if code != 0:
            sys.exit(f"{case} failed ({code})")
        if out is not None:
            got = sum(1 for p in out.rglob("*") if p.is_file())
            if got != a.files:
                sys.exit(f"{case} left {got} files, expected {a.files}")
        cases[case].append(secs)
        memory[case].append(mib)

    try:
        upload_tree(info, a.files, a.folders, a.size_kib * 1024)
        env = rclone_env(info)
        log = {"DCFLOW_LOG": "warn"}
        for run in range(a.runs):
            d_out, r_out = work / f"dcflow-{run}", work / f"rclone-{run}"
            cfg = dcflow_config(info, work, d_out, a.parallel, f"sync-{run}")
            record("dcflow sync (empty)", *timed([str(dcflow), "sync", "-c", str(cfg)], log), d_out)
            record("rclone copy (empty)", *timed(rclone("copy", info, r_out, a.parallel), env), r_out)
            record("dcflow sync (present)", *timed([str(dcflow), "sync", "-c", str(cfg)], log), d_out)
            record("rclone check (present)", *timed(rclone("check", info, r_out, a.parallel), env))
            record("rclone sync (present)", *timed(rclone("sync", info, r_out, a.parallel), env), r_out)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in cases.items()),
                  file=sys.stderr)
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    med = {k: statistics.median(v) for k, v in cases.items()}
    n = a.files
    print(f"\n#### sync benchmark — {datetime.date.today()} — commit {commit}")
    print(f"machine: {os.cpu_count()} cores; server: dcache-sim on 127.0.0.1; {n} × {a.size_kib} KiB in "
          f"{a.folders} folders, {a.parallel} parallel, each run ending with `sync`, median of {a.runs}\n")
    print("| client | time | files/s | peak RSS | time / dcflow's |")
    print("|---|---|---|---|---|")
    for k, v in med.items():
        ref = med["dcflow sync (empty)"] if "empty" in k else med["dcflow sync (present)"]
        print(f"| {k} | {v:.2f} s | {n / v:,.0f} | {max(memory[k]):.0f} MiB | {v / ref:.2f} |")
    print("\n(runs: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)} s" for k, v in cases.items()) + ")")


if __name__ == "__main__":
    main()
