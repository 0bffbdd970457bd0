#!/bin/bash
# Builds the Debian package of mig: mig, migd and mig-shim, the systemd unit, the default
# configuration, man pages and bash/zsh/fish completions. dpkg-deb only; nothing is installed.
#
#   scripts/package.sh [--bin-dir DIR] [--out DIR] [--compress xz|gzip|none]
#
# --bin-dir DIR  take mig, migd and mig-shim from DIR (default: `cargo build --release` and
#                target/release)
# --out DIR      where the .deb goes (default: target/debian)
# --compress C   the package's compression (default xz; the tests use none: xz of debug builds
#                takes minutes)
#
# Prints the path of the package it wrote. docs/operations.md describes installing it.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir=""
out_dir="$root/target/debian"
compress=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --out) out_dir="$2"; shift 2 ;;
        --compress) compress="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$compress" in
    xz|gzip|none) ;;
    *) echo "package.sh: --compress takes xz, gzip or none, not $compress" >&2; exit 2 ;;
esac
command -v dpkg-deb >/dev/null || { echo "package.sh: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }

if [ -z "$bin_dir" ]; then
    (cd "$root" && cargo build --release -q -p mig-agent --bins)
    # $CARGO_TARGET_DIR when set (relative to the repository), else ./target.
    bin_dir="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")/release"
fi
for b in mig migd mig-shim; do
    [ -x "$bin_dir/$b" ] || { echo "package.sh: $bin_dir/$b is missing" >&2; exit 1; }
done

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
pkg="$stage/mig"

install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/mig" \
    "$pkg/usr/share/man/man1" "$pkg/usr/share/man/man8" "$pkg/usr/share/doc/mig" \
    "$pkg/usr/share/bash-completion/completions" "$pkg/usr/share/zsh/vendor-completions" \
    "$pkg/usr/share/fish/vendor_completions.d"
for b in mig migd mig-shim; do
    install -m 0755 "$bin_dir/$b" "$pkg/usr/bin/$b"
    # As dh_strip does: no debug info in the package (it would be most of its size).
    if command -v strip >/dev/null; then
        strip --strip-debug "$pkg/usr/bin/$b"
    fi
done
install -m 0644 "$root/agent/dist/migd.service" "$pkg/lib/systemd/system/migd.service"
install -m 0644 "$root/agent/dist/config.toml" "$pkg/etc/mig/config.toml"

"$bin_dir/mig" man | gzip -9n > "$pkg/usr/share/man/man1/mig.1.gz"
"$bin_dir/migd" --man | gzip -9n > "$pkg/usr/share/man/man8/migd.8.gz"
"$bin_dir/mig" completions bash > "$pkg/usr/share/bash-completion/completions/mig"
"$bin_dir/mig" completions zsh > "$pkg/usr/share/zsh/vendor-completions/_mig"
"$bin_dir/mig" completions fish > "$pkg/usr/share/fish/vendor_completions.d/mig.fish"
for d in operations.md migration.md security.md; do
    [ -f "$root/docs/$d" ] && install -m 0644 "$root/docs/$d" "$pkg/usr/share/doc/mig/$d"
done
cat > "$pkg/usr/share/doc/mig/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: mig
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

echo "/etc/mig/config.toml" > "$pkg/DEBIAN/conffiles"
size_kb="$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)"
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: mig
Version: $version
Architecture: $arch
Maintainer: mig maintainers <mig@example.invalid>
Installed-Size: $size_kb
Section: admin
Priority: optional
Depends: libc6 (>= 2.34), iproute2
Recommends: criu (>= 4)
Suggests: busybox-static
Homepage: https://example.invalid/mig
Description: Linux containers that move between hosts while they run
 mig runs Linux containers on a set of hosts and moves them live between
 hosts with CRIU: migd (the per-host agent, a systemd service), mig (the
 command line) and mig-shim (the per-container supervisor).
 .
 Live migration, checkpoint and restore need CRIU 4 or newer. Debian 12's
 criu 3.17 is too old for recent kernels: the project's scripts/setup.sh
 builds CRIU 4.2.1 into /usr/local/sbin when the distribution's is too old.
CONTROL

cat > "$pkg/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
# Makes systemd see the unit; starts nothing. Enable it with:
#   systemctl enable --now migd
set -e
if [ "$1" = "configure" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = "configure" ] && [ -z "$2" ]; then
    echo "mig installed: edit /etc/mig/config.toml, then: systemctl enable --now migd"
    # dpkg's PATH may lack /usr/local/sbin, where scripts/setup.sh puts CRIU (systemd's has it).
    if ! command -v criu >/dev/null 2>&1 && [ ! -x /usr/local/sbin/criu ]; then
        echo "mig: CRIU (>= 4) is not installed: moves and checkpoints need it (see scripts/setup.sh)"
    fi
fi
exit 0
POSTINST
cat > "$pkg/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
# Leaves /var/lib/mig (containers, images, identity) in place, even on purge: remove it by hand
# once no container is left.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
POSTRM
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/postrm"

mkdir -p "$out_dir"
deb="$out_dir/mig_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compress" --build "$pkg" "$deb" >/dev/null
echo "$deb"
