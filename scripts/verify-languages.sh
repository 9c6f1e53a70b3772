#!/usr/bin/env bash
# Builds and verifies every installable language of the table in a microVM, then writes
# bench/results/languages-DATE.md (+ .json). Long: about a minute or two per language on a
# 2-core machine under TCG, plus the package downloads. Interrupted runs continue where they
# stopped (results are kept in $WORK, default /var/tmp/infra-verify-languages).
#   bash scripts/verify-languages.sh                 # all installable languages
#   bash scripts/verify-languages.sh --langs c,go    # some
#   bash scripts/verify-languages.sh --rebuild       # rebuild images that exist
#   bash scripts/verify-languages.sh --discard-images   # keep results, not the images (disk)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# PyPI and npm packages (zig, bun, deno) are installed into images with the host's pip and npm.
command -v npm >/dev/null || apt-get install -y --no-install-recommends npm
python3 -m pip --version >/dev/null 2>&1 || apt-get install -y --no-install-recommends python3-pip
cargo build --release -p infra-cli --bin infra.operator
cargo build --profile agent -p infra-agent
WORK=${WORK:-/var/tmp/infra-verify-languages}
exec python3 scripts/verify_languages.py --bin target/release/infra.operator --work "$WORK" "$@"
