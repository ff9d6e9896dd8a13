#!/usr/bin/env python3
"""The `slurm` step's delays against a real Slurm (scripts/slurm.sh start; SLURM_CONF set).

--files uploads to the emulator (default 20), replayed by dcflow through copy → slurm, each
job a batch script that writes its start and end times (date +%s.%N) beside the copy and
sleeps --sleep seconds (2) in between. From dcflow's log (SLURM_SUBMIT, SLURM_END) and the
jobs' own clocks:

- submit → start: from dcflow's sbatch (the SLURM_SUBMIT line) to the job's first command;
- end → noticed: from the job's last command to dcflow's SLURM_END line;
- plain sbatch → start, for reference: the same script submitted by hand with sbatch, the same
  number of jobs at once, timed the same way;
- the whole replay's wall time against --files × --sleep / (jobs at once).

Prints p50, p90 and max of each delay. Times are one machine's clock (dcflow, slurmd and the
jobs run on it).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from large_files import build, start_sim, write_config  # noqa: E402
from small_files import upload_many  # noqa: E402

SCRIPT = """#!/bin/sh
date +%s.%N > "$1.start"
sleep "$2"
date +%s.%N > "$1.end"
"""


def log_time(line):
    stamp = line.split(" ", 1)[0].rstrip("Z")
    whole, _, frac = stamp.partition(".")
    t = datetime.fromisoformat(whole + "+00:00").timestamp()
    return t + float("0." + (frac or "0"))


def summary(name, values):
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    print(f"  {name:<24} p50 {statistics.median(values):6.2f} s   p90 {p90:6.2f} s   "
          f"max {values[-1]:6.2f} s   ({len(values)} jobs)")


def plain_sbatch(script, work, files, sleep):
    """The same jobs submitted by hand: submit → start, per job."""
    out = work / "plain"
    out.mkdir()
    submitted = {}
    for i in range(files):
        target = out / f"p-{i}"
        t = time.time()
        subprocess.run(["sbatch", "--parsable", f"--chdir={out}", "--output=/dev/null",
                        str(script), str(target), str(sleep)],
                       check=True, stdout=subprocess.DEVNULL)
        submitted[target] = t
    deadline = time.time() + 600
    while not all(Path(f"{t}.end").exists() for t in submitted):
        if time.time() > deadline:
            sys.exit("plain sbatch jobs did not end in 600 s")
        time.sleep(0.2)
    return [float(Path(f"{t}.start").read_text()) - s for t, s in submitted.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=2.0)
    ap.add_argument("--work", default="/var/tmp/dcflow-bench-slurm")
    a = ap.parse_args()
    if not os.environ.get("SLURM_CONF") or not shutil.which("sbatch"):
        sys.exit("needs a Slurm: eval \"$(scripts/slurm.sh start)\"")
    dcflow, sim_bin = build()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o755)
    script = work / "job.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    sim, info = start_sim(sim_bin, work / "sim")
    try:
        upload_many(info, "/bench/slurm", a.files, 4096)
        events = work / "events.jsonl"
        shutil.copy(info["billing_file"], events)
        download = work / "download"
        cfg = write_config(info, work, download, 8, "slurm")
        cfg.write_text(cfg.read_text() + f"""
[[workflow]]
name = "bench{int(time.time())}"
attempts = 1
[[workflow.step]]
type = "copy"
[[workflow.step]]
type = "slurm"
script = "{script}"
args = ["{{local_path}}", "{a.sleep}"]
chdir = "{work}"
output = "/dev/null"
""")
        t = time.monotonic()
        proc = subprocess.run([str(dcflow), "replay", "--config", str(cfg), str(events)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "DCFLOW_LOG": "info"})
        wall = time.monotonic() - t
        log = proc.stderr.decode()
        if proc.returncode != 0:
            sys.exit(f"dcflow replay failed ({proc.returncode}):\n{log[-3000:]}")
        submit, end = {}, {}
        for line in log.splitlines():
            pnfsid = re.search(r"pnfsid=(\w+)", line)
            if "SLURM_SUBMIT" in line and pnfsid:
                submit[pnfsid.group(1)] = log_time(line)
            elif "SLURM_END" in line and pnfsid:
                end[pnfsid.group(1)] = log_time(line)
        copies = {}
        for line in log.splitlines():
            m = re.search(r"pnfsid=(\w+).*COPY_INIT \S+ -> (\S+)", line)
            if m:
                copies[m.group(1)] = m.group(2)
        to_start, to_notice = [], []
        for pnfsid, path in copies.items():
            to_start.append(float(Path(path + ".start").read_text()) - submit[pnfsid])
            to_notice.append(end[pnfsid] - float(Path(path + ".end").read_text()))
        plain = plain_sbatch(script, work, a.files, a.sleep)
    finally:
        sim.terminate()
        sim.wait()
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)
               .stdout.split()[0])
    print(f"slurm step: {a.files} files, jobs of {a.sleep:g} s, {cpus} CPUs (jobs at once), "
          f"Slurm {subprocess.run(['sbatch', '--version'], capture_output=True, text=True).stdout.strip()}")
    summary("dcflow submit → start", to_start)
    summary("plain sbatch → start", plain)
    summary("job end → dcflow noticed", to_notice)
    ideal = a.files * a.sleep / cpus
    print(f"  replay wall time {wall:.1f} s (the jobs' own time, {cpus} at once: {ideal:.1f} s)")


if __name__ == "__main__":
    main()
