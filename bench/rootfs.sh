#!/usr/bin/env bash
# Benchmark: `infra-operator rootfs from-docker` against the floor (download + tar -x + mke2fs -d)
# and against the seed's path (download + tar -x + zero-filled image + mkfs + loop mount + cp -a),
# on a ~250 MB and a ~600 MB image served by a local docker-registry on 127.0.0.1.
#
# Runs as root. Idempotent: the Debian trees and OCI images are built once and cached under
# bench/results/tmp/ (git-ignored); every run starts its own registry on a free port and removes
# its own work files. All benchmark traffic goes to 127.0.0.1; only the one-time image
# preparation (debootstrap, apt-get in the chroot) talks to the host's Debian mirror.
#
# Environment knobs:
#   REPS=3            timed repetitions per tool and image
#   IMAGES="small large"
#   SKIP_BUILD=1      do not run `cargo build --release -p infra-cli` (use the existing binary)
#   BIN=PATH          binary to benchmark (default: target/x86_64-unknown-linux-gnu/release/infra-operator)
#   PREPARE_ONLY=1    build and push the images, print their sizes, stop
#   IDLE_TIMEOUT=300 IDLE_BUSY_PCT=10   wait for a quiet machine before each timed run
#   RESULTS=PATH      markdown output (default: bench/results/rootfs-YYYY-MM-DD.md)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
CACHE="$BENCH_DIR/results/tmp"
REPS=${REPS:-3}
IMAGES=${IMAGES:-"small large"}
BIN=${BIN:-"$REPO/target/x86_64-unknown-linux-gnu/release/infra-operator"}
DATE=$(date +%F)
RESULTS=${RESULTS:-"$BENCH_DIR/results/rootfs-$DATE.md"}
RAW="${RESULTS%.md}.csv"

# Package sets. The small image is minbase + Python (~250 MB); the large one adds a C/C++
# toolchain and Python headers (~600 MB). Each step becomes one OCI layer.
SMALL_LAYER_PKGS=("python3 python3-pip python3-venv" "python3-numpy")
LARGE_LAYER_PKGS=("gcc g++ make perl libpython3-dev")

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (mount, chroot, drop_caches, and the tool itself need it)"

# ---------------------------------------------------------------------------------------------
# Cleanup: everything this run starts or mounts is undone on any exit.
REG_PID=""
MOUNTS=()
RUN_DIR=""
cleanup() {
    local rc=$?
    set +e
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        mountpoint -q "${MOUNTS[i]}" && umount -l "${MOUNTS[i]}"
    done
    if [[ -n $REG_PID ]] && kill -0 "$REG_PID" 2>/dev/null; then
        kill "$REG_PID"
        wait "$REG_PID" 2>/dev/null
    fi
    [[ -n $RUN_DIR && -d $RUN_DIR ]] && rm -rf --one-file-system "$RUN_DIR"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# 1. Host packages (install only what is missing).
ensure_packages() {
    local missing=()
    for p in docker-registry skopeo debootstrap e2fsprogs umoci curl jq coreutils tar gzip; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
            || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
    fi
}
ensure_packages

mkdir -p "$CACHE"
RUN_DIR=$(mktemp -d "$CACHE/run.XXXXXX")

# ---------------------------------------------------------------------------------------------
# The binary under test.
if [[ ${SKIP_BUILD:-0} != 1 && ${PREPARE_ONLY:-0} != 1 ]]; then
    log "cargo build --release -p infra-cli"
    (cd "$REPO" && cargo build --release -p infra-cli) >&2
fi
[[ -x $BIN || ${PREPARE_ONLY:-0} == 1 ]] || die "binary not found: $BIN (build with: cargo build --release -p infra-cli)"

# ---------------------------------------------------------------------------------------------
# 2. Test images (built once, cached).
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
OCI="$CACHE/oci"
BUNDLE="$CACHE/bundle"

has_tag() { [[ -d $OCI ]] && umoci ls --layout "$OCI" 2>/dev/null | grep -qx "$1"; }
# the cached images are valid only for the package lists they were made from
SPEC=$(printf '%s\n' "${SMALL_LAYER_PKGS[@]}" -- "${LARGE_LAYER_PKGS[@]}")

chroot_install() { # ROOT PKGS...
    local root=$1
    shift
    for m in proc dev sys; do
        mkdir -p "$root/$m"
        case $m in
        proc) mount -t proc proc "$root/proc" ;;
        dev) mount --bind /dev "$root/dev" ;;
        sys) mount -t sysfs sys "$root/sys" ;;
        esac
        MOUNTS+=("$root/$m")
    done
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    local rc=0
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -ec 'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null && apt-get clean' \
        sh "$@" >&2 || rc=$?
    for m in sys dev proc; do
        umount "$root/$m"
        unset 'MOUNTS[${#MOUNTS[@]}-1]'
    done
    rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d" "$root"/var/cache/apt/*.bin
    : >"$root/etc/resolv.conf"
    return $rc
}

repack() { # TAG
    umoci repack --refresh-bundle --image "$OCI:$1" "$BUNDLE" >&2
}

prepare_images() {
    if has_tag small && has_tag large && [[ $(cat "$OCI/.bench-spec" 2>/dev/null) == "$SPEC" ]]; then
        log "test images cached in $OCI"
        return
    fi
    rm -rf "$OCI" "$BUNDLE" "$CACHE/base.partial"
    if [[ ! -f $CACHE/base/.bench-done ]]; then
        log "debootstrap bookworm minbase from $MIRROR"
        rm -rf "$CACHE/base"
        debootstrap --variant=minbase bookworm "$CACHE/base.partial" "$MIRROR" >&2
        rm -rf "$CACHE/base.partial"/var/lib/apt/lists/* "$CACHE/base.partial"/var/cache/apt/archives/*.deb
        mv "$CACHE/base.partial" "$CACHE/base"
        touch "$CACHE/base/.bench-done"
    fi
    umoci init --layout "$OCI"
    umoci new --image "$OCI:empty"
    umoci unpack --image "$OCI:empty" "$BUNDLE" >&2
    log "layer 1: minbase"
    cp -a "$CACHE/base/." "$BUNDLE/rootfs/"
    rm -f "$BUNDLE/rootfs/.bench-done"
    repack layer1
    local n=1
    for pkgs in "${SMALL_LAYER_PKGS[@]}"; do
        n=$((n + 1))
        log "layer $n: $pkgs"
        # shellcheck disable=SC2086
        chroot_install "$BUNDLE/rootfs" $pkgs
        repack "layer$n"
    done
    log "small tree: $(du -sbx "$BUNDLE/rootfs" | cut -f1) bytes"
    umoci tag --image "$OCI:layer$n" small
    for pkgs in "${LARGE_LAYER_PKGS[@]}"; do
        n=$((n + 1))
        log "layer $n: $pkgs"
        # shellcheck disable=SC2086
        chroot_install "$BUNDLE/rootfs" $pkgs
        repack "layer$n"
    done
    log "large tree: $(du -sbx "$BUNDLE/rootfs" | cut -f1) bytes"
    umoci tag --image "$OCI:layer$n" large
    for t in $(umoci ls --layout "$OCI"); do
        [[ $t == small || $t == large ]] || umoci rm --image "$OCI:$t"
    done
    umoci gc --layout "$OCI"
    rm -rf "$BUNDLE"
    printf '%s\n' "$SPEC" >"$OCI/.bench-spec"
}
prepare_images

# ---------------------------------------------------------------------------------------------
# Local registry on a free port.
free_port() {
    local p
    for p in $(shuf -i 20000-60000 -n 100); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    die "no free port found"
}
PORT=$(free_port)
REG="127.0.0.1:$PORT"
mkdir -p "$CACHE/registry"
cat >"$RUN_DIR/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $CACHE/registry
http:
  addr: $REG
EOF
docker-registry serve "$RUN_DIR/registry.yml" >"$RUN_DIR/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do
    curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && break
    kill -0 "$REG_PID" 2>/dev/null || die "registry exited: $(cat "$RUN_DIR/registry.log")"
    sleep 0.1
done
curl -fsS "http://$REG/v2/" >/dev/null || die "registry did not answer on $REG"
log "registry on $REG (pid $REG_PID)"

for img in $IMAGES; do
    skopeo copy -q --dest-tls-verify=false "oci:$OCI:$img" "docker://$REG/bench/$img:v1" >&2
done

ACCEPT='application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json'
manifest() { curl -fsS -H "Accept: $ACCEPT" "http://$REG/v2/bench/$1/manifests/v1"; }

declare -A LAYERS BLOB_BYTES TREE_BYTES
for img in $IMAGES; do
    m=$(manifest "$img")
    jq -e '[.layers[].mediaType] | all(endswith("gzip"))' <<<"$m" >/dev/null \
        || die "$img: layers are not gzip; the floor uses tar -xz"
    LAYERS[$img]=$(jq '.layers | length' <<<"$m")
    BLOB_BYTES[$img]=$(jq '[.layers[].size] | add' <<<"$m")
done

if [[ ${PREPARE_ONLY:-0} == 1 ]]; then
    for img in $IMAGES; do
        log "$img: ${LAYERS[$img]} layers, ${BLOB_BYTES[$img]} compressed bytes"
    done
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 3. Timed runs.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# download + extract, shared by the floor and the seed's path
fetch_extract() { # IMG DIR
    local img=$1 dir=$2 d
    mkdir -p "$dir/blobs" "$dir/tree"
    manifest "$img" >"$dir/manifest.json"
    for d in $(jq -r '.layers[].digest' "$dir/manifest.json"); do
        curl -fsSL -o "$dir/blobs/${d#sha256:}" "http://$REG/v2/bench/$img/blobs/$d"
    done
    for d in $(jq -r '.layers[].digest' "$dir/manifest.json"); do
        tar -xzf "$dir/blobs/${d#sha256:}" -C "$dir/tree" --numeric-owner --xattrs --xattrs-include='*'
    done
}

declare -A SIZE_BYTES USED_BYTES ALLOC_BYTES FLOOR_BLOCK SEED_MB
OUT="$RUN_DIR/out"
mkdir -p "$OUT"
export INFRA_OPERATOR_HOME="$RUN_DIR/home"

run_ours() { # IMG REP
    local img=$1 rep=$2 img_path="$OUT/ours-$1.ext4"
    rm -rf "$INFRA_OPERATOR_HOME/cache/blobs" "$img_path" "${img_path%.ext4}.json"
    drop_caches
    local t0 t1
    t0=$(now)
    "$BIN" rootfs from-docker -n "bench$img" -i "$REG/bench/$img:v1" --size auto -o "$img_path" --json \
        >"$RUN_DIR/ours-$img.json" 2>"$RUN_DIR/ours-$img.log" \
        || die "ours failed on $img: $(tail -5 "$RUN_DIR/ours-$img.log")"
    t1=$(now)
    SIZE_BYTES[$img]=$(jq .size_bytes "$RUN_DIR/ours-$img.json")
    USED_BYTES[$img]=$(jq .used_bytes "$RUN_DIR/ours-$img.json")
    ALLOC_BYTES[$img]=$(du -B1 "$img_path" | cut -f1)
    echo "$(elapsed "$t0" "$t1") $(elapsed "$t0" "$t1")" # ours already fsyncs its image
}

run_floor() { # IMG REP
    local img=$1 dir="$RUN_DIR/floor-$1"
    rm -rf "$dir"
    [[ -n ${SIZE_BYTES[$img]:-} ]] || die "floor needs our size first"
    drop_caches
    local t0 t1
    t0=$(now)
    fetch_extract "$img" "$dir"
    # (mke2fs says "Creating regular file ..." on stdout even with -q)
    mke2fs -q -t ext4 -d "$dir/tree" "$dir/out.ext4" "$((SIZE_BYTES[$img] / 1024))k" >/dev/null
    t1=$(now)
    sync "$dir/out.ext4" # fsync: ours fsyncs its image, this shows the same durability
    t2=$(now)
    FLOOR_BLOCK[$img]=$(dumpe2fs -h "$dir/out.ext4" 2>/dev/null | awk -F: '/^Block size/ {gsub(/ /, "", $2); print $2}')
    TREE_BYTES[$img]=$(du -sbx "$dir/tree" | cut -f1)
    echo "$(elapsed "$t0" "$t1") $(elapsed "$t0" "$t2")"
    rm -rf "$dir"
}

run_seed() { # IMG REP
    local img=$1 dir="$RUN_DIR/seed-$1"
    rm -rf "$dir"
    local mb=$(((SIZE_BYTES[$img] + 100 * 1048576 - 1) / (100 * 1048576) * 100))
    SEED_MB[$img]=$mb
    drop_caches
    local t0 t1
    t0=$(now)
    fetch_extract "$img" "$dir"
    dd if=/dev/zero of="$dir/out.ext4" bs=1M count="$mb" status=none
    mkfs.ext4 -F -q "$dir/out.ext4"
    mkdir -p "$dir/mnt"
    if ! mount -o loop "$dir/out.ext4" "$dir/mnt" 2>"$dir/mount.err"; then
        echo "FAIL(loop-mount:$(tr -s '\n ' '__' <"$dir/mount.err")) FAIL"
        return
    fi
    MOUNTS+=("$dir/mnt")
    cp -a "$dir/tree/." "$dir/mnt/"
    umount "$dir/mnt"
    unset 'MOUNTS[${#MOUNTS[@]}-1]'
    t1=$(now)
    sync "$dir/out.ext4"
    t2=$(now)
    echo "$(elapsed "$t0" "$t1") $(elapsed "$t0" "$t2")"
    rm -rf "$dir"
}

# Other work on a shared machine skews wall times: before each run wait (up to IDLE_TIMEOUT s)
# until the CPUs have been at most IDLE_BUSY_PCT% busy for 3 consecutive seconds. Prints the
# busy percentage of the last second sampled.
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
            calm=$((calm + 1))
            ((calm >= 3)) && break
        else
            calm=0
        fi
    done
    ((calm >= 3)) || log "machine still busy (${busy}% CPU) after ${IDLE_TIMEOUT:-300}s; running anyway"
    echo "$busy"
}

median() { printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{a[NR]=$1} END { if (NR==0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else printf "%.2f", (a[NR/2]+a[NR/2+1])/2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f", a / b; else print "n/a" }'; }

echo "image,tool,rep,seconds,seconds_incl_fsync,cpu_busy_pct_before,loadavg_before" >"$RAW"
declare -A T TS
tools=(ours floor seed)
for img in $IMAGES; do
    # the floor and the seed's path need our size, so ours leads rep 1; later reps rotate.
    for ((rep = 1; rep <= REPS; rep++)); do
        # rotate the order so no tool always runs first/last
        order=("${tools[@]:$(((rep - 1) % 3))}" "${tools[@]:0:$(((rep - 1) % 3))}")
        [[ -n ${SIZE_BYTES[$img]:-} ]] || order=(ours floor seed)
        for tool in "${order[@]}"; do
            busy=$(wait_idle)
            load=$(cut -d' ' -f1 /proc/loadavg)
            # run in this shell (not in $(...)) so the sizes it records survive
            "run_$tool" "$img" "$rep" >"$RUN_DIR/seconds"
            read -r s s_sync <"$RUN_DIR/seconds"
            log "$img rep $rep $tool: ${s}s, ${s_sync}s with fsync of the image (before: ${busy}% CPU busy, load $load)"
            echo "$img,$tool,$rep,$s,$s_sync,$busy,$load" >>"$RAW"
            T[$img,$tool]="${T[$img,$tool]:-} $s"
            TS[$img,$tool]="${TS[$img,$tool]:-} $s_sync"
        done
    done
done

# One more, untimed-for-the-medians run of ours per image to see where its time goes: the step
# lines it prints (without --json) are timestamped, and e2fsprogs tools are reached through
# PATH shims that log their own wall time.
declare -A PHASES
profile_ours() { # IMG
    local img=$1 img_path="$OUT/ours-$1.ext4" shims="$RUN_DIR/shims"
    mkdir -p "$shims"
    local t
    for t in mke2fs debugfs e2fsck dumpe2fs; do
        printf '#!/bin/bash\ns=$EPOCHREALTIME; "%s" "$@"; rc=$?\necho "%s $s $EPOCHREALTIME" >>"%s"; exit $rc\n' \
            "$(PATH=/usr/sbin:/sbin:$PATH command -v "$t")" "$t" "$shims/log" >"$shims/$t"
        chmod 755 "$shims/$t"
    done
    : >"$shims/log"
    rm -rf "$INFRA_OPERATOR_HOME/cache/blobs" "$img_path" "${img_path%.ext4}.json"
    wait_idle >/dev/null
    drop_caches
    local t0 t1
    t0=$(now)
    PATH="$shims:$PATH" "$BIN" rootfs from-docker -n "bench$img" -i "$REG/bench/$img:v1" --size auto -o "$img_path" 2>&1 |
        while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >"$RUN_DIR/profile-$img.log"
    t1=$(now)
    # phase = time from one "[n/6]" line to the next (or to the end)
    PHASES[$img]=$(awk -v end="$t1" -v start="$t0" '
        / \[[0-9]\/[0-9]\] / { if (name != "") printf "%s|%.2f\n", name, $1 - t; t = $1; sub(/^[0-9.]+ /, ""); name = $0 }
        END { if (name != "") printf "%s|%.2f\n", name, end - t; printf "total (this run)|%.2f\n", end - start }' "$RUN_DIR/profile-$img.log")
    PHASES[$img]+=$'\n'$(awk '{ d[$1] += $3 - $2 } END { for (k in d) printf "  of which %s|%.2f\n", k, d[k] }' "$shims/log" | sort)
}
for img in $IMAGES; do
    profile_ours "$img"
done

# ---------------------------------------------------------------------------------------------
# 4. Report.
machine() {
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- crates 2>/dev/null || echo ' (crates/ modified in the work tree)')"
    echo "- CPU: $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), nproc $(nproc)"
    echo "- kernel: $(uname -r)"
    echo "- disk: $(df -h --output=source,fstype,size,avail "$CACHE" | tail -1 | tr -s ' ' | sed 's/ *$//') free;" \
        "$(lsblk -dno NAME,ROTA,SIZE 2>/dev/null | awk '$1 !~ /^(zram|loop)/ {printf "%s%s rotational=%s size %s", sep, $1, $2, $3; sep="; "}')"
    echo "- memory (free -g):"
    echo '```'
    free -g
    echo '```'
}

{
    echo "# rootfs from-docker benchmark — $DATE"
    echo
    echo "Produced by \`bench/rootfs.sh\` (see bench/README.md). Median of $REPS runs, page cache dropped"
    echo "before every run, tools interleaved (order rotated per repetition). Registry: Debian"
    echo "\`docker-registry\` on 127.0.0.1, layers gzip."
    echo
    echo "## Machine"
    machine
    echo
    echo "## Speed (median wall seconds)"
    echo
    echo "As specified (floor and seed stop when their tools return; their image may still be dirty"
    echo "in the page cache, while ours fsyncs its image before returning):"
    echo
    echo "| image | layers | compressed | tree | ours | floor | seed | ours/floor (goal ≤1.5) | seed/ours (goal ≥2.5) |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for img in $IMAGES; do
        o=$(median ${T[$img,ours]}) f=$(median ${T[$img,floor]}) s=$(median ${T[$img,seed]})
        printf '| %s | %s | %s MB | %s MB | %s | %s | %s | %s | %s |\n' \
            "$img" "${LAYERS[$img]}" "$((BLOB_BYTES[$img] / 1000000))" "$((TREE_BYTES[$img] / 1000000))" \
            "$o" "$f" "$s" "$(ratio "$o" "$f")" "$(ratio "$s" "$o")"
    done
    echo
    echo "Same durability (floor and seed end with \`sync FILE\`, i.e. fsync of the image, as ours does):"
    echo
    echo "| image | ours | floor+fsync | seed+fsync | ours/floor | seed/ours |"
    echo "|---|---|---|---|---|---|"
    for img in $IMAGES; do
        o=$(median ${TS[$img,ours]}) f=$(median ${TS[$img,floor]}) s=$(median ${TS[$img,seed]})
        printf '| %s | %s | %s | %s | %s | %s |\n' "$img" "$o" "$f" "$s" "$(ratio "$o" "$f")" "$(ratio "$s" "$o")"
    done
    echo
    echo "## Size (\`--size auto\`, from our manifest)"
    echo
    echo "| image | size_bytes | used_bytes | size/used (goal ≤1.10) | allocated (du -B1) | seed-style image | floor mke2fs block size |"
    echo "|---|---|---|---|---|---|---|"
    for img in $IMAGES; do
        printf '| %s | %s (%s MiB) | %s (%s MiB) | %s | %s (%s MiB) | %s MiB | %s |\n' "$img" \
            "${SIZE_BYTES[$img]}" "$((SIZE_BYTES[$img] >> 20))" "${USED_BYTES[$img]}" "$((USED_BYTES[$img] >> 20))" \
            "$(ratio "${SIZE_BYTES[$img]}" "${USED_BYTES[$img]}")" "${ALLOC_BYTES[$img]}" "$((ALLOC_BYTES[$img] >> 20))" \
            "${SEED_MB[$img]}" "${FLOOR_BLOCK[$img]:-?}"
    done
    echo
    echo "## Where ours spends its time (one extra run per image, not in the medians)"
    echo
    echo "| image | phase | seconds |"
    echo "|---|---|---|"
    for img in $IMAGES; do
        while IFS='|' read -r phase secs; do
            [[ -n $phase ]] && printf '| %s | %s | %s |\n' "$img" "${phase//|/\\|}" "$secs"
        done <<<"${PHASES[$img]}"
    done
    echo
    echo "## Individual runs (seconds; with fsync in brackets)"
    echo
    for img in $IMAGES; do
        for tool in "${tools[@]}"; do
            read -ra a <<<"${T[$img,$tool]}"
            read -ra b <<<"${TS[$img,$tool]}"
            line=""
            for ((k = 0; k < ${#a[@]}; k++)); do line+=" ${a[k]} [${b[k]}]"; done
            echo "- $img $tool:$line"
        done
    done
    echo
    echo "Raw data: \`$(basename "$RAW")\` (also the CPU busy % and 1-minute load average just before each run)."
} >"$RESULTS.partial"
mv "$RESULTS.partial" "$RESULTS"
cat "$RESULTS"
log "wrote $RESULTS and $RAW"
