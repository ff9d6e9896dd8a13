#!/usr/bin/env python3
"""Registration throughput of the `rucio` step against a real Rucio (scripts/rucio.sh start).

--files uploads of 1 KiB to the emulator (default 1000), replayed by dcflow three times into
fresh download folders and fresh Rucio scopes:

- copy only (the workflow without its rucio step): the floor;
- copy → rucio with `[rucio] batch = 1`: one file per registration (its replica list, its
  POST /replicas and its attach, one after the other);
- copy → rucio with the defaults, `batch = 100`, `batchwait = 200` ms.

Prints each run's wall time, files per second, and registrations per second once the copy-only
time is taken off. --rounds repeats the three (default 1).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_files import build, start_sim, write_config  # noqa: E402
from small_files import upload_many  # noqa: E402


class Rucio:
    def __init__(self, url, account, username, password):
        self.url, self.account = url, account
        req = urllib.request.Request(f"{url}/auth/userpass", headers={
            "X-Rucio-Account": account, "X-Rucio-Username": username, "X-Rucio-Password": password})
        with urllib.request.urlopen(req) as r:
            self.token = r.headers["X-Rucio-Auth-Token"]

    def post(self, path, body):
        req = urllib.request.Request(f"{self.url}/{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"X-Rucio-Auth-Token": self.token,
                                                             "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return r.status

    def get_lines(self, path):
        req = urllib.request.Request(f"{self.url}/{path}", headers={"X-Rucio-Auth-Token": self.token})
        with urllib.request.urlopen(req) as r:
            return [l for l in r.read().decode().splitlines() if l.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default="/var/tmp/dcflow-bench-rucio")
    a = ap.parse_args()
    url = os.environ.get("DCFLOW_RUCIO")
    if not url:
        sys.exit("needs a Rucio: eval \"$(scripts/rucio.sh start)\"")
    rucio = Rucio(url, os.environ.get("DCFLOW_RUCIO_ACCOUNT", "root"),
                  os.environ.get("DCFLOW_RUCIO_USERNAME", "ddmlab"),
                  os.environ.get("DCFLOW_RUCIO_PASSWORD", "secret"))
    dcflow, sim_bin = build()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim, info = start_sim(sim_bin, work / "sim")
    tag = f"{int(time.time()) % 10**8}"
    rse = f"BENCH_FS_{tag}"
    rucio.post(f"rses/{rse}", {"deterministic": False, "rse_type": "DISK"})
    every = {"read": 1, "write": 1, "delete": 1}
    rucio.post(f"rses/{rse}/protocols/file", {
        "scheme": "file", "hostname": "localhost", "port": 0, "prefix": "/",
        "impl": "rucio.rse.protocols.posix.Default", "domains": {"lan": every, "wan": every}})
    results = {"copy only": [], "batch = 1": [], "batch = 100": []}
    try:
        upload_many(info, "/bench/rucio", a.files, 1024)
        events = work / "events.jsonl"
        shutil.copy(info["billing_file"], events)
        for rnd in range(a.rounds):
            for case in results:
                name = f"r{rnd}-{case.split()[-1]}".replace(" ", "")
                scope = f"b{tag}{rnd}{len(results[case])}{case[-1]}".replace(" ", "")[:25]
                scope = "".join(c for c in scope if c.isalnum())
                download = work / name
                cfg = write_config(info, work, download, 8, name)
                # A state file of its own: the cases share the workflow's name.
                text = cfg.read_text().replace(
                    "[local]\n", f"[local]\nstatefile = \"{work}/{name}-state.sqlite\"\n") + f"""
[[workflow]]
name = "bench"
[[workflow.step]]
type = "copy"
"""
                if case != "copy only":
                    rucio.post(f"scopes/{rucio.account}/{scope}", {})
                    batch = "batch = 1" if case == "batch = 1" else ""
                    text = f"""[rucio]
url = "{url}"
account = "{rucio.account}"
username = "{os.environ.get('DCFLOW_RUCIO_USERNAME', 'ddmlab')}"
password = "{os.environ.get('DCFLOW_RUCIO_PASSWORD', 'secret')}"
{batch}
""" + text + f"""[[workflow.step]]
type = "rucio"
rse = "{rse}"
scope = "{scope}"
pfn = "file://localhost{{local_path}}"
dataset = "bench"
"""
                cfg.write_text(text)
                t = time.monotonic()
                proc = subprocess.run([str(dcflow), "replay", "--config", str(cfg), str(events)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env={**os.environ, "DCFLOW_LOG": "warn"})
                secs = time.monotonic() - t
                if proc.returncode != 0:
                    sys.exit(f"{case}: dcflow replay failed ({proc.returncode}):\n"
                             f"{proc.stderr.decode()[-3000:]}")
                if case != "copy only":
                    listed = len(rucio.get_lines(f"dids/{scope}/bench/dids"))
                    if listed != a.files:
                        sys.exit(f"{case}: {listed} files in the dataset, not {a.files}")
                results[case].append(secs)
    finally:
        sim.terminate()
        sim.wait()
    floor = min(results["copy only"])
    print(f"rucio step: {a.files} files of 1 KiB, Rucio 41.5.1 (gunicorn, 127.0.0.1), "
          f"emulator, maxdownloads 8, {a.rounds} round(s)")
    for case, times in results.items():
        best = min(times)
        line = f"  {case:<12} {best:7.2f} s  {a.files / best:7.1f} files/s"
        if case != "copy only":
            line += f"   registrations {a.files / max(best - floor, 1e-3):7.1f}/s (copy time taken off)"
        print(line + f"   (rounds: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
