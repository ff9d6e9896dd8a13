#!/usr/bin/env python3
"""dcflow versus curl on the same files from the same dCache emulator.

Large files: for each case COUNTxMIB (default 8 × 256 MiB and 2 × 2 GiB), at 4 parallel
transfers: curl (the physical limit: same server, same parallelism, GET at the door following
the 302 to the pool), `dcflow replay` (checksums verified, every file fsynced, renamed into
place) and rclone are timed alternately, each run ending with `sync`, after removing the
previous run's output. Prints a markdown table with the median of each and the ratios.

Memory: peak RSS of `dcflow replay` with MEM_FILES transfers of MEM_SIZE MiB in flight at once
(default 64 × 1 GiB). The emulator holds them as hard links to one uploaded file (its
`X-Sim-Link` upload), so they take MEM_SIZE of its disk; dcflow's side is stopped (kill -9)
once its temporary files hold MEM_BUDGET GiB, since 64 GiB would not fit on most disks: the
figure is the peak with every transfer in flight, not at the end.

Usage: bench/large_files.py [--cases 8x256,2x2048] [--runs 3] [--mem-files 64] [--mem-size-mib 1024] [--mem-budget-gib 6]
Everything lives under --work (default /var/tmp/dcflow-bench) and is removed at the end
unless --keep is given.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def build():
    sh("cargo", "build", "--release", "--locked", "-p", "dcflow", "-p", "dcache-sim", cwd=ROOT)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release" / "dcflow", target / "release" / "dcache-sim"


def start_sim(sim_bin, state, extra=()):
    """The emulator as a process (`extra`: more `serve` arguments, e.g. --kafka); its info."""
    proc = subprocess.Popen([str(sim_bin), "serve", "--dir", str(state), *extra],
                            stdout=subprocess.DEVNULL)
    info_file = state / "sim.json"
    for _ in range(300):
        if info_file.exists():
            try:
                return proc, json.loads(info_file.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("the emulator did not start")


def upload(info, door_path, src):
    token = Path(info["token_file"]).read_text().strip()
    sh("curl", "-sS", "-f", "-o", "/dev/null", "--cacert", info["ca_pem"],
       "-H", f"Authorization: Bearer {token}", "-T", str(src), info["door_url"] + door_path)


def make_file(path, size_mib):
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))


def upload_set(info, src, name, count, size_mib):
    """Uploads `count` random files of `size_mib` to /bench/<name>/; returns the door paths."""
    paths = []
    for i in range(count):
        f = src / f"{name}-{i}"
        make_file(f, size_mib)
        door_path = f"/bench/{name}/file-{i}.dat"
        upload(info, door_path, f)
        paths.append(door_path)
        f.unlink()
    return paths


def link_set(info, src, name, count, size_mib):
    """One uploaded file of `size_mib` and `count - 1` hard links to it in the emulator."""
    first = upload_set(info, src, name, 1, size_mib)[0]
    token = Path(info["token_file"]).read_text().strip()
    paths = [first]
    for i in range(1, count):
        door_path = f"/bench/{name}/file-{i}.dat"
        sh("curl", "-sS", "-f", "-o", "/dev/null", "--cacert", info["ca_pem"], "-X", "PUT",
           "-H", f"Authorization: Bearer {token}", "-H", f"X-Sim-Link: {first}",
           "--data-binary", "@/dev/null", info["door_url"] + door_path)
        paths.append(door_path)
    return paths


def delete_set(info, paths):
    token = Path(info["token_file"]).read_text().strip()
    for door_path in paths:
        sh("curl", "-sS", "-f", "-o", "/dev/null", "--cacert", info["ca_pem"], "-X", "DELETE",
           "-H", f"Authorization: Bearer {token}", info["door_url"] + door_path)


def events_under(info, work, folder, name):
    """The emulator's billing messages so far about files under /bench/<folder>/, as a file."""
    lines = [l for l in Path(info["billing_file"]).read_text().splitlines()
             if f"/bench/{folder}/" in json.loads(l).get("billingPath", "")]
    out = work / f"{name}.jsonl"
    out.write_text("".join(l + "\n" for l in lines))
    return out


def sync():
    sh("sync")


def children_cpu():
    """User + system CPU seconds of every waited-for child so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# CPU seconds (user + system) of the last client run by run_curl / run_rclone / run_dcflow,
# taken before the final `sync` (whose flushing is the kernel's, not the client's).
LAST_CPU = {"seconds": 0.0}


def run_curl(info, paths, out, parallel):
    """`parallel` curl processes at once, the files dealt round-robin between them (one curl
    process runs all its transfers on one core, so `curl --parallel` would not be the limit
    of a 2-core machine). Each process follows the door's 302 to the pool."""
    token = Path(info["token_file"]).read_text().strip()
    groups = [list(range(i, len(paths), parallel)) for i in range(parallel)]
    cpu = children_cpu()
    t = time.monotonic()
    procs = []
    for group in groups:
        if not group:
            continue
        args = ["curl", "-sS", "-f", "-L", "--cacert", info["ca_pem"],
                "-H", f"Authorization: Bearer {token}"]
        for i in group:
            args += ["-o", str(out / f"f{i}"), info["door_url"] + paths[i]]
        procs.append(subprocess.Popen(args))
    for p in procs:
        if p.wait() != 0:
            sys.exit("curl failed")
    last_byte = time.monotonic() - t
    LAST_CPU["seconds"] = children_cpu() - cpu
    sync()
    return time.monotonic() - t, last_byte


def run_rclone(info, folder, out, parallel):
    """`rclone copy` with the WebDAV backend (PROPFIND, then GET following the 302), `parallel`
    transfers, ending with `sync`; seconds."""
    token = Path(info["token_file"]).read_text().strip()
    env = {**os.environ,
           "RCLONE_CONFIG_DC_TYPE": "webdav",
           "RCLONE_CONFIG_DC_URL": info["door_url"],
           "RCLONE_CONFIG_DC_VENDOR": "other",
           "RCLONE_CONFIG_DC_BEARER_TOKEN": token}
    cpu = children_cpu()
    t = time.monotonic()
    proc = subprocess.run(["rclone", "copy", f"dc:{folder}", str(out), "--transfers", str(parallel),
                           "--checkers", str(parallel), "--ca-cert", info["ca_pem"],
                           "--no-check-dest", "--ignore-checksum", "-q",
                           # One stream per file: the emulator's pool ignores Range requests.
                           "--multi-thread-streams", "0"], env=env)
    if proc.returncode != 0:
        sys.exit("rclone failed")
    LAST_CPU["seconds"] = children_cpu() - cpu
    sync()
    return time.monotonic() - t


def write_config(info, work, download, parallel, name):
    cfg = work / f"{name}.toml"
    cfg.write_text(f"""[dcache]
url = "{info['door_url']}"
pool = "{info['root']}"
folder = "/bench"
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


def run_dcflow(dcflow, cfg, events):
    """Seconds for `dcflow replay`, including a final sync."""
    cpu = children_cpu()
    t = time.monotonic()
    proc = subprocess.run([str(dcflow), "replay", "--config", str(cfg), str(events)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          env={**os.environ, "DCFLOW_LOG": "warn"})
    LAST_CPU["seconds"] = children_cpu() - cpu
    sync()
    elapsed = time.monotonic() - t
    if proc.returncode != 0:
        sys.exit(f"dcflow replay failed ({proc.returncode}): {proc.stdout.decode()}")
    return elapsed


def peak_rss_in_flight(cmd, env, download, budget_bytes):
    """Peak RSS (KiB) of one child, polled in /proc (ru_maxrss is a maximum over the process
    tree and would keep earlier children's peaks), until it ends or its temporary files hold
    `budget_bytes` (then kill -9). Also: the most temporary files seen at once, the bytes
    they held, and the seconds it ran."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = most_parts = held = 0
    started = time.monotonic()
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        parts = [e for e in download.rglob("*.dcflow-part")] if download.exists() else []
        sizes = []
        for part in parts:
            try:
                sizes.append(part.stat().st_size)
            except FileNotFoundError:
                pass
        most_parts = max(most_parts, len(sizes))
        held = max(held, sum(sizes))
        if held >= budget_bytes:
            proc.kill()
            proc.wait()
            return peak, most_parts, held, time.monotonic() - started
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"{cmd} failed with {proc.returncode}")
    return peak, most_parts, held, time.monotonic() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8x256,2x2048",
                    help="comma-separated COUNTxMIB sets of large files")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem-files", type=int, default=64)
    ap.add_argument("--mem-size-mib", type=int, default=1024)
    ap.add_argument("--mem-budget-gib", type=float, default=6.0,
                    help="stop dcflow once its temporary files hold this much")
    ap.add_argument("--work", default="/var/tmp/dcflow-bench")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--dcflow", metavar="BINARY",
                    help="measure this dcflow binary (e.g. an older build, for an A/B) instead of the one built here")
    a = ap.parse_args()

    dcflow, sim_bin = build()
    if a.dcflow:
        dcflow = Path(a.dcflow).resolve()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim, info = start_sim(sim_bin, work / "sim")
    cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",") if c]
    results = []  # (count, mib, curl times, curl last-byte times, dcflow times, rclone times)
    cpu_results = []  # (count, mib, {client: CPU seconds per run})
    have_rclone = shutil.which("rclone") is not None
    try:
        src = work / "src"
        src.mkdir()
        for k, (count, mib) in enumerate(cases):
            name = f"large-{k}"
            paths = upload_set(info, src, name, count, mib)
            events = events_under(info, work, name, name)
            curl_times, curl_last_byte, dcflow_times, rclone_times = [], [], [], []
            cpu = {"curl": [], "dcflow": [], "rclone": []}
            for run in range(a.runs):
                out = work / "curl-out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                total, last_byte = run_curl(info, paths, out, a.parallel)
                curl_times.append(total)
                curl_last_byte.append(last_byte)
                cpu["curl"].append(LAST_CPU["seconds"])
                shutil.rmtree(out)
                download = work / "dcflow-out"
                shutil.rmtree(download, ignore_errors=True)
                cfg = write_config(info, work, download, a.parallel, f"{name}-{run}")
                dcflow_times.append(run_dcflow(dcflow, cfg, events))
                cpu["dcflow"].append(LAST_CPU["seconds"])
                shutil.rmtree(download)
                if have_rclone:
                    out = work / "rclone-out"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    rclone_times.append(run_rclone(info, f"/bench/{name}", out, a.parallel))
                    cpu["rclone"].append(LAST_CPU["seconds"])
                    shutil.rmtree(out)
                print(f"{count} x {mib} MiB run {run + 1}: curl {curl_times[-1]:.2f} s, "
                      f"dcflow {dcflow_times[-1]:.2f} s"
                      + (f", rclone {rclone_times[-1]:.2f} s" if rclone_times else ""),
                      file=sys.stderr)
            results.append((count, mib, curl_times, curl_last_byte, dcflow_times, rclone_times))
            cpu_results.append((count, mib, cpu))
            delete_set(info, paths)  # the emulator's disk is needed for the next case

        # Memory: MEM_FILES transfers of MEM_SIZE in flight at once.
        link_set(info, src, "mem", a.mem_files, a.mem_size_mib)
        mem_events = events_under(info, work, "mem", "mem")
        download = work / "mem-out"
        cfg = write_config(info, work, download, a.mem_files, "mem")
        rss_kib, most_parts, held, secs = peak_rss_in_flight(
            [str(dcflow), "replay", "--config", str(cfg), str(mem_events)],
            {**os.environ, "DCFLOW_LOG": "warn"}, download, int(a.mem_budget_gib * (1 << 30)))
        shutil.rmtree(download)
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=10)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                      capture_output=True, text=True).stdout.strip():
        commit += "-dirty"
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print(f"\n### copy benchmark — {datetime.date.today()} — commit {commit}")
    print(f"machine: {os.cpu_count()} cores, {cpu}; server: dcache-sim (TLS 1.3 door + pool) on 127.0.0.1\n")
    print("| case | curl (limit) | dcflow | dcflow / curl |")
    print("|---|---|---|---|")
    for count, mib, curl_times, curl_last_byte, dcflow_times, rclone_times in results:
        c, d = statistics.median(curl_times), statistics.median(dcflow_times)
        total_mib = count * mib
        size = f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"
        print(f"| {count} × {size}, {a.parallel} parallel, median of {a.runs}, incl. final sync "
              f"| {c:.2f} s ({total_mib * 8.388608 / c:.0f} Mbps) | {d:.2f} s ({total_mib * 8.388608 / d:.0f} Mbps) | **{d / c:.3f}** |")
        lb = statistics.median(curl_last_byte)
        print(f"| same, curl to its last byte (before `sync`: its data still in the page cache) "
              f"| {lb:.2f} s ({total_mib * 8.388608 / lb:.0f} Mbps) | {d:.2f} s (fsynced) | {d / lb:.3f} |")
        if rclone_times:
            r = statistics.median(rclone_times)
            print(f"| same, rclone copy (WebDAV, --transfers {a.parallel}), incl. final sync "
                  f"| {r:.2f} s ({total_mib * 8.388608 / r:.0f} Mbps) | {d:.2f} s | {d / r:.3f} (dcflow / rclone) |")
    print("\nCPU seconds per GiB copied (user + system of the client's processes, median; taken "
          "before the final `sync`: curl's and rclone's writeback is the kernel's flusher and that "
          "`sync`, not counted, while dcflow's own fsyncs are in its system time):\n")
    print("| case | curl | dcflow | rclone | dcflow / curl |")
    print("|---|---|---|---|---|")
    for count, mib, cpu in cpu_results:
        gib = count * mib / 1024
        per = {k: statistics.median(v) / gib for k, v in cpu.items() if v}
        rc = f"{per['rclone']:.2f}" if "rclone" in per else "—"
        print(f"| {count} × {mib} MiB | {per['curl']:.2f} | {per['dcflow']:.2f} | {rc} "
              f"| {per['dcflow'] / per['curl']:.2f} |")
    # Issue 19's measure with its spread: dcflow's time over curl's in the same round, and
    # each client's CPU per GiB round by round.
    for count, mib, curl_times, _, dcflow_times, _ in results:
        r = [d / c for d, c in zip(dcflow_times, curl_times)]
        print(f"\n{count} × {mib} MiB, dcflow's time / curl's, round by round: "
              f"{', '.join(f'{x:.2f}' for x in r)} "
              f"(min {min(r):.2f}, median {statistics.median(r):.2f}, max {max(r):.2f})")
    for count, mib, cpu in cpu_results:
        gib = count * mib / 1024
        print(f"\n{count} × {mib} MiB, CPU s/GiB round by round: "
              + "; ".join(f"{k} {', '.join(f'{v / gib:.2f}' for v in vs)}" for k, vs in cpu.items() if vs))
    for count, mib, curl_times, _, dcflow_times, rclone_times in results:
        print(f"\n({count} × {mib} MiB runs: curl {', '.join(f'{t:.2f}' for t in curl_times)} s; "
              f"dcflow {', '.join(f'{t:.2f}' for t in dcflow_times)} s"
              + (f"; rclone {', '.join(f'{t:.2f}' for t in rclone_times)} s" if rclone_times else "") + ")")
    print(f"\npeak RSS of dcflow with {a.mem_files} transfers of {a.mem_size_mib} MiB in flight: "
          f"**{rss_kib / 1024:.1f} MiB** (at most {most_parts} temporary files at once, "
          f"{held / (1 << 30):.1f} GiB received in {secs:.1f} s"
          + (", then stopped" if held >= a.mem_budget_gib * (1 << 30) else ", all done") + ")")


if __name__ == "__main__":
    main()
