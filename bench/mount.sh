#!/usr/bin/env bash
# infra.operator mount vs s3fs-fuse (Debian's s3fs) on one local Garage, one run each:
# sequential write and read of SIZE_MIB (default 1024), `ls -l` of a directory of N_LIST
# objects (default 10000), N_SMALL small-file creates (default 1000), `cp -r` of a source tree
# into the mount and `du -s` of it; peak RSS of each mount process. Prints a Markdown table.
#
#   sudo bench/mount.sh [path/to/infra-operator] > bench/results/mount-DATE.md
#
# Needs root, garage (scripts/install-deps.sh --tests), s3fs, python3 with botocore (aws-cli).
set -euo pipefail
BIN=${1:-target/release/infra-operator}
SIZE_MIB=${SIZE_MIB:-1024}
N_LIST=${N_LIST:-10000}
N_SMALL=${N_SMALL:-1000}
REPO=$(cd "$(dirname "$0")/.." && pwd)
GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
W=$(mktemp -d /tmp/mount-bench.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
cleanup() {
  for m in "$W/ours" "$W/s3fs"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  [ -f "$W/garage.pid" ] && kill "$(cat "$W/garage.pid")" 2>/dev/null || true
  sleep 1
  rm -rf "$W"
}
trap cleanup EXIT
log() { echo "$*" >&2; }

# --- Garage -----------------------------------------------------------------------------
mkdir -p "$W/meta" "$W/data" "$W/ours" "$W/s3fs" "$W/cache" "$W/tree-src"
# The tree copied: this repository's tracked crates/ (no build output), unless TREE is given.
if [ -z "${TREE:-}" ]; then
  git -C "$REPO" archive HEAD crates | tar -x -C "$W/tree-src"
  TREE=$W/tree-src/crates
fi
cat > "$W/garage.toml" <<EOF
metadata_dir = "$W/meta"
data_dir = "$W/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((PORT + 1))"
rpc_public_addr = "127.0.0.1:$((PORT + 1))"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$PORT"
root_domain = ".s3.garage.localhost"
EOF
G() { "$GARAGE" -c "$W/garage.toml" "$@"; }
"$GARAGE" -c "$W/garage.toml" server > "$W/garage.log" 2>&1 &
echo $! > "$W/garage.pid"
for _ in $(seq 100); do G status >/dev/null 2>&1 && break; sleep 0.2; done
G layout assign -z dc1 -c 20G "$(G node id -q | cut -d@ -f1)" >/dev/null
G layout apply --version 1 >/dev/null
G key create bench >/dev/null
KEY=$(G key info bench 2>/dev/null | awk '/Key ID:/ {print $3}')
SECRET=$(G key info bench --show-secret 2>/dev/null | awk '/Secret key:/ {print $3}')
for b in ours s3fs; do
  G bucket create "bench-$b" >/dev/null
  G bucket allow --read --write --owner "bench-$b" --key bench >/dev/null
done
export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=garage
ENDPOINT=http://127.0.0.1:$PORT
echo "$KEY:$SECRET" > "$W/passwd"; chmod 600 "$W/passwd"
for _ in $(seq 100); do
  python3 - "$ENDPOINT" <<'EOF' 2>/dev/null && break
import sys, botocore.session
s = botocore.session.get_session().create_client("s3", endpoint_url=sys.argv[1], region_name="garage")
s.list_objects_v2(Bucket="bench-ours", MaxKeys=1)
EOF
  sleep 0.3
done

mount_ours() {
  "$BIN" mount s3://bench-ours "$W/ours" -o "url=$ENDPOINT,region=garage,cache=$W/cache"
}
mount_s3fs() {
  s3fs bench-s3fs "$W/s3fs" -o "passwd_file=$W/passwd,url=$ENDPOINT,use_path_request_style,endpoint=garage"
  for _ in $(seq 100); do grep -q " $W/s3fs fuse.s3fs" /proc/mounts && break; sleep 0.1; done
}
remount() { umount "$W/$1"; "mount_$1"; }
pid_of() {
  if [ "$1" = ours ]; then pgrep -f "mount s3://bench-ours" | head -1
  else pgrep -f "s3fs bench-s3fs" | head -1; fi
}
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

declare -A R
# --- data -----------------------------------------------------------------------------
log "preparing ${SIZE_MIB} MiB of random data and $N_LIST objects per bucket"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/src.bin"
python3 - "$ENDPOINT" "$N_LIST" <<'EOF'
import sys, botocore.session
from concurrent.futures import ThreadPoolExecutor
ep, n = sys.argv[1], int(sys.argv[2])
s = botocore.session.get_session().create_client(
    "s3", endpoint_url=ep, region_name="garage",
    config=botocore.config.Config(max_pool_connections=64))
def put(a):
    b, i = a
    s.put_object(Bucket=b, Key=f"list/o{i:05d}", Body=b"x" * (i % 100))
with ThreadPoolExecutor(64) as ex:
    list(ex.map(put, [(b, i) for b in ("bench-ours", "bench-s3fs") for i in range(n)]))
EOF
# The server's own ceiling on this host: the same 1 GiB up and down with s5cmd (parallel
# multipart upload, parallel ranged download), no file system in between.
if command -v s5cmd >/dev/null; then
  log "s5cmd: the server's ceiling"
  S5=(s5cmd --endpoint-url "$ENDPOINT")
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); "${S5[@]}" cp "$W/src.bin" s3://bench-ours/raw.bin >/dev/null; t1=$(now)
  R[s5,write]=$(secs "$t0" "$t1")
  t0=$(now); "${S5[@]}" cat s3://bench-ours/raw.bin > /dev/null; t1=$(now)
  R[s5,read]=$(secs "$t0" "$t1")
  "${S5[@]}" rm s3://bench-ours/raw.bin >/dev/null
fi

mount_ours
mount_s3fs

for fs in ours s3fs; do
  M=$W/$fs
  log "[$fs] sequential write"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); dd if="$W/src.bin" of="$M/big.bin" bs=1M conv=fsync status=none; t1=$(now)
  R[$fs,write]=$(secs "$t0" "$t1")
  remount "$fs"
  log "[$fs] sequential read"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now); dd if="$M/big.bin" of=/dev/null bs=1M status=none; t1=$(now)
  R[$fs,read]=$(secs "$t0" "$t1")
  cmp "$W/src.bin" "$M/big.bin" || { log "[$fs] read back differs"; exit 1; }
  remount "$fs"
  log "[$fs] ls -l of $N_LIST objects"
  t0=$(now); n=$(ls -l "$M/list" | grep -c '^-'); t1=$(now)
  [ "$n" -eq "$N_LIST" ] || { log "[$fs] ls -l listed $n of $N_LIST"; exit 1; }
  R[$fs,ls]=$(secs "$t0" "$t1")
  log "[$fs] $N_SMALL small creates"
  mkdir "$M/small"
  t0=$(now); for i in $(seq "$N_SMALL"); do echo "$i" > "$M/small/f$i"; done; t1=$(now)
  R[$fs,small]=$(secs "$t0" "$t1")
  log "[$fs] cp -r and du -s"
  t0=$(now); cp -r "$TREE" "$M/tree"; t1=$(now)
  R[$fs,cp]=$(secs "$t0" "$t1")
  remount "$fs"
  t0=$(now); du -s "$M/tree" >/dev/null; t1=$(now)
  R[$fs,du]=$(secs "$t0" "$t1")
  # Peak RSS of the process serving the last remount's work, and of one more big read.
  dd if="$M/big.bin" of=/dev/null bs=1M status=none
  pid=$(pid_of "$fs")
  R[$fs,rss]=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$pid/status")
done

files=$(find "$TREE" -type f | wc -l)
tree_mib=$(du -sm "$TREE" | cut -f1)
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
echo "| test | infra.operator mount (s) | s3fs 1.90 (s) | speed-up |"
echo "|---|---|---|---|"
echo "| sequential write ${SIZE_MIB} MiB (dd conv=fsync) | ${R[ours,write]} | ${R[s3fs,write]} | $(ratio "${R[s3fs,write]}" "${R[ours,write]}") |"
echo "| sequential read ${SIZE_MIB} MiB (dd, cold) | ${R[ours,read]} | ${R[s3fs,read]} | $(ratio "${R[s3fs,read]}" "${R[ours,read]}") |"
echo "| ls -l of $N_LIST objects | ${R[ours,ls]} | ${R[s3fs,ls]} | $(ratio "${R[s3fs,ls]}" "${R[ours,ls]}") |"
echo "| $N_SMALL small-file creates | ${R[ours,small]} | ${R[s3fs,small]} | $(ratio "${R[s3fs,small]}" "${R[ours,small]}") |"
echo "| cp -r of a source tree ($files files, $tree_mib MiB) | ${R[ours,cp]} | ${R[s3fs,cp]} | $(ratio "${R[s3fs,cp]}" "${R[ours,cp]}") |"
echo "| du -s of that tree (after remount) | ${R[ours,du]} | ${R[s3fs,du]} | $(ratio "${R[s3fs,du]}" "${R[ours,du]}") |"
echo "| peak RSS of the mount process (MiB) | ${R[ours,rss]} | ${R[s3fs,rss]} | |"
if [ -n "${R[s5,write]:-}" ]; then
  echo
  echo "The server's ceiling on this host, with no file system in between: s5cmd $(s5cmd version 2>/dev/null | head -1) uploads the same ${SIZE_MIB} MiB (cp) in ${R[s5,write]} s and downloads it (cat to /dev/null) in ${R[s5,read]} s."
fi
