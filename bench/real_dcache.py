#!/usr/bin/env python3
"""dcflow against a real dCache door: the same files through the same redirecting HTTPS door
(scripts/dcache.sh start), copied by curl, rclone and dcflow at the same parallelism.

- small files: --small-files × 16 KiB (default 300), --small-parallel transfers (16);
- large files: --large-files × --large-mib MiB (8 × 128 MiB), --large-parallel transfers (4).

Readers, each round in a fresh destination, each run ending with `sync`:
- curl --parallel (GET at the door, following the 302 to the pool mover; neither verifies nor
  fsyncs: the physical limit);
- rclone copy with the WebDAV backend (PROPFIND, then GET), --transfers N;
- dcflow replay of the billing messages dCache itself published for these uploads (adler32
  verified against dCache's, every file fsynced and renamed into place, one CSV row each).
Authentication: a macaroon that the door issues (a bearer token for all three).

- latency: --latency-files (100) uploads of 1 MiB, one every --latency-interval seconds (0.2),
  while `dcflow run` follows dCache's billing topic: from the door's 201 (curl returns) to the
  file's success record (verified, fsynced, renamed, recorded); p50, p90, p99, max.

Prints, per case, each reader's wall time (median, min, max of --rounds) and CPU seconds
(user + system, per GiB for large files), and dcflow's ratio to each peer, round by round.
Needs DCFLOW_DCACHE_* (from scripts/dcache.sh start) and DCFLOW_KAFKA (the broker dCache
publishes to), curl, rclone and kcat (Debian packages).
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "admin:dickerelch"


def env(name):
    v = os.environ.get(name)
    if not v:
        sys.exit(f"{name} is not set: eval \"$(KAFKA=$DCFLOW_KAFKA scripts/dcache.sh start)\"")
    return v


def build():
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "dcflow"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release" / "dcflow"


def sync():
    subprocess.run(["sync"], check=True)


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd, **kw):
    """(wall seconds including the final sync, CPU seconds of the command)."""
    cpu = children_cpu()
    t = time.monotonic()
    proc = subprocess.run(cmd, **kw)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode})")
    cpu = children_cpu() - cpu
    sync()
    return time.monotonic() - t, cpu


def upload(door, ca, folder, src, names, parallel=4):
    """PUT through the redirecting door (307 to a pool), a few at a time: dCache's test
    instance refused most of 16 parallel PUTs."""
    cfg = src / "upload.cfg"
    with open(cfg, "w") as f:
        for n in names:
            f.write(f'upload-file = "{src / n}"\nurl = "{door}{folder}/{n}"\n')
    subprocess.run(["curl", "-sS", "--no-progress-meter", "-f", "-L", "--retry", "5", "--parallel", "--parallel-max", str(parallel),
                    "--cacert", ca, "-u", ADMIN, "-o", "/dev/null", "-K", str(cfg)], check=True,
                   stdout=subprocess.DEVNULL)


def macaroon(door, ca, folder):
    out = subprocess.run(["curl", "-sS", "-f", "--cacert", ca, "-u", ADMIN, "-X", "POST",
                          "-H", "Content-Type: application/macaroon-request",
                          "-d", '{"caveats":["activity:DOWNLOAD,LIST"],"validity":"PT6H"}',
                          f"{door}{folder}/"], check=True, capture_output=True)
    return json.loads(out.stdout)["macaroon"]


def billing_events(broker, topic, folder, expected, path):
    """The billing messages of `folder` that dCache published (kcat), once all are there."""
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(["kcat", "-C", "-b", broker, "-t", topic, "-e", "-q"],
                             capture_output=True, check=True).stdout.splitlines()
        mine = [l for l in out if folder.encode() in l]
        writes = sum(1 for l in mine if b'"isWrite":"write"' in l)
        if writes >= 2 * expected or time.monotonic() > deadline:
            path.write_bytes(b"\n".join(mine) + b"\n")
            return writes // 2


def run_curl(door, ca, token, folder, names, out, parallel):
    cfg = out.parent / "curl.cfg"
    with open(cfg, "w") as f:
        for n in names:
            f.write(f'url = "{door}{folder}/{n}"\noutput = "{out / n}"\n')
    return timed(["curl", "-sS", "--no-progress-meter", "-f", "-L", "--parallel", "--parallel-max", str(parallel),
                  "--cacert", ca, "-H", f"Authorization: Bearer {token}", "-K", str(cfg)],
                 stdout=subprocess.DEVNULL)


def run_rclone(door, ca, token, folder, out, parallel):
    e = {**os.environ, "RCLONE_CONFIG_DC_TYPE": "webdav", "RCLONE_CONFIG_DC_URL": door,
         "RCLONE_CONFIG_DC_VENDOR": "other", "RCLONE_CONFIG_DC_BEARER_TOKEN": token}
    return timed(["rclone", "copy", f"dc:{folder}", str(out), "--transfers", str(parallel),
                  "--checkers", str(parallel), "--ca-cert", ca, "--no-check-dest", "--ignore-checksum",
                  "-q", "--multi-thread-streams", "0"], env=e)


def run_dcflow(dcflow, door, capath, token_file, folder, events, work, out, parallel, wrap=()):
    cfg = work / "dcflow.toml"
    cfg.write_text(f"""[dcache]
url = "{door}"
pool = "/"
folder = "{folder}"
maxdownloads = {parallel}
retryseconds = 1
retrytimes = 5
timeout = 600
[local]
token = "{token_file}"
capath = "{capath}"
downloadfolder = "{out}"
permissions = '2750'
failedtasksfile = "{work}/failed.csv"
successfultaskfile = "{work}/success.csv"
""")
    for f in ("failed.csv", "success.csv"):
        (work / f).unlink(missing_ok=True)
    wall = timed([*wrap, str(dcflow), "replay", "--config", str(cfg), str(events)],
                 stdout=subprocess.DEVNULL, env={**os.environ, "DCFLOW_LOG": "warn"})
    rows = (work / "success.csv").read_text().count("\n") - 1
    return wall, rows


def case(name, args, dcflow, door, ca, capath, broker, topic, work, count, size, parallel):
    folder = f"/public/bench-{name}-{os.getpid()}-{int(time.time())}"
    src = work / f"src-{name}"
    src.mkdir()
    names = [f"f{i:05d}.dat" for i in range(count)]
    for n in names:
        with open(src / n, "wb") as f:
            f.write(os.urandom(size))
    upload(door, ca, folder, src, names)
    events = work / f"events-{name}.jsonl"
    announced = billing_events(broker, topic, folder, count, events)
    if announced < count:
        sys.exit(f"{name}: dCache announced {announced} of {count} uploads")
    token = macaroon(door, ca, folder)
    token_file = work / "macaroon"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    results = {"curl": [], "rclone": [], "dcflow": []}
    for r in range(args.rounds):
        for reader in results:
            out = work / f"out-{name}-{reader}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            if reader == "curl":
                wall, cpu = run_curl(door, ca, token, folder, names, out, parallel)
            elif reader == "rclone":
                wall, cpu = run_rclone(door, ca, token, folder, out, parallel)
            else:
                (wall, cpu), rows = run_dcflow(dcflow, door, capath, token_file, folder, events, work, out,
                                               parallel, shlex.split(args.wrap or ""))
                if rows != count:
                    sys.exit(f"{name}: dcflow recorded {rows} of {count} files")
            got = sum(1 for n in names if (out / n).stat().st_size == size)
            if got != count:
                sys.exit(f"{name}: {reader} delivered {got} of {count} files")
            results[reader].append((wall, cpu))
    gib = count * size / 2**30
    print(f"\n## {name}: {count} × {size // 1024} KiB, {parallel} parallel, {args.rounds} rounds "
          f"(real dCache 12.0.1 door)\n")
    print("| reader | wall median (min–max) | CPU s median | CPU s per GiB |")
    print("|---|---|---|---|")
    for reader, rs in results.items():
        walls = [w for w, _ in rs]
        cpus = [c for _, c in rs]
        print(f"| {reader} | {statistics.median(walls):.2f} s ({min(walls):.2f}–{max(walls):.2f}) | "
              f"{statistics.median(cpus):.2f} | {statistics.median(cpus) / gib:.2f} |")
    for peer in ("curl", "rclone"):
        ratios = [d[0] / p[0] for d, p in zip(results["dcflow"], results[peer])]
        print(f"\ndcflow / {peer} wall time per round: " + ", ".join(f"{x:.2f}" for x in ratios)
              + f" (median {statistics.median(ratios):.2f})")
    subprocess.run(["curl", "-sS", "--cacert", ca, "-u", ADMIN, "-X", "DELETE", "-o", "/dev/null",
                    *sum(([f"{door}{folder}/{n}"] for n in names), [])], check=False)


def parse_time(s):
    import datetime
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        s = f"{head}.{digits[:6]}{rest[len(digits):]}"
    return datetime.datetime.fromisoformat(s).timestamp()


def latency(args, dcflow, door, ca, capath, broker, topic, work):
    """Door's 201 → success record, with `dcflow run` on dCache's billing topic."""
    import csv
    folder = f"/public/bench-latency-{os.getpid()}-{int(time.time())}"
    token_file = work / "macaroon-latency"
    # The folder must exist for the macaroon request: the first upload creates it.
    body = work / "latency.bin"
    body.write_bytes(os.urandom(1 << 20))
    subprocess.run(["curl", "-sS", "-f", "-L", "--cacert", ca, "-u", ADMIN, "-o", "/dev/null",
                    "-T", str(body), f"{door}{folder}/warm-up.bin"], check=True)
    token_file.write_text(macaroon(door, ca, folder) + "\n")
    token_file.chmod(0o600)
    out = work / "out-latency"
    cfg = work / "latency.toml"
    cfg.write_text(f"""[kafka]
topic = "{topic}"
servers = ["{broker}"]
consumergroup = "bench-latency-{os.getpid()}-{int(time.time())}"
[dcache]
url = "{door}"
pool = "/"
folder = "{folder}"
maxdownloads = 4
retryseconds = 1
retrytimes = 5
[local]
token = "{token_file}"
capath = "{capath}"
downloadfolder = "{out}"
permissions = '2750'
failedtasksfile = "{work}/latency-failed.csv"
successfultaskfile = "{work}/latency-success.csv"
""")
    proc = subprocess.Popen([str(dcflow), "run", "--config", str(cfg)], stderr=subprocess.DEVNULL,
                            env={**os.environ, "DCFLOW_LOG": "warn"})
    try:
        committed = {}
        for i in range(args.latency_files):
            name = f"f{i:05d}.bin"
            subprocess.run(["curl", "-sS", "-f", "-L", "--cacert", ca, "-u", ADMIN, "-o", "/dev/null",
                            "-T", str(body), f"{door}{folder}/{name}"], check=True)
            committed[f"{folder}/{name}"] = time.time()
            time.sleep(args.latency_interval)
        deadline = time.monotonic() + 120
        rows = {}
        while time.monotonic() < deadline:
            path = work / "latency-success.csv"
            if path.exists():
                with open(path) as f:
                    rows = {r["billing_path"]: parse_time(r["time"]) for r in csv.DictReader(f)}
            if all(p in rows for p in committed):
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait()
    lat = sorted((rows[p] - t) * 1000 for p, t in committed.items() if p in rows)
    if len(lat) != len(committed):
        sys.exit(f"latency: {len(lat)} of {len(committed)} files recorded")
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]
    print(f"\n## latency: {len(lat)} × 1 MiB, one every {args.latency_interval} s, `dcflow run` on dCache's "
          f"billing topic (real dCache 12.0.1 door)\n")
    print(f"from the door's 201 to the success record: p50 {q(0.5):.0f} ms, p90 {q(0.9):.0f} ms, "
          f"p99 {q(0.99):.0f} ms, max {lat[-1]:.0f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small-files", type=int, default=300)
    p.add_argument("--small-parallel", type=int, default=16)
    p.add_argument("--large-files", type=int, default=8)
    p.add_argument("--large-mib", type=int, default=128)
    p.add_argument("--large-parallel", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--latency-files", type=int, default=100)
    p.add_argument("--latency-interval", type=float, default=0.2)
    p.add_argument("--cases", default="small,large,latency")
    p.add_argument("--wrap", metavar="COMMAND",
                   help="run each `dcflow replay` under COMMAND (its time and CPU then include the wrapper's), "
                        "e.g. \"strace -f -e trace=connect -o /tmp/connects\" with --rounds 1 to count connections")
    args = p.parse_args()
    door, ca, capath = env("DCFLOW_DCACHE_DOOR"), env("DCFLOW_DCACHE_CA"), env("DCFLOW_DCACHE_CAPATH")
    broker, topic = env("DCFLOW_KAFKA"), os.environ.get("DCFLOW_DCACHE_TOPIC", "billing")
    dcflow = build()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as w:
        work = Path(w)
        if "small" in args.cases:
            case("small", args, dcflow, door, ca, capath, broker, topic, work,
                 args.small_files, 16 << 10, args.small_parallel)
        if "large" in args.cases:
            case("large", args, dcflow, door, ca, capath, broker, topic, work,
                 args.large_files, args.large_mib << 20, args.large_parallel)
        if "latency" in args.cases:
            latency(args, dcflow, door, ca, capath, broker, topic, work)


if __name__ == "__main__":
    main()
