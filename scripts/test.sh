#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: lint gates, builds, unit and
# root integration tests with real namespaces, cgroups and CRIU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
shellcheck scripts/*.sh .ci/run
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --release --bins
# Root integration tests share cgroups, mounts and network namespaces: run them one binary at a time.
cargo test --workspace --no-fail-fast -- --test-threads=1
