#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu machine: install prerequisites, build and install
# infra.operator, then build the Python rootfs and list it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p infra-cli
install -m 0755 target/x86_64-unknown-linux-gnu/release/infra-operator /usr/local/bin/infra-operator
ln -sf infra-operator /usr/local/bin/infra.operator
infra.operator rootfs create --lang python
infra.operator rootfs list
