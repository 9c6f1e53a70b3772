#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu machine: install prerequisites, build and install
# infra.operator, then run Python in a microVM (the first run fetches the guest kernel and
# builds the Python image).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p infra-cli
# The in-VM agent alone, built on its own (its dependencies get only the guest's features) with
# the small `agent` profile; the CLI puts it into images and the initramfs when it is beside it
# and carries the same source fingerprint.
cargo build --profile agent -p infra-agent
install -m 0755 target/x86_64-unknown-linux-gnu/release/infra-operator /usr/local/bin/infra-operator
install -m 0755 target/x86_64-unknown-linux-gnu/agent/infra-operator-agent /usr/local/bin/infra-operator-agent
ln -sf infra-operator /usr/local/bin/infra.operator
infra.operator run --lang python --code "print('hello')"
