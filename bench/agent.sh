#!/usr/bin/env bash
# The slim agent against the agent it replaces: boot to agent ready (`run --json` boot_time,
# VMM start to the agent's hello reply) with each CLI+agent pair, alternating, same kernel,
# image, --mem and acceleration; then the smallest --mem that still boots Python and runs
# print(42), stepping down from --mem-from (needs a CLI whose --mem check lets it through).
#
# usage: bench/agent.sh [-n 7] [--accel tcg] [--mem 512] BEFORE_CLI AFTER_CLI
#        bench/agent.sh --floor [--mem-from 160] [--mem-step 4] CLI
# Each CLI ships the agent it finds (beside it, or in its target dir's `agent` profile dir).
# INFRA_OPERATOR_HOME selects the kernel and images (default: the user's).
set -euo pipefail
N=7; ACCEL=tcg; MEM=512; FLOOR=; FROM=160; STEP=4
while [ $# -gt 0 ]; do
  case $1 in
    -n) N=$2; shift 2;; --accel) ACCEL=$2; shift 2;; --mem) MEM=$2; shift 2;;
    --floor) FLOOR=1; shift;; --mem-from) FROM=$2; shift 2;; --mem-step) STEP=$2; shift 2;;
    -*) echo "unknown flag $1" >&2; exit 2;;
    *) break;;
  esac
done
if [ -n "$FLOOR" ]; then
  CLI=$1; m=$FROM
  while [ "$m" -gt 0 ]; do
    out=$("$CLI" run -l python -c 'print(42)' --json --accel "$ACCEL" --mem "$m" 2>&1 || true)
    if python3 -c "import json,sys; d=json.loads(sys.argv[1]); assert d['status']=='success' and d['stdout']=='42\n'" "$out" 2>/dev/null; then
      echo "--mem $m: ok"
    else
      echo "--mem $m: FAILED: $(echo "$out" | tr '\n' ' ' | cut -c1-300)"; break
    fi
    m=$((m - STEP))
  done
  exit 0
fi
BEFORE=$1; AFTER=$2
CSV=$(mktemp)
echo "agent,run,boot_s,total_s" > "$CSV"
one() {  # one NAME CLI RUN
  "$2" run -l python -c 'print(1)' --json --accel "$ACCEL" --mem "$MEM" |
    python3 -c "import json,sys; d=json.load(sys.stdin); assert d['status']=='success', d; print('$1,$3,%.3f,%.3f' % (d['boot_time'], d['total_time']))" >> "$CSV"
}
one before "$BEFORE" warmup; one after "$AFTER" warmup
sed -i '/warmup/d' "$CSV"
for i in $(seq 1 "$N"); do
  if [ $((i % 2)) -eq 1 ]; then one before "$BEFORE" "$i"; one after "$AFTER" "$i"
  else one after "$AFTER" "$i"; one before "$BEFORE" "$i"; fi
done
cat "$CSV"
python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for m in ("before", "after"):
    b = sorted(float(r["boot_s"]) for r in rows if r["agent"] == m)
    t = sorted(float(r["total_s"]) for r in rows if r["agent"] == m)
    print(f"{m}: boot median {statistics.median(b):.3f} s (min {b[0]:.3f}, max {b[-1]:.3f}), total median {statistics.median(t):.3f} s, n={len(b)}")
PY
rm -f "$CSV"
