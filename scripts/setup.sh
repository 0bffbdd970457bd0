#!/usr/bin/env bash
# Installs everything mig needs on a Debian 12 machine, as root, idempotently:
# Debian packages (bookworm only), a Rust toolchain check, CRIU >= 4 (the system one when `criu check`
# passes, else CRIU 4.1.1 built from Debian 13's source into /usr/local), and the kernel settings
# CRIU's lazy pages need. Safe to run again: every step checks before it acts.
set -euo pipefail

CRIU_VERSION=4.1.1
CRIU_TARBALL="criu_${CRIU_VERSION}.orig.tar.xz"
CRIU_SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
BUILD_DIR=/var/cache/mig-setup

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"

PACKAGES=(
  busybox-static iproute2 iptables kmod procps util-linux e2fsprogs tar gzip zstd xz-utils
  ca-certificates dpkg-dev build-essential pkg-config shellcheck jq
  libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev uuid-dev libnftables-dev libgnutls28-dev libaio-dev
  libseccomp-dev runc
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

criu_ok() {
  local bin=$1
  [ -x "$bin" ] || return 1
  local v
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\).*/\1/p')
  [ -n "$v" ] && [ "$v" -ge 4 ] || return 1
  "$bin" check >/dev/null 2>&1
}

have_criu=""
for c in /usr/local/sbin/criu "$(command -v criu 2>/dev/null || true)"; do
  if [ -n "$c" ] && criu_ok "$c"; then have_criu=$c; break; fi
done

if [ -z "$have_criu" ]; then
  log "no working CRIU >= 4: building CRIU $CRIU_VERSION from Debian 13's source"
  mkdir -p "$BUILD_DIR"
  cd "$BUILD_DIR"
  if ! echo "$CRIU_SHA256  $CRIU_TARBALL" | sha256sum -c --status 2>/dev/null; then
    rm -f "$CRIU_TARBALL"
    # A deb-src entry for trixie that reuses the URI of the machine's Debian list.
    uri=$(grep -rhoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
          | grep -v security | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    srclist=/etc/apt/sources.list.d/mig-trixie-src.sources
    cat > "$srclist" <<SRC
Types: deb-src
URIs: $uri
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq || true
    # The .dsc fetch may fail while the orig tarball arrives; the checksum below decides.
    # (trixie is the only deb-src entry, so `criu` resolves to its source package).
    apt-get source --download-only criu >/dev/null 2>&1 || true
    # Never leave trixie sources enabled: the machine stays on bookworm.
    rm -f "$srclist"
    apt-get update -qq || true
    [ -f "$CRIU_TARBALL" ] || die "could not fetch $CRIU_TARBALL"
    echo "$CRIU_SHA256  $CRIU_TARBALL" | sha256sum -c --status || die "$CRIU_TARBALL: sha256 mismatch"
  fi
  rm -rf "criu-$CRIU_VERSION"
  tar -xf "$CRIU_TARBALL"
  cd "criu-$CRIU_VERSION"
  make -j"$(nproc)" criu >build.log 2>&1 || { tail -n 30 build.log >&2; die "CRIU build failed"; }
  install -D -m 0755 criu/criu /usr/local/sbin/criu
  criu_ok /usr/local/sbin/criu || die "built CRIU fails 'criu check'"
  have_criu=/usr/local/sbin/criu
fi
log "CRIU: $have_criu ($("$have_criu" --version | head -n1))"

# CRIU's lazy page server needs pipes of a few MiB (see docs/criu.md).
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 16777216 ]; then
  echo 16777216 > /proc/sys/fs/pipe-max-size
fi
modprobe overlay 2>/dev/null || true
modprobe veth 2>/dev/null || true

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
log "ready"
