#!/usr/bin/env bash
# Writes a busybox image (a root filesystem tar for `mig image import`) made from the host's
# busybox: every applet linked in /bin, a root entry in /etc/passwd.
# usage: bash scripts/busybox-tar.sh OUT.tar
set -euo pipefail
out=$1
rootfs=$(mktemp -d /tmp/mig-busybox.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev}
cp /bin/busybox "$rootfs/bin/busybox"
for app in $("$rootfs/bin/busybox" --list); do
  [ -e "$rootfs/bin/$app" ] || ln -s busybox "$rootfs/bin/$app"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$rootfs/etc/passwd"
tar -C "$rootfs" -cf "$out" .
