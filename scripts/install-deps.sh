#!/usr/bin/env bash
# Installs the Debian packages infra.operator and its tests need. Idempotent and quick when
# everything is present (no apt-get update unless something is missing).
set -euo pipefail

packages=(
  e2fsprogs        # mke2fs -d, e2fsck, dumpe2fs, debugfs
  debootstrap      # rootfs create
  docker-registry  # tests: a real OCI registry on 127.0.0.1
  docker.io        # tests: dockerd for the daemon source
  skopeo umoci     # benchmarks: pushing OCI layouts
  tar gzip ca-certificates
  python3 perl gcc libc6-dev  # guest agent tests run these languages on the host
  qemu-system-x86  # the microVM backend on hosts without Firecracker (TCG without KVM)
  binutils         # objcopy: strips the agent copied into the guest initramfs
  cpio             # tests: cross-check of the initramfs archive format
)

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
