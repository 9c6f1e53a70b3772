#!/usr/bin/env bash
# Fuzzes every parser that reads hostile input (crates/fuzz) with libFuzzer through cargo-fuzz,
# each for SECONDS (default 600), and writes bench/results/fuzz-DATE.md with executions, corpus
# growth and crashes. New corpus entries land in crates/fuzz/corpus/<target>/ (CI replays them);
# crashes in crates/fuzz/fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh            # all targets, 10 minutes each
#   SECONDS_PER_TARGET=60 scripts/fuzz.sh frames
#
# cargo-fuzz needs nightly compiler features; this machine has only the stable toolchain, so
# RUSTC_BOOTSTRAP=1 enables them (the documented escape hatch for exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_TARGET:-600}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(unpack_layer archive_index registry_documents frames)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# The workspace links everything statically (.cargo/config.toml); sanitizers need dynamic
# linking, so the harness gets its own flags.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=""
date=$(date -u +%Y-%m-%d)
out=bench/results/fuzz-$date.md
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "# Fuzzing, $date"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); libFuzzer via cargo-fuzz $(cargo fuzz --version 2>/dev/null | awk '{print $2}'), address sanitizer, one job per target, ${secs} s each."
  echo
  echo "| target | executions | exec/s | corpus before | corpus after | crashes |"
  echo "|---|---|---|---|---|---|"
} > "$tmp/report"
cd crates/fuzz
for t in "${targets[@]}"; do
  before=$(ls corpus/$t | wc -l)
  log=$tmp/$t.log
  set +e
  cargo fuzz run --fuzz-dir fuzz "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 \
    -rss_limit_mb=4096 -max_len=1048576 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
  # Keep only the inputs that add coverage, so the replay in CI stays quick.
  cargo fuzz cmin --fuzz-dir fuzz "$t" "corpus/$t" >"$tmp/$t.cmin" 2>&1 || { tail -20 "$tmp/$t.cmin"; exit 1; }
  after=$(ls corpus/$t | wc -l)
  crashes=$(ls fuzz/artifacts/$t 2>/dev/null | wc -l)
  [ $rc -ne 0 ] && [ "$crashes" = 0 ] && { echo "cargo fuzz failed for $t:"; tail -30 "$log"; exit 1; }
  echo "| $t | ${execs:-?} | ${rate:-?} | $before | $after | $crashes |" >> "$tmp/report"
  echo "$t: ${execs:-?} executions, $crashes crashes"
done
cd ../..
# Rows of targets not run this time stay (one report per day, whichever targets ran).
if [ -f "$out" ]; then
  for t in unpack_layer archive_index registry_documents frames; do
    grep -q "^| $t |" "$tmp/report" || grep "^| $t |" "$out" >> "$tmp/report" || true
  done
fi
cp "$tmp/report" "$out"
echo "wrote $out"
