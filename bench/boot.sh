#!/usr/bin/env bash
# Boot to agent ready, same kernel, image, memory and acceleration, alternating:
#   pid1    — our initramfs stage, then the agent as PID 1 (what `run` does)
#   systemd — the same initramfs stage, then systemd as init, which starts the agent as the
#             infra.operator.service unit (the seeds' boot path)
# The image is a Debian python image with systemd installed (built once). `boot_time` is
# measured by `run --json`: from VMM start to the agent's hello reply.
#
# usage: sudo bench/boot.sh [-n 5] [--accel tcg] [--bin infra.operator]
set -euo pipefail
N=5; ACCEL=tcg; BIN=infra.operator
while [ $# -gt 0 ]; do
  case $1 in
    -n) N=$2; shift 2;; --accel) ACCEL=$2; shift 2;; --bin) BIN=$2; shift 2;;
    *) echo "unknown flag $1" >&2; exit 2;;
  esac
done
cd "$(dirname "$0")"
IMAGE=${INFRA_OPERATOR_HOME:-/srv/firecracker}/images/rootfs-python-systemd.ext4
if [ ! -f "$IMAGE" ]; then
  "$BIN" rootfs create --lang python --name python-systemd --packages systemd,systemd-sysv >&2
fi
DATE=$(date -u +%Y-%m-%d)
CSV=results/boot-$DATE.csv
echo "mode,run,boot_s,total_s" > "$CSV"
one() {  # one MODE RUN
  local extra=()
  [ "$1" = systemd ] && extra=(--kernel-args infra.init=/lib/systemd/systemd)
  "$BIN" run -l python -c pass --json --accel "$ACCEL" --rootfs "$IMAGE" "${extra[@]}" |
    python3 -c "import json,sys; d=json.load(sys.stdin); assert d['status']=='success', d; print('$1,$2,%.3f,%.3f' % (d['boot_time'], d['total_time']))" >> "$CSV"
}
one pid1 warmup; one systemd warmup
sed -i '/warmup/d' "$CSV"
for i in $(seq 1 "$N"); do
  if [ $((i % 2)) -eq 1 ]; then one pid1 "$i"; one systemd "$i"; else one systemd "$i"; one pid1 "$i"; fi
done
python3 - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = {m: statistics.median(float(r["boot_s"]) for r in rows if r["mode"] == m) for m in ("pid1", "systemd")}
print(f"boot to agent ready, median of {len(rows)//2}: pid1 {med['pid1']:.2f} s, systemd {med['systemd']:.2f} s, "
      f"systemd/pid1 = {med['systemd']/med['pid1']:.2f}x")
PY
echo "raw: bench/$CSV"
