#!/usr/bin/env bash
# Fuzzes event decoding (with the pre-filter's soundness) and configuration parsing, each
# target for SECONDS (default 60), seeded with fixtures/billing, fixtures/bad-input and
# examples. Installs cargo-fuzz if needed; runs without a sanitizer on the stable toolchain.
# Any crash is copied to fixtures/bad-input/fuzz/<target>/, where the unit tests of
# dcflow-core replay it from then on; exit 1 if there was one.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1   # cargo-fuzz passes flags that stable accepts only this way
status=0
for target in billing_message config; do
  case "$target" in
    billing_message) seeds=(../fixtures/billing ../fixtures/bad-input) ;;
    config) seeds=(../examples) ;;
  esac
  mkdir -p "fuzz/corpus/$target"
  echo "== fuzzing $target for $secs s"
  if ! (cd fuzz && cargo fuzz run --sanitizer none "$target" "corpus/$target" "${seeds[@]}" \
          -- -max_total_time="$secs" -timeout=10 -max_len=65536); then
    status=1
  fi
  for crash in fuzz/artifacts/"$target"/*; do
    [ -e "$crash" ] || continue
    mkdir -p "fixtures/bad-input/fuzz/$target"
    cp "$crash" "fixtures/bad-input/fuzz/$target/"
    echo "crash kept as fixtures/bad-input/fuzz/$target/$(basename "$crash")"
  done
done
exit "$status"
