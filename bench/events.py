#!/usr/bin/env python3
"""Event rate: dcflow consuming and deciding billing messages versus kcat reading the topic.

1,000,000 billing messages (--messages) go to one partition of a real Kafka broker: 99 % are
dCache's other traffic (reads, p2p copies, stores, restores, removes, hits, warnings, failed
uploads, door requests, from fixtures/billing), 1 % are completed uploads under the
configured folder, each with its own pnfsid, naming 100 small files stored in the emulator.
The first upload of each file copies it; the others find it already present (a HEAD and a
local checksum). Each upload is followed by the two billing messages of its read-back (a door
request and a pool transfer under the folder), in place of two background messages. Then, on
the same topic:

- kcat -C -e (Debian package kcat), reading every message to /dev/null, median of --runs:
  the reference of the target. kcat -e exits at librdkafka's end-of-partition report, which
  comes after a fetch that finds nothing (the broker holds it for fetch.wait.max.ms, 500 ms),
  while dcflow ends as soon as it has seen the last offset of the partition; so also
- kcat -C -c N, which exits at the N-th message, without that wait: the stricter reference;
- kcat -G GROUP -c N: the same in a new consumer group, the way dcflow consumes (it must: the
  group is what commits its offsets and spreads partitions over workers). It pays what dcflow
  pays before the first message (finding the coordinator, joining, syncing, fetching the
  committed offsets), which kcat -C does not;
- dcflow run --until-caught-up in a new consumer group each time: consume, decode, select,
  copy or verify, commit; the time includes process start and joining the group;
- the same with a folder nobody uploads to: every message is dismissed, which is the floor of
  dcflow's own cost per message;
- dcflow dispatch --until-caught-up (the scale-out role): consume, decide, and produce each
  selected upload to a 6-partition work topic keyed by pnfsid, awaiting the broker's
  acknowledgements before committing; no copy and no verification, which are the workers'.

Prints a markdown table with messages per second and the ratio. dcflow's runs also log when
their partition was assigned and when they caught up: the rate between the two (its steady
consuming rate, without process start, joining the group and stopping) is printed beside
kcat -C -c's whole rate. The broker comes from DCFLOW_KAFKA, or scripts/kafka.sh starts one for
the run.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from large_files import build, start_sim, upload  # noqa: E402  (bench/large_files.py)


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def broker_address(work):
    if os.environ.get("DCFLOW_KAFKA"):
        return os.environ["DCFLOW_KAFKA"], None
    env = {**os.environ, "KAFKA_STATE": str(work / "kafka")}
    out = sh(str(ROOT / "scripts/kafka.sh"), "start", env=env, capture_output=True, text=True).stdout
    address = re.search(r"DCFLOW_KAFKA=(\S+)", out).group(1)
    return address, env


def make_events(path, count, info, files, folder, per_mille):
    fixtures = {}
    for f in sorted((ROOT / "fixtures/billing").glob("*.json")):
        fixtures[f.stem] = f.read_text().strip()
    background = [v for k, v in fixtures.items() if k != "transfer-pool-upload"]
    upload_template = json.loads(fixtures["transfer-pool-upload"])
    # dcflow's own copy of each upload shows up in billing as a read under the folder: a door
    # request and a pool transfer, which must be parsed to be told apart from uploads.
    read_backs = [json.loads(fixtures[k]) for k in ("request-door-download", "transfer-pool-download")]
    selected = 0
    pending_reads = []
    with open(path, "w") as out:
        for i in range(count):
            pnfsid = f"0000{i:032X}"
            if per_mille and i % (1000 // per_mille) == 50 % (1000 // per_mille):
                msg = dict(upload_template)
                msg["pnfsid"] = pnfsid
                msg["billingPath"] = f"{info['root']}{folder}/file-{selected % files}.dat"
                msg["transferPath"] = msg["billingPath"]
                msg["fileSize"] = msg["transferSize"] = 1024
                out.write(json.dumps(msg, separators=(",", ":")) + "\n")
                selected += 1
                for template in read_backs:
                    read = dict(template)
                    read["pnfsid"] = pnfsid
                    read["billingPath"] = read["transferPath"] = msg["billingPath"]
                    pending_reads.append(json.dumps(read, separators=(",", ":")))
            elif pending_reads:
                out.write(pending_reads.pop() + "\n")
            else:
                line = background[i % len(background)]
                out.write(line.replace("00004F0AF7BEAE5A4CBEBF0FBF036D01F4C4", pnfsid) + "\n")
    return selected


# Only the two lines that time the consuming itself (warnings too): the per-upload lines of
# the info level would cost the run their own time.
TIMING_LOG = "warn,dcflow_kafka=info,dcflow::commands=info"


def consuming_seconds(log):
    """Seconds from the partition's assignment to the caught-up line, from dcflow's log."""
    def stamp(pattern):
        m = re.search(r"^(\S+)Z .*" + pattern, log, re.M)
        if not m:
            return None
        return datetime.datetime.fromisoformat(m.group(1)).timestamp()
    start, end = stamp("partitions assigned"), stamp("caught up")
    return end - start if start and end else None


def run_dispatch(dcflow, work, info, broker, topic, run, folder, selected):
    """Seconds for `dcflow dispatch --until-caught-up` in a new group; checks what it forwarded."""
    cfg = work / f"dispatch-{run}.toml"
    cfg.write_text(f"""[kafka]
topic = "{topic}"
servers = ["{broker}"]
consumergroup = "dispatch-{run}-{int(time.time())}"
worktopic = "{topic}-work-{run}"
workpartitions = 6
[dcache]
url = "{info['door_url']}"
pool = "{info['root']}"
folder = "{folder}"
[local]
token = "{info['token_file']}"
capath = "{info['capath']}"
downloadfolder = "{work}/download"
failedtasksfile = "{work}/failed.csv"
successfultaskfile = "{work}/success-dispatch.csv"
""")
    t = time.monotonic()
    out = subprocess.run([str(dcflow), "dispatch", "--config", str(cfg), "--until-caught-up"],
                         env={**os.environ, "DCFLOW_LOG": TIMING_LOG},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    secs = time.monotonic() - t
    m = re.search(r"forwarded=(\d+)", out.stderr)
    if not m or int(m.group(1)) != selected:
        sys.exit(f"dispatch forwarded {m and m.group(1)}, expected {selected}:\n{out.stderr[-2000:]}")
    return secs, consuming_seconds(out.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--selected-per-mille", type=int, default=10,
                    help="selected uploads per 1000 messages (10 = 1 %%; 0 = none)")
    ap.add_argument("--work", default="/var/tmp/dcflow-bench-events")
    ap.add_argument("--wrap", metavar="COMMAND",
                    help="run each benchmark run of dcflow (not the dismissing ones) under COMMAND, e.g. \"/usr/bin/time -v\", or "
                         "\"perf record -g -o /tmp/perf.data --\" with --runs 1 to profile it")
    ap.add_argument("--dcflow", metavar="BINARY",
                    help="measure this dcflow binary (e.g. an older build, for an A/B) instead of the one built here")
    a = ap.parse_args()
    if not shutil.which("kcat"):
        sys.exit("kcat is needed: apt-get install kcat")

    dcflow, sim_bin = build()
    if a.dcflow:
        dcflow = Path(a.dcflow).resolve()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    broker, kafka_env = broker_address(work)
    sim, info = start_sim(sim_bin, work / "sim")
    topic = None
    try:
        folder = "/bench/events"
        src = work / "one-kib"
        src.write_bytes(os.urandom(1024))
        for i in range(a.files):
            upload(info, f"{folder}/file-{i}.dat", src)
        events = work / "events.jsonl"
        selected = make_events(events, a.messages, info, a.files, folder, a.selected_per_mille)
        topic = f"billing-bench-{int(time.time())}"
        sh("kcat", "-P", "-b", broker, "-t", topic, "-l", str(events))
        events.unlink()

        def write_run_config(name, real):
            cfg = work / f"run-{name}.toml"
            cfg.write_text(f"""[kafka]
topic = "{topic}"
servers = ["{broker}"]
consumergroup = "bench-{name}-{int(time.time())}"
[dcache]
url = "{info['door_url']}"
pool = "{info['root']}"
folder = "{folder if real else '/bench/nothing-here'}"
maxdownloads = 32
[local]
token = "{info['token_file']}"
capath = "{info['capath']}"
downloadfolder = "{work}/download"
failedtasksfile = "{work}/failed.csv"
successfultaskfile = "{work}/success-{name}.csv"
""")
            return cfg

        # A first consumer group after the broker started waits for its coordinator (seconds,
        # the first time): one discarded run, so that round 1 does not pay it.
        sh(str(dcflow), "run", "--config", str(write_run_config("warm-up", False)),
           "--until-caught-up", env={**os.environ, "DCFLOW_LOG": "warn"}, stdout=subprocess.DEVNULL)

        kcat_times, kcat_count_times, kcat_group_times = [], [], []
        dcflow_times, dismiss_times, dispatch_times = [], [], []
        # Assignment to caught-up, from dcflow's log (see consuming_seconds).
        steady = {"run": [], "dismissing": [], "dispatch": []}
        for run in range(2 * a.runs):
            # Even runs: the benchmark proper. Odd runs: a folder nothing is uploaded to, so
            # every message is dismissed (the floor of dcflow's own per-message cost).
            real = run % 2 == 0
            if real:
                # The references of this round, just before dcflow's runs.
                for stop, times in ((["-e"], kcat_times), (["-c", str(a.messages)], kcat_count_times)):
                    t = time.monotonic()
                    out = subprocess.run(["kcat", "-C", "-b", broker, "-t", topic, "-o", "beginning",
                                          *stop, "-q", "-f", "%o\\n"], stdout=subprocess.PIPE, check=True)
                    times.append(time.monotonic() - t)
                    read = out.stdout.count(b"\n")
                    if read != a.messages:
                        sys.exit(f"kcat {' '.join(stop)} read {read} messages, expected {a.messages}")
                t = time.monotonic()
                out = subprocess.run(["kcat", "-b", broker, "-G", f"kcat-{run}-{int(time.time())}",
                                      "-X", "auto.offset.reset=earliest", "-c", str(a.messages),
                                      "-q", "-f", "%o\\n", topic], stdout=subprocess.PIPE, check=True)
                kcat_group_times.append(time.monotonic() - t)
                read = out.stdout.count(b"\n")
                if read != a.messages:
                    sys.exit(f"kcat -G read {read} messages, expected {a.messages}")
            cfg = write_run_config(run, real)
            t = time.monotonic()
            wrap = shlex.split(a.wrap) if a.wrap and real else []
            out = subprocess.run([*wrap, str(dcflow), "run", "--config", str(cfg), "--until-caught-up"],
                                 env={**os.environ, "DCFLOW_LOG": TIMING_LOG}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            (dcflow_times if real else dismiss_times).append(time.monotonic() - t)
            if wrap:
                sys.stderr.write(out.stderr)  # the wrapper's own report (e.g. time -v) is there too
            if out.returncode != 0:
                sys.exit(f"dcflow run exited with {out.returncode}:\n{out.stderr[-2000:]}")
            steady["run" if real else "dismissing"].append(consuming_seconds(out.stderr))
            success = work / f"success-{run}.csv"
            rows = sum(1 for _ in open(success)) - 1 if success.exists() else 0
            if rows != (selected if real else 0):
                sys.exit(f"dcflow recorded {rows} successes, expected {selected if real else 0}")
            if not real:
                secs, consuming = run_dispatch(dcflow, work, info, broker, topic, run, folder, selected)
                dispatch_times.append(secs)
                steady["dispatch"].append(consuming)
                print(f"run {run // 2 + 1}: kcat -e {kcat_times[run // 2]:.2f} s, "
                      f"kcat -c {kcat_count_times[run // 2]:.2f} s, "
                      f"kcat -G {kcat_group_times[run // 2]:.2f} s, "
                      f"dcflow {dcflow_times[-1]:.2f} s, dcflow dismissing all "
                      f"{dismiss_times[-1]:.2f} s, dispatch {dispatch_times[-1]:.2f} s",
                      file=sys.stderr)
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=10)
        if topic and not kafka_env:
            # A million messages take about 1 GB of the broker's disk.
            for t in [topic] + [f"{topic}-work-{run}" for run in range(2 * a.runs)]:
                subprocess.run([str(ROOT / "scripts/kafka.sh"), "delete-topic", t],
                               stderr=subprocess.DEVNULL)
        if kafka_env:
            subprocess.run([str(ROOT / "scripts/kafka.sh"), "stop"], env=kafka_env)
        shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    k, d = statistics.median(kcat_times), statistics.median(dcflow_times)
    c = statistics.median(kcat_count_times)
    z = statistics.median(dismiss_times)
    w = statistics.median(dispatch_times)
    n = a.messages
    print(f"\n#### event-rate benchmark — {datetime.date.today()} — commit {commit}")
    print(f"machine: {os.cpu_count()} cores; Apache Kafka broker on 127.0.0.1; one partition; "
          f"{n} messages, {selected} selected uploads ({a.files} distinct files)\n")
    print("| reader | time (median of %d) | messages/s | dcflow / kcat rate |" % a.runs)
    print("|---|---|---|---|")
    print(f"| kcat -C -e (the reference) | {k:.2f} s | {n / k:,.0f} | |")
    print(f"| kcat -C -c {n} (exits at the last message: no end-of-partition wait) | {c:.2f} s "
          f"| {n / c:,.0f} | |")
    g = statistics.median(kcat_group_times)
    print(f"| kcat -G GROUP -c {n} (in a new consumer group, as dcflow) | {g:.2f} s | {n / g:,.0f} | |")
    print(f"| dcflow run --until-caught-up (decode, select, copy or verify, commit) | {d:.2f} s "
          f"| {n / d:,.0f} | **{(n / d) / (n / k):.2f}** |")
    print(f"| dcflow run --until-caught-up, a folder with no uploads (every message dismissed) "
          f"| {z:.2f} s | {n / z:,.0f} | {(n / z) / (n / k):.2f} |")
    print(f"| dcflow dispatch --until-caught-up (decode, select, produce each selected upload "
          f"to a 6-partition work topic) | {w:.2f} s | {n / w:,.0f} | **{(n / w) / (n / k):.2f}** |")
    print(f"\nAgainst kcat -C -c (no end-of-partition wait): dcflow run **{c / d:.2f}**, "
          f"dismissing everything {c / z:.2f}, dispatch **{c / w:.2f}**.")
    # Issue 19's measure, round by round: kcat -c's time over dcflow's in the same round.
    for label, times in (("run", dcflow_times), ("dispatch", dispatch_times)):
        r = [kc / t for kc, t in zip(kcat_count_times, times)]
        print(f"\ndcflow {label} / kcat -C -c rate, round by round: {', '.join(f'{x:.2f}' for x in r)} "
              f"(min {min(r):.2f}, median {statistics.median(r):.2f}, max {max(r):.2f})")
    # What a consumer group costs the library's own reader: kcat -G discards every message,
    # one at a time, after joining a new group (as dcflow must: DESIGN.md's consumer groups).
    r = [kc / kg for kc, kg in zip(kcat_count_times, kcat_group_times)]
    print(f"\nkcat -G -c / kcat -C -c rate (librdkafka's group consumer, nothing done per message), "
          f"round by round: {', '.join(f'{x:.2f}' for x in r)} "
          f"(min {min(r):.2f}, median {statistics.median(r):.2f}, max {max(r):.2f})")
    # The same against kcat in a consumer group, and dcflow's steady rate (assignment to caught
    # up, from its log) against kcat -C -c's whole run.
    for label, times in (("run", dcflow_times), ("dispatch", dispatch_times)):
        r = [kg / t for kg, t in zip(kcat_group_times, times)]
        print(f"\ndcflow {label} / kcat -G -c rate, round by round: {', '.join(f'{x:.2f}' for x in r)} "
              f"(min {min(r):.2f}, median {statistics.median(r):.2f}, max {max(r):.2f})")
    for label in ("run", "dismissing", "dispatch"):
        if None in steady[label]:
            print(f"\n(dcflow {label}: no assignment or caught-up line in its log: no steady rate)")
            continue
        r = [kc / t for kc, t in zip(kcat_count_times, steady[label])]
        print(f"\ndcflow {label}, steady rate (assigned to caught up: "
              f"{', '.join(f'{t:.2f}' for t in steady[label])} s) / kcat -C -c whole rate, round by round: "
              f"{', '.join(f'{x:.2f}' for x in r)} (min {min(r):.2f}, median {statistics.median(r):.2f}, "
              f"max {max(r):.2f})")
    print(f"\n(runs: kcat -e {', '.join(f'{t:.2f}' for t in kcat_times)} s; "
          f"kcat -G {', '.join(f'{t:.2f}' for t in kcat_group_times)} s; "
          f"kcat -c {', '.join(f'{t:.2f}' for t in kcat_count_times)} s; "
          f"dcflow {', '.join(f'{t:.2f}' for t in dcflow_times)} s; "
          f"dismissing {', '.join(f'{t:.2f}' for t in dismiss_times)} s; "
          f"dispatch {', '.join(f'{t:.2f}' for t in dispatch_times)} s)")


if __name__ == "__main__":
    main()
