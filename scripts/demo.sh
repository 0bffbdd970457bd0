#!/usr/bin/env bash
# The main job, end to end on one machine: sets everything up, builds mig, and runs the demo.
# shellcheck disable=SC2016  # container commands are quoted for the container's shell
# With a working `mig lab` and `mig move` (issue 4) it moves a running container between two
# simulated hosts; until then it shows one host: image import, run, ps, logs, exec, stop, rm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
echo "== building mig (release)"
cargo build --release --bins -q
BIN=$PWD/target/release
export PATH="$BIN:$PATH"

work=$(mktemp -d /tmp/mig-demo.XXXXXX)
state=$work/state
sock=$work/migd.sock
agent_pid=""
cleanup() {
  set +e
  if [ -n "$agent_pid" ]; then
    MIG_SOCKET=$sock mig rm -f demo >/dev/null 2>&1
    kill "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== a busybox image from the host's busybox-static"
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev}
cp /bin/busybox "$rootfs/bin/busybox"
for app in $("$rootfs/bin/busybox" --list); do
  [ -e "$rootfs/bin/$app" ] || ln -s busybox "$rootfs/bin/$app"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$rootfs/etc/passwd"
tar -C "$rootfs" -cf "$work/busybox.tar" .

echo "== starting migd (state in $state)"
migd --state-dir "$state" --socket "$sock" --name demo-host >"$work/migd.log" 2>&1 &
agent_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$work/migd.log"; exit 1; }
export MIG_SOCKET=$sock

set -x
mig image import "$work/busybox.tar" --name busybox
mig image ls
mig run -d --name demo --hostname demo --memory 64M busybox -- \
  sh -c 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 1; done'
mig ps
sleep 3
mig logs demo
mig exec demo -- sh -c 'echo "inside: pid $$ of $(ls /proc | grep -c "^[0-9]") processes, host $(hostname)"'
mig inspect demo --json
mig stop demo
mig ps -a
mig rm demo
set +x
echo "== demo done"
