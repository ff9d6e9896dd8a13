#!/usr/bin/env bash
# Every benchmark, one after the other, as one markdown report on stdout (also kept in
# bench/results/<date>-<commit>.md). Needs curl, rclone and kcat (Debian packages), Java 17
# and Maven for the Kafka broker (started by events.py and latency.py unless DCFLOW_KAFKA names one).
# Takes about 35 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --short HEAD)
mkdir -p bench/results
out="bench/results/$(date +%F)-$commit.md"
{
  echo "# dcflow benchmarks — $(date +%F) — commit $commit"
  echo
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM; $(uname -sr)"
  echo
  echo "## Checksum"
  echo
  cargo run -q --release --locked -p dcflow-transfer --example checksum_speed
  echo
  echo "## Large files"
  python3 bench/large_files.py --runs 5
  echo
  echo "## Small files"
  python3 bench/small_files.py --runs 5
  echo
  echo "## Sync"
  python3 bench/sync.py
  echo
  echo "## Event rate"
  python3 bench/events.py --runs 5
  echo
  echo "## Latency"
  python3 bench/latency.py
} | tee "$out"
# The ratios issue 19 sets goals for, gathered from the report above (each with its spread
# over the rounds): event path (run, dispatch) against kcat -C -c, small files against curl,
# large files against curl (time and CPU seconds per GiB); beside them, the floors under those
# goals on this machine: kcat in a consumer group against kcat -C -c, and the disk work alone
# and a CPU bound against curl's time.
{
  echo
  echo "## Summary: the ratios with goals (issue 19)"
  echo
  echo "goals: run ≥ 0.8 and dispatch ≥ 0.9 × kcat -C -c's rate; small files ≤ 0.8 × curl's time in"
  echo "every round; large files: keep ~0.75 × curl, CPU s/GiB reported. The kcat -G line and the"
  echo "small files' disk-alone and CPU-bound lines are the floors under the goals on this machine."
  echo
  grep -E "round by round|\*\*[0-9.]+\*\* \|$|^\| [0-9]+ × [0-9]+ MiB \|" "$out" | sed 's/^/    /'
} | tee -a "$out"
echo "report: $out" >&2
