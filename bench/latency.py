#!/usr/bin/env python3
"""Latency: from an upload's commit in the emulator to the verified file at its final path.

`dcflow run` consumes the emulator's billing topic on a real Kafka broker; --files (1000)
uploads of --size-mib (1) MiB arrive at a steady --rate (per second). For each file the time
the door answered 201 (the commit; the billing messages are produced then) is compared with
the time of its success record (written once the file was verified, fsynced and renamed).
Prints p50, p90, p99 and the maximum. The broker comes from DCFLOW_KAFKA, or
scripts/kafka.sh starts one.
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
from events import broker_address  # noqa: E402
from large_files import build, start_sim  # noqa: E402


def parse_time(s):
    # RFC 3339 with up to nanoseconds; Python wants at most microseconds.
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits):]
        s = f"{head}.{digits[:6]}{tz}"
    return datetime.datetime.fromisoformat(s).timestamp()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size-mib", type=int, default=1)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--work", default="/var/tmp/dcflow-bench-latency")
    a = ap.parse_args()
    dcflow, sim_bin = build()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    broker, kafka_env = broker_address(work)
    topic = f"latency-{int(time.time())}"
    sim, info = start_sim(sim_bin, work / "sim", ["--kafka", broker, "--topic", topic])
    daemon = None
    try:
        success = work / "success.csv"
        cfg = work / "dcflow.toml"
        cfg.write_text(f"""[kafka]
topic = "{topic}"
servers = ["{broker}"]
consumergroup = "latency-{int(time.time())}"
[dcache]
url = "{info['door_url']}"
pool = "{info['root']}"
folder = "/bench"
maxdownloads = 16
[local]
token = "{info['token_file']}"
capath = "{info['capath']}"
downloadfolder = "{work}/download"
failedtasksfile = "{work}/failed.csv"
successfultaskfile = "{success}"
""")
        daemon = subprocess.Popen([str(dcflow), "run", "--config", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=open(work / "run.log", "w"),
                                  env={**os.environ, "DCFLOW_LOG": "info"})
        for _ in range(300):
            if "partitions assigned" in (work / "run.log").read_text():
                break
            time.sleep(0.1)
        else:
            sys.exit("dcflow did not join its group")

        url = urllib.parse.urlparse(info["door_url"])
        ctx = ssl.create_default_context(cafile=info["ca_pem"])
        token = Path(info["token_file"]).read_text().strip()
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
        body = os.urandom(a.size_mib << 20)
        committed = {}
        start = time.monotonic()
        for i in range(a.files):
            # A steady rate: upload i starts at i / rate seconds.
            delay = start + i / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            path = f"/bench/lat/file-{i:05d}.dat"
            conn.request("PUT", path, body=body, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 201:
                sys.exit(f"upload {i}: {resp.status}")
            committed[info["root"] + path] = time.time()
        conn.close()

        deadline = time.monotonic() + 300
        done = {}
        while time.monotonic() < deadline:
            if success.exists():
                lines = success.read_text().splitlines()[1:]
                done = {}
                for line in lines:
                    fields = line.split(",")
                    done[fields[2]] = parse_time(fields[0])
                if all(p in done for p in committed):
                    break
            time.sleep(0.5)
        else:
            sys.exit(f"only {len(done)} of {len(committed)} files landed")
    finally:
        if daemon:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=10)
        if kafka_env:
            subprocess.run([str(ROOT / "scripts/kafka.sh"), "stop"], env=kafka_env)

    lat = sorted(done[p] - t for p, t in committed.items())
    q = statistics.quantiles(lat, n=100, method="inclusive")  # never beyond the maximum
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"\n#### latency benchmark — {datetime.date.today()} — commit {commit}")
    print(f"machine: {os.cpu_count()} cores; Apache Kafka broker and dcache-sim on 127.0.0.1; "
          f"{a.files} uploads of {a.size_mib} MiB at {a.rate:g}/s; from the door's 201 to the "
          f"success record (verified, fsynced, renamed)\n")
    print("| p50 | p90 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| {q[49] * 1000:.0f} ms | {q[89] * 1000:.0f} ms | {q[98] * 1000:.0f} ms | {lat[-1] * 1000:.0f} ms |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
