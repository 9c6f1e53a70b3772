#!/usr/bin/env bash
# Runs every test: format and lint gates, then the whole workspace (unit tests, the agent over
# TCP, builds against a real registry, dockerd and debootstrap). Needs root (image builds keep
# file owners and device nodes; dockerd and debootstrap need it too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --tests
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# `cargo test --workspace` also builds the agent binary beside the debug CLI (the agent crate's
# own tests need it), so the VM tests ship the slim agent of this tree.
cargo test --workspace
