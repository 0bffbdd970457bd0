#!/usr/bin/env bash
# The downtime of moving a container with a long log (docs/performance.md, "Session 17"): the same
# mig binaries in two labs, one whose agents speak protocol 1.5 (the log goes with the presync,
# only its tail while frozen) and one whose agents announce 1.4 (the log goes whole while frozen).
# Prints CSV: protocol, run, log MiB, downtime_ms, presync_log_bytes, delta_log_bytes, total_ms.
#
# usage: bash scripts/bench-log.sh [BIN_DIR [RUNS [LOG_MB]]]
#   BIN_DIR  where mig and migd are (default: target/release, built when missing)
#   RUNS     moves per protocol (default 3)
#   LOG_MB   MB of random data the container writes as base64 (default 215: a 276 MiB log)
# shellcheck disable=SC2016  # the container's command is quoted for the container's shell
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-$(realpath -m "${CARGO_TARGET_DIR:-target}")/release}
runs=${2:-3}
log_mb=${3:-215}
if [ ! -x "$bin/mig" ]; then
  cargo build --release --bins -q
fi
export PATH="$bin:$PATH"
unset MIG_SOCKET MIG_HOST MIG_WIRE_VERSION
work=$(mktemp -d /tmp/mig-bench-log.XXXXXX)
lab=""
cleanup() {
  if [ -n "$lab" ]; then MIG_LAB=$lab mig lab down >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

bash scripts/busybox-tar.sh "$work/busybox.tar"

echo "protocol,run,log_mib,downtime_ms,presync_log_bytes,delta_log_bytes,total_ms"
for proto in 1.4 1.5; do
  lab=mig-bench-log${proto/./}
  export MIG_LAB=$lab
  if [ "$proto" = 1.4 ]; then export MIG_WIRE_VERSION=1.4; else unset MIG_WIRE_VERSION; fi
  mig lab up --hosts 2 --subnet "10.79.8${proto#1.}" >/dev/null
  for host in host-a host-b; do
    mig --host "$host" image import "$work/busybox.tar" --name busybox >/dev/null
  done
  for r in $(seq 1 "$runs"); do
    mig --host host-a run -d --name talker busybox -- sh -c \
      "head -c ${log_mb}000000 /dev/urandom | base64; echo written; while :; do sleep 1; done" >/dev/null
    until mig --host host-a logs talker 2>/dev/null | tail -n 1 | grep -q written; do sleep 1; done
    j=$(mig --host host-a move talker host-b --json)
    mib=$(jq '(.presync_log_bytes + .delta_log_bytes) / 1048576 | floor' <<<"$j")
    echo "$proto,$r,$mib,$(jq -r '[.downtime_ms, .presync_log_bytes, .delta_log_bytes, .total_ms] | @csv' <<<"$j")"
    mig --host host-b rm -f talker >/dev/null
  done
  mig lab down >/dev/null
  lab=""
done
