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

Also, in each round (issue 19 asks whether dcflow can take at most 0.8 × curl's time):
- the disk alone: --parallel (32) processes forked by this script write the same number of
  files of the same size (no network), each created with O_EXCL under a temporary name,
  fsynced and renamed, and the folder fsynced once at the end: the least file-system work
  that keeps dcflow's promise (a recorded file is durable at its final path), with no lock, no
  checksum and no record;
- the CPU seconds (user + system) of each client and of the emulator while it served it: on
  2 cores shared by client and server, a round cannot take less than their sum over the cores.
  So a copy whose requests cost the CPU that curl's do, and which also does the disk's work,
  takes at least (curl's CPU + the emulator's + the disk alone's system time) / cores.
"""

import argparse
import datetime
import http.client
import os
import resource
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
from large_files import (build, children_cpu, run_dcflow, run_rclone, start_sim,  # noqa: E402
                         sync, write_config)


def proc_cpu(pid):
    """User + system CPU seconds of a running process (the emulator), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_only(out, count, size, parallel):
    """The disk work alone (see the module's text), by `parallel` forked writers (processes, so
    that no interpreter lock is contended): seconds, and the writers' CPU seconds (user,
    system)."""
    body = os.urandom(size)

    def one(i):
        final = out / f"file-{i:05d}.dat"
        part = out / f".file-{i:05d}.dat.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(part, final)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    writers = []
    for k in range(parallel):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for i in range(k, count, parallel):
                    one(i)
                code = 0
            finally:
                os._exit(code)
        writers.append(pid)
    failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in writers)
    if failed:
        sys.exit(f"{failed} disk-only writers failed")
    folder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(folder)
    os.close(folder)
    sync()
    secs = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return secs, (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


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
        times["disk"] = []
        cpu = {k: [] for k in times}
        sim_cpu = {k: [] for k in times}
        for run in range(a.runs):
            for tool in times:
                # Outputs stay until the end: ext4 without a journal skips recently deleted
                # inodes one by one when it allocates new ones, which made whichever client
                # ran right after a deletion up to twice as slow.
                out = work / f"{tool}-out-{run}"
                out.mkdir()
                client_before, sim_before = children_cpu(), proc_cpu(sim.pid)
                if tool == "disk":
                    secs, (_, system) = disk_only(out, a.files, a.size_kib * 1024, a.parallel)
                elif tool == "curl":
                    secs = run_curl(info, folder, a.files, out, a.parallel)
                elif tool == "rclone":
                    secs = run_rclone(info, folder, out, a.parallel)
                else:
                    binary = dcflow if tool == "dcflow" else Path(a.baseline).resolve()
                    cfg = write_config(info, work, out, a.parallel, f"small-{tool}-{run}")
                    secs = run_dcflow(binary, cfg, events)
                sim_cpu[tool].append(proc_cpu(sim.pid) - sim_before)
                # The disk-only writers are Python: their system time is the file system's
                # work (sync() included; it runs in a child too).
                cpu[tool].append(system if tool == "disk" else children_cpu() - client_before)
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
    disk = [d / c for d, c in zip(times["disk"], times["curl"])]
    print(f"\nThe disk alone (write, fsync, rename; no network) / curl's time, round by round: "
          f"{', '.join(f'{r:.2f}' for r in disk)} (median {statistics.median(disk):.2f})")
    print("\nCPU seconds (user + system; the disk-only run: system only) per round, median, and "
          "the emulator's while it served that client:\n")
    print("| client | CPU s | µs per file | emulator CPU s |")
    print("|---|---|---|---|")
    for k in times:
        if k == "rclone":
            continue
        c = statistics.median(cpu[k])
        print(f"| {k} | {c:.2f} | {c / n * 1e6:.0f} | "
              f"{'' if k == 'disk' else f'{statistics.median(sim_cpu[k]):.2f}'} |")
    # A lower bound of any verified, fsynced copy on this machine: curl's network work (its
    # CPU and the emulator's) plus the disk alone's kernel time, over the cores.
    bound = [(c + sc + dk) / os.cpu_count() / t for c, sc, dk, t in
             zip(cpu["curl"], sim_cpu["curl"], cpu["disk"], times["curl"])]
    print(f"\n(curl's CPU + the emulator's + the disk alone's system time) / {os.cpu_count()} cores, "
          f"over curl's time, round by round: {', '.join(f'{b:.2f}' for b in bound)} "
          f"(median {statistics.median(bound):.2f}): a copy whose requests cost what curl's do and "
          "which also does the disk's work cannot take less on these cores, whatever overlaps.")
    print("\n(runs: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)} s" for k, v in times.items()) + ")")

if __name__ == "__main__":
    main()
