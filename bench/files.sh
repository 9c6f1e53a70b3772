#!/usr/bin/env bash
# Benchmark: our Files API server (`infra-operator api`, files provider `remote::s3`) against
# Llama Stack's files provider (PyPI `ogx`, the renamed llama-stack: `remote::s3`), side by
# side in one run, on the same single-node Garage (one bucket each), SQLite metadata for both,
# the same client code (bench/files.py) for both, server order alternating per repetition.
#
# Measurements (REPS times each, medians):
#   1. 1 GiB upload (curl -F file=@FILE, streamed from disk): MiB/s, the server's RSS growth
#      (VmRSS sampled every 50 ms: peak minus the value before) and its RSS at the end
#   2. 1 GiB download (curl -o /dev/null): MiB/s (sha256 checked once per server, untimed)
#   3. GET /v1/files?limit=100 with 1,000 files present: median and p99 of 200 (keep-alive)
#   4. 1,000 uploads of 1 KiB with 8 concurrent clients: uploads/s
#   5. GET /v1/files/{id} issued continuously by one client while a 1 GiB upload and then a
#      1 GiB download run: p99 and maximum latency
#   6. 500 uploads started at once (500 connections), then: every returned id retrievable, its
#      content's sha256 right, paging the list finds each exactly once
#
# ogx limits uploads to 100 MiB (ogx_api/common/upload_limits.py, no config key, no env var):
# this script patches that one constant in ogx's venv to 4 GiB (see OGX_LIMIT below).
#
# Runs as root or not; needs garage (scripts/install-deps.sh --tests), curl, Python 3.12 (pyenv) for
# ogx. Environment knobs:
#   REPS=3 SMALL_N=1000 SMALL_CONC=8 BURST_N=500 LIST_N=200
#   BIN=PATH          infra-operator binary (default: $CARGO_TARGET_DIR's release build)
#   SKIP_BUILD=1      do not run `cargo build --release -p infra-cli`
#   OGX_VENV=/var/tmp/ogx-venv            created with PY312 and `pip install ogx boto3` if missing
#   OGX_VERSION=      pin a version (default: whatever pip picks when installing)
#   CLIENT_VENV=/var/tmp/files-bench-client   the load generator's venv (httpx)
#   PY312=~/.pyenv/versions/3.12.1/bin/python3.12
#   SECTIONS=big,small,probe,burst
#   IDLE_TIMEOUT=300 IDLE_BUSY_PCT=10   wait for a quiet machine before each timed section
#   RESULTS=PATH      markdown output (default: bench/results/files-YYYY-MM-DD.md, + .csv)
#   KEEP=1            keep the work directory (/var/tmp/files-bench.*: data, logs, databases)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
REPS=${REPS:-3}
SMALL_N=${SMALL_N:-1000} SMALL_CONC=${SMALL_CONC:-8} BURST_N=${BURST_N:-500}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BIN=${BIN:-"$TARGET_DIR/x86_64-unknown-linux-gnu/release/infra-operator"}
PY312=${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}
OGX_VENV=${OGX_VENV:-/var/tmp/ogx-venv}
CLIENT_VENV=${CLIENT_VENV:-/var/tmp/files-bench-client}
SECTIONS=${SECTIONS:-big,small,probe,burst}
DATE=$(date +%F)
RESULTS=${RESULTS:-"$BENCH_DIR/results/files-$DATE.md"}
RAW="${RESULTS%.md}.csv"
export IDLE_TIMEOUT=${IDLE_TIMEOUT:-300} IDLE_BUSY_PCT=${IDLE_BUSY_PCT:-10} LIST_N=${LIST_N:-200}
STARTED=$(date -u '+%F %T UTC')
T0=$SECONDS

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

GARAGE=$(command -v garage || echo "$HOME/.cargo/bin/garage")
[[ -x $GARAGE ]] || die "garage not found: run scripts/install-deps.sh --tests"
command -v curl >/dev/null || die "curl not found"
[[ -x $PY312 ]] || die "Python 3.12 not found at $PY312 (ogx needs >= 3.12; set PY312=...)"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------------------------------------
# ogx in its own venv, with its upload limit raised.
if [[ ! -x $OGX_VENV/bin/ogx ]]; then
    log "installing ogx${OGX_VERSION:+==$OGX_VERSION} into $OGX_VENV"
    "$PY312" -m venv "$OGX_VENV"
    "$OGX_VENV/bin/pip" install -q "ogx${OGX_VERSION:+==$OGX_VERSION}" boto3 aiosqlite
fi
"$OGX_VENV/bin/python" -c 'import boto3, aiosqlite' 2>/dev/null || "$OGX_VENV/bin/pip" install -q boto3 aiosqlite
OGX_LIMIT=$("$OGX_VENV/bin/python" -c 'import ogx_api.common.upload_limits as u; print(u.__file__)')
# The 100 MiB default of create_router(max_upload_size_bytes=...) for /v1/files; ogx calls
# create_router(impl) without it and has no setting for it. 4 GiB here.
if grep -q '^DEFAULT_MAX_UPLOAD_SIZE_BYTES: int = 100 \* 1024 \* 1024$' "$OGX_LIMIT"; then
    log "raising ogx's upload limit (100 MiB -> 4 GiB) in $OGX_LIMIT"
    sed -i 's/^DEFAULT_MAX_UPLOAD_SIZE_BYTES: int = 100 \* 1024 \* 1024$/DEFAULT_MAX_UPLOAD_SIZE_BYTES: int = 4 * 1024 * 1024 * 1024  # files-bench: raised from 100 MiB/' "$OGX_LIMIT"
fi
[[ $("$OGX_VENV/bin/python" -c 'import ogx_api.common.upload_limits as u; print(u.DEFAULT_MAX_UPLOAD_SIZE_BYTES)') == 4294967296 ]] ||
    die "could not raise ogx's upload limit in $OGX_LIMIT (the file changed?)"

if [[ ! -x $CLIENT_VENV/bin/python ]] || ! "$CLIENT_VENV/bin/python" -c 'import httpx' 2>/dev/null; then
    log "creating the client venv $CLIENT_VENV (httpx)"
    "$PY312" -m venv "$CLIENT_VENV"
    "$CLIENT_VENV/bin/pip" install -q httpx
fi

if [[ -z ${SKIP_BUILD:-} ]]; then
    log "building infra-cli (release)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p infra-cli)
fi
[[ -x $BIN ]] || die "binary $BIN not found (set BIN=...)"

WORK=$(mktemp -d /var/tmp/files-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    set +e
    # SIGTERM, then SIGKILL after 10 s (uvicorn waits for in-flight requests without limit)
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for _ in $(seq 100); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
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
NO_COLOR=1 RUST_LOG=garage=warn "${G[@]}" server >>"$WORK/garage/garage.log" 2>&1 </dev/null &
PIDS+=($!)
for _ in $(seq 300); do "${G[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
NODE=$("${G[@]}" node id -q | cut -d@ -f1)
"${G[@]}" layout assign -z dc1 -c 100G "$NODE" >/dev/null
"${G[@]}" layout apply --version 1 >/dev/null
"${G[@]}" key create bench-key >/dev/null
KEY_ID=$("${G[@]}" key info --key-id bench-key)
SECRET=$("${G[@]}" key info --secret-key bench-key)
S3=http://127.0.0.1:$S3_PORT
for b in files-ours files-ogx; do
    "${G[@]}" bucket create $b >/dev/null
    "${G[@]}" bucket allow --read --write --owner $b --key bench-key >/dev/null
done

# ---------------------------------------------------------------------------------------------
# The two servers.
wait_http() { # URL PID NAME: up to 180 s (ogx imports a lot; the machine may be busy)
    for _ in $(seq 1800); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited: see $WORK/$3/log"
        sleep 0.1
    done
    die "$3 did not answer $1"
}
listener_pid() { ss -Hltnp "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }

OURS_PORT=$(free_port)
mkdir -p "$WORK/ours/home"
cat >"$WORK/ours/api.yaml" <<EOT
files:
  provider_type: remote::s3
  config:
    bucket_name: files-ours
    region: garage
    endpoint_url: $S3
    aws_access_key_id: $KEY_ID
    aws_secret_access_key: $SECRET
    max_file_size: 2147483648
    metadata_store: {type: sqlite, db_path: $WORK/ours/files.db}
EOT
INFRA_OPERATOR_HOME=$WORK/ours/home "$BIN" api --port "$OURS_PORT" --config "$WORK/ours/api.yaml" \
    >"$WORK/ours/log" 2>&1 </dev/null &
PIDS+=($!)
OURS_PID=$!
wait_http "http://127.0.0.1:$OURS_PORT/v1/files" "$OURS_PID" ours

OGX_PORT=$(free_port)
mkdir -p "$WORK/ogx"
cat >"$WORK/ogx/config.yaml" <<EOT
version: 2
distro_name: files-bench
apis:
- files
providers:
  files:
  - provider_id: s3-files
    provider_type: remote::s3
    config:
      bucket_name: files-ogx
      region: garage
      endpoint_url: $S3
      aws_access_key_id: $KEY_ID
      aws_secret_access_key: $SECRET
      auto_create_bucket: false
      metadata_store:
        table_name: s3_files_metadata
        backend: sql_default
storage:
  backends:
    kv_default:
      type: kv_sqlite
      db_path: $WORK/ogx/kvstore.db
    sql_default:
      type: sql_sqlite
      db_path: $WORK/ogx/sql_store.db
  stores:
    metadata:
      namespace: registry
      backend: kv_default
    inference:
      table_name: inference_store
      backend: sql_default
    conversations:
      table_name: openai_conversations
      backend: sql_default
registered_resources: {}
server:
  host: 127.0.0.1
  port: $OGX_PORT
EOT
(cd "$WORK/ogx" && exec env TMPDIR="$WORK/ogx" "$OGX_VENV/bin/ogx" run --insecure "$WORK/ogx/config.yaml") \
    >"$WORK/ogx/log" 2>&1 </dev/null &
PIDS+=($!)
OGX_PID=$!
wait_http "http://127.0.0.1:$OGX_PORT/v1/files" "$OGX_PID" ogx
# RSS is read from the process that listens (ogx with 1 worker serves in the process it starts).
OGX_RSS_PID=$(listener_pid "$OGX_PORT")
OURS_RSS_PID=$(listener_pid "$OURS_PORT")
[[ -n $OGX_RSS_PID && -n $OURS_RSS_PID ]] || die "cannot find the servers' PIDs"
log "ours on :$OURS_PORT (pid $OURS_RSS_PID), ogx on :$OGX_PORT (pid $OGX_RSS_PID), Garage on :$S3_PORT"

log "preparing 1 GiB of random data"
head -c 1G /dev/urandom >"$WORK/big.bin"

# ---------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$RESULTS")"
"$CLIENT_VENV/bin/python" "$BENCH_DIR/files.py" run \
    --server "ogx=http://127.0.0.1:$OGX_PORT=$OGX_RSS_PID" \
    --server "ours=http://127.0.0.1:$OURS_PORT=$OURS_RSS_PID" \
    --big "$WORK/big.bin" --raw "$RAW" --reps "$REPS" --sections "$SECTIONS" \
    --small-n "$SMALL_N" --small-conc "$SMALL_CONC" --burst-n "$BURST_N"

for p in ogx ours; do
    n=$(grep -ciE 'traceback|panic|error' "$WORK/$p/log" || true)
    ((n == 0)) || log "$p's log has $n error-looking lines: $WORK/$p/log"
done

# ---------------------------------------------------------------------------------------------
# Report.
log "writing $RESULTS"
export DATE REPS SMALL_N SMALL_CONC BURST_N STARTED
export ELAPSED="$(((SECONDS - T0) / 60)) min $(((SECONDS - T0) % 60)) s"
export M_CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -1) M_NPROC=$(nproc)
export M_MEM=$(free -g | awk '/Mem:/ {print $2}') M_KERNEL=$(uname -r)
export M_OS="Debian $(cat /etc/debian_version 2>/dev/null || echo '?')"
export V_GARAGE=$("$GARAGE" --version | cut -d' ' -f2) V_OURS=$(cd "$REPO" && git rev-parse --short HEAD)
export V_OGX=$("$OGX_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ogx"))')
export V_OGX_PY=$("$OGX_VENV/bin/python" -c 'import platform; print(platform.python_version())')
export V_UVICORN=$("$OGX_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("uvicorn"))')
export V_BOTO3=$("$OGX_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("boto3"))')
export V_HTTPX=$("$CLIENT_VENV/bin/python" -c 'import httpx; print(httpx.__version__)')
"$CLIENT_VENV/bin/python" "$BENCH_DIR/files.py" report --raw "$RAW" --out "$RESULTS" \
    --notes "${NOTES:-${RESULTS%.md}.notes.md}"
cat "$RESULTS"
