#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite: lint gates, builds, unit and
# root integration tests with real namespaces, cgroups and CRIU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
shellcheck scripts/*.sh .ci/run
# One build per run: incremental caches only grow the target directory (Cargo.toml [profile.dev]
# says why its size matters). The tests build the release binaries they need (the static
# workload and probe); the demo builds mig itself in release.
export CARGO_INCREMENTAL=0
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Root integration tests share cgroups, mounts and network namespaces: run them one binary at a time.
cargo test --workspace --no-fail-fast -- --test-threads=1
