#!/usr/bin/env bash
# The main job, end to end on one machine: sets everything up, builds mig, makes a two-host lab,
# runs a container whose counter keeps counting on host-a, moves it live to host-b (timings, PID
# map), shows it counting there, moves it back, and removes the lab (also on failure).
# shellcheck disable=SC2016  # container commands are quoted for the container's shell
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
echo "== building mig (release)"
cargo build --release --bins -q
# Where cargo put them: $CARGO_TARGET_DIR when set (relative to the repository), else ./target.
BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release
export PATH="$BIN:$PATH"
unset MIG_SOCKET MIG_HOST MIG_LAB

work=$(mktemp -d /tmp/mig-demo.XXXXXX)
lab_up=""
cleanup() {
  set +e
  if [ -n "$lab_up" ]; then
    echo "== mig lab down"
    mig lab down
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== a busybox image from the host's busybox-static"
bash scripts/busybox-tar.sh "$work/busybox.tar"

echo "== mig lab up --hosts 2"
lab_up=1
mig lab up --hosts 2
mig --host host-a peers ls

set -x
mig --host host-a image import "$work/busybox.tar" --name busybox
mig --host host-a run -d --name counter --memory 128M busybox -- sh -c \
  'data=$(head -c 8000000 /dev/urandom | base64 -w0); sum=$(echo "$data" | md5sum); i=0
   while :; do i=$((i+1)); echo "$i" > /tmp/count
     if [ "$(echo "$data" | md5sum)" = "$sum" ]; then m=intact; else m=CORRUPT; fi
     echo "count $i on $(hostname) memory $m"; sleep 1; done'
sleep 4
mig --host host-a logs counter | tail -n 2
mig --host host-a move counter host-b
sleep 3
mig --host host-b ps
mig --host host-b logs counter | tail -n 3
mig --host host-b exec counter -- cat /tmp/count
mig --host host-a ps -a
mig --host host-b move counter host-a --json
sleep 3
mig --host host-a logs counter | tail -n 3
mig --host host-a inspect counter
mig --host host-a rm -f counter
set +x
echo "== done"
