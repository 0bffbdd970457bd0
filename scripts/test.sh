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
# The build takes about 2 GB and the tests' hosts, images and checkpoints some more: say so at once
# rather than after ten minutes of building.
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
mkdir -p "$target"
free_mb=$(df -Pm "$target" | awk 'NR == 2 {print $4}')
if [ "${free_mb:-0}" -lt 4096 ]; then
  echo "test.sh: warning: only ${free_mb} MB free for $target; the build and the tests need about 4 GB" >&2
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Root integration tests share cgroups, mounts and network namespaces: run them one binary at a time.
cargo test --workspace --no-fail-fast -- --test-threads=1
