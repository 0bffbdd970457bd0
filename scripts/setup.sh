#!/usr/bin/env bash
# Installs everything mig needs on a Debian 12 machine, as root, idempotently:
# Debian packages (bookworm only), a Rust toolchain check, CRIU 4.2.1 built from Debian's source with
# mig's patches (scripts/criu-patches) into /usr/local (kept when the installed one passes `criu check`,
# has every patch's marker and its build stamp says it was built from these patches and settings,
# rebuilt otherwise), and the kernel settings CRIU's lazy pages need. Safe to run again: every step
# checks before it acts.
set -euo pipefail

# 4.2 at least: CRIU 4.1 cannot dump TCP or UDP sockets on kernels from 6.16 on
# ("Can't get 1:16 opt", checkpoint-restore/criu#2705), which `mig move --tcp-established` needs.
CRIU_VERSION=4.2.1
CRIU_MIN_MINOR=2
CRIU_TARBALL="criu_${CRIU_VERSION}.orig.tar.xz"
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
# A snapshot.debian.org time at which unstable carried CRIU_VERSION (the last place to fetch it).
CRIU_SNAPSHOT=20261201T000000Z
BUILD_DIR=/var/cache/mig-setup
CRIU_BIN=/usr/local/sbin/criu
# Patches applied to CRIU's source (patch -p1, in name order), and for each a string it puts into the
# binary (a log message): a CRIU without every marker lacks a patch and is rebuilt (docs/criu.md,
# "Patches").
# The repository, resolved before any cd: the script may be run by a relative path (scripts/setup.sh).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CRIU_PATCH_DIR="$REPO/scripts/criu-patches"
CRIU_PATCH_MARKERS=(
  criu-rlimits-proc-fallback  # 0001: dump the limits of another user's process without CAP_SYS_RESOURCE
  criu-rlimits-clamped        # 0002: restore limits above criu's own as close as allowed, with a warning
  criu-lazy-from-task         # 0003: a lazy dump serves pages from the frozen task instead of pinning them
  criu-pagemap-anon-scan      # 0004: anonymous memory is scanned without looking up every page's struct page
  criu-nf-ct-skip             # 0005: no walk of the conntrack table for a network namespace without entries
  criu-tmpfs-empty            # 0006: no tar for a tmpfs that is empty as mounted
  criu-action-script-only     # 0007: action scripts run only for the actions the caller lists
  criu-lazy-no-pipes          # 0008: a lazy dump gives its lazy page buffers no pipes
  criu-smaps-copy             # 0009: a dump takes smaps from the copy the caller made (CRIU_SMAPS_DIR)
  criu-syscall-page-copy      # 0010: the page compel writes its syscall stub into is sent as a copy
  criu-lazy-close-required    # 0011: a lazy page server session that ends without a close fails
  criu-pipes-unlimited        # 0012: a dump holds any number of pipes (CRIU stopped at 1024)
  criu-tmpfs-plain            # 0013: tmpfs contents as a plain tarball (gzip ran at 30 MB/s while frozen)
  criu-lazy-idle-wait         # 0014: lazy-pages sleeps when no answer comes for 50 ms instead of polling on
  criu-posix-locks-after-vmas # 0015: the restorer takes POSIX locks again after mapping the files
)
# Arguments of CRIU's make besides -j (why NO_GNUTLS: at the build below).
CRIU_MAKE_ARGS=(NO_GNUTLS=1 criu)
# What $CRIU_BIN was built from (criu_stamp): a marker tells that a patch is in, not which version
# of it, so a patch changed under the same marker is picked up only through this file.
CRIU_STAMP=/usr/local/share/mig/criu-build.stamp

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"

PACKAGES=(
  busybox-static iproute2 iptables kmod procps util-linux e2fsprogs tar gzip zstd xz-utils
  ca-certificates curl dpkg-dev build-essential pkg-config shellcheck jq
  libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev uuid-dev libnftables-dev libaio-dev
  libseccomp-dev patch runc systemd-container
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
  local v major minor
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *\([0-9]*\.[0-9]*\).*/\1/p')
  major=${v%%.*}
  minor=${v#*.}
  [ -n "$v" ] || return 1
  [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge "$CRIU_MIN_MINOR" ]; } || return 1
  "$bin" check >/dev/null 2>&1
}

# Whether the CRIU binary $1 holds every patch's marker.
criu_patched() {
  local m
  for m in "${CRIU_PATCH_MARKERS[@]}"; do
    grep -q -a -F -- "$m" "$1" || return 1
  done
}

sha256_of() { sha256sum | cut -d' ' -f1; }

patches=("$CRIU_PATCH_DIR"/*.patch)
[ -f "${patches[0]}" ] || die "no CRIU patches in $CRIU_PATCH_DIR"

# The build stamp of the CRIU binary $1 built here: the digest of what it is built from (CRIU's
# version and tarball, the make arguments, each patch's name and content in the order they apply)
# and the digest of the binary itself, so that a binary replaced by another build (by hand, or by
# an older setup.sh that wrote no stamp) does not inherit the stamp.
criu_stamp() {
  local p inputs
  inputs=$(
    printf 'criu %s %s\n' "$CRIU_VERSION" "$CRIU_SHA256"
    printf 'make %s\n' "${CRIU_MAKE_ARGS[*]}"
    for p in "${patches[@]}"; do
      printf 'patch %s %s\n' "$(basename "$p")" "$(sha256_of <"$p")"
    done
  )
  printf 'inputs %s\nbinary %s\n' "$(printf '%s\n' "$inputs" | sha256_of)" "$(sha256_of <"$1")"
}

# Why $CRIU_BIN must be (re)built; nothing when it can stay.
criu_stale() {
  if [ ! -e "$CRIU_BIN" ]; then
    echo "is missing"
  elif ! criu_ok "$CRIU_BIN"; then
    echo "fails 'criu check' or is older than 4.$CRIU_MIN_MINOR"
  elif ! criu_patched "$CRIU_BIN"; then
    echo "lacks a patch of $CRIU_PATCH_DIR"
  elif [ ! -f "$CRIU_STAMP" ]; then
    echo "has no build stamp ($CRIU_STAMP): what it was built from is unknown"
  elif [ "$(cat "$CRIU_STAMP")" != "$(criu_stamp "$CRIU_BIN")" ]; then
    echo "was built from other patches or settings, or replaced since (its stamp $CRIU_STAMP differs)"
  fi
}

# mig runs $CRIU_BIN first when it exists (migrate/src/criu, Criu::locate), so that is the binary that
# must work and carry the patches; the system's CRIU (Debian 12 has 3.17) has none of them.
have_criu=""
stale=$(criu_stale)
if [ -z "$stale" ]; then
  have_criu=$CRIU_BIN
else
  log "$CRIU_BIN $stale"
fi

if [ -z "$have_criu" ]; then
  log "building CRIU $CRIU_VERSION from Debian's source with the patches of $CRIU_PATCH_DIR"
  mkdir -p "$BUILD_DIR"
  cd "$BUILD_DIR"
  if ! echo "$CRIU_SHA256  $CRIU_TARBALL" | sha256sum -c --status 2>/dev/null; then
    rm -f "$CRIU_TARBALL"
    # A private apt state with one deb-src entry for unstable (which carries criu 4.2.1), reusing
    # the URI of the machine's Debian list: the machine's own apt configuration is not touched.
    uri=$(grep -rhoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
          | grep -v security | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    apt_dir="$BUILD_DIR/apt"
    mkdir -p "$apt_dir/lists/partial"
    cat > "$apt_dir/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri sid main
SRC
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=/nonexistent"
              -o "Dir::State::Lists=$apt_dir/lists")
    apt-get "${apt_opts[@]}" update -qq >/dev/null 2>&1 || true
    # The .dsc or Debian tarball may fail to fetch while the orig tarball arrives; the checksum
    # below decides.
    apt-get "${apt_opts[@]}" source --download-only criu >/dev/null 2>&1 || true
    # Once unstable carries a newer CRIU, apt fetches that one: then the tarball itself, from the
    # mirror's pool (kept there while any suite has it) or from snapshot.debian.org (kept for good).
    for url in "$uri/pool/main/c/criu/$CRIU_TARBALL" \
               "https://snapshot.debian.org/archive/debian/$CRIU_SNAPSHOT/pool/main/c/criu/$CRIU_TARBALL"; do
      [ -f "$CRIU_TARBALL" ] && break
      log "fetching $url"
      if curl -fsSL --retry 2 -o "$CRIU_TARBALL.part" "$url"; then
        mv "$CRIU_TARBALL.part" "$CRIU_TARBALL"
      else
        rm -f "$CRIU_TARBALL.part"
      fi
    done
    [ -f "$CRIU_TARBALL" ] || die "could not fetch $CRIU_TARBALL (from Debian unstable's source, $uri/pool or snapshot.debian.org)"
    echo "$CRIU_SHA256  $CRIU_TARBALL" | sha256sum -c --status || die "$CRIU_TARBALL: sha256 mismatch"
  fi
  # Always a fresh tree: the patches apply to the pristine source only.
  rm -rf "criu-$CRIU_VERSION"
  tar -xf "$CRIU_TARBALL"
  cd "criu-$CRIU_VERSION"
  for p in "${patches[@]}"; do
    patch -p1 --forward --quiet <"$p" || die "$p does not apply to CRIU $CRIU_VERSION"
  done
  # Without GnuTLS: it serves only `criu page-server --tls`, which mig never uses (its pages travel
  # over QUIC), and its nine libraries doubled every criu start (4.6 -> 2.5 ms, three starts per move).
  make -j"$(nproc)" "${CRIU_MAKE_ARGS[@]}" >build.log 2>&1 || { tail -n 30 build.log >&2; die "CRIU build failed"; }
  criu_patched criu/criu || die "the built CRIU lacks a patch marker (${CRIU_PATCH_MARKERS[*]})"
  # Installed under a temporary name and renamed over the old binary once it passes `criu check`:
  # a CRIU that runs meanwhile keeps its file, and no run ever sees a half-written one.
  tmp_bin="$(dirname "$CRIU_BIN")/.criu.setup-$$"
  install -D -m 0755 criu/criu "$tmp_bin"
  criu_ok "$tmp_bin" || { rm -f "$tmp_bin"; die "built CRIU fails 'criu check'"; }
  mv -f "$tmp_bin" "$CRIU_BIN"
  # The stamp last, atomically: a run stopped before it leaves the old stamp or none, and the
  # binary's digest in it then no longer matches, so the next run builds again.
  mkdir -p "$(dirname "$CRIU_STAMP")"
  criu_stamp "$CRIU_BIN" >"$CRIU_STAMP.tmp"
  mv -f "$CRIU_STAMP.tmp" "$CRIU_STAMP"
  have_criu=$CRIU_BIN
fi
log "CRIU: $have_criu ($("$have_criu" --version | head -n1))"

# CRIU's lazy page server needs pipes of a few MiB (see docs/criu.md).
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 16777216 ]; then
  echo 16777216 > /proc/sys/fs/pipe-max-size
fi
# CRIU keeps its kerndat cache (/run/criu.kdat) only on a tmpfs. Where /run is not one, migd writes
# the cache when it starts (docs/criu.md, "Kerndat cache"); systemd-tmpfiles removes it at boot, so
# that a CRIU run by hand before migd starts never believes a cache of the previous boot.
if [ "$(stat -f -c %T /run)" != tmpfs ] && [ -d /etc/tmpfiles.d ]; then
  printf '# mig (scripts/setup.sh): /run is not a tmpfs here; no kerndat cache of an earlier boot\nr /run/criu.kdat\n' \
    > /etc/tmpfiles.d/mig-criu-kdat.conf
fi
modprobe overlay 2>/dev/null || true
modprobe veth 2>/dev/null || true

# Rust: the toolchain of rust-toolchain.toml (pinned, with rustfmt and clippy, so that a newer
# stable's lints cannot fail the tests' clippy gate), through rustup, which is installed into
# ~/.cargo when missing (Debian 12's own rustc, 1.63, is older than mig's 1.80). test.sh and
# demo.sh then use it. A machine with a Rust of 1.80 or later but no rustup keeps its own.
RUST_CHANNEL=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$REPO/rust-toolchain.toml")
[ -n "$RUST_CHANNEL" ] || die "no channel in $REPO/rust-toolchain.toml"
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
rust_ok() {
  (
    cd "$REPO"
    command -v cargo >/dev/null && command -v rustc >/dev/null || exit 1
    minor=$(rustc --version | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
    [ -n "$minor" ] && [ "$minor" -ge 80 ] && cargo fmt --version >/dev/null 2>&1 \
      && cargo clippy --version >/dev/null 2>&1
  )
}
if ! command -v rustup >/dev/null && ! rust_ok; then
  log "installing rustup and Rust $RUST_CHANNEL with rustfmt and clippy into $HOME/.cargo"
  mkdir -p "$BUILD_DIR"
  rustup_url="https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init"
  curl --proto '=https' --tlsv1.2 -fsSL --retry 2 -o "$BUILD_DIR/rustup-init" "$rustup_url" \
    || die "could not fetch $rustup_url; install Rust 1.80 or later with rustfmt and clippy"
  chmod +x "$BUILD_DIR/rustup-init"
  "$BUILD_DIR/rustup-init" -y --profile minimal --default-toolchain "$RUST_CHANNEL" \
    --component rustfmt,clippy >/dev/null \
    || die "rustup failed; install Rust 1.80 or later with rustfmt and clippy"
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if command -v rustup >/dev/null \
  && ! rustup run "$RUST_CHANNEL" cargo clippy --version >/dev/null 2>&1; then
  log "installing Rust $RUST_CHANNEL with rustfmt and clippy (rustup)"
  rustup toolchain install "$RUST_CHANNEL" --profile minimal --component rustfmt,clippy >/dev/null \
    || die "rustup could not install Rust $RUST_CHANNEL"
fi
rust_ok || die "no Rust of 1.80 or later with rustfmt and clippy"
log "ready"
