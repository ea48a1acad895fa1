#!/usr/bin/env bash
# Gives this machine a CRIU that works on its kernel, for process-state
# checkpoints. Uses the system's criu when `criu check` passes; otherwise
# builds CRIU 4.1.1 from Debian trixie's source package (fetched with apt from
# the mirror this machine's apt configuration already uses) into PREFIX, and
# links PREFIX/sbin/criu into /usr/local/sbin, ahead of /usr/sbin on PATH, so
# containerd's runc shims find it. Safe to run again. Root only.
#
# Debian 12's criu 3.17.1 fails on kernels from 6.13 on ("vdso: Unexpected rt
# vDSO area bounds"); CRIU 4.x fixes it. Our patches (*.patch here) fix what
# 4.1.1 still gets wrong on newer kernels.
set -euo pipefail

PREFIX=${SEAMLESS_CRIU_PREFIX:-/opt/seamless-criu}
VERSION=4.1.1
LINK=/usr/local/sbin/criu
HERE=$(cd "$(dirname "$0")" && pwd)
# What the build is: the version and our patches (packaging/criu/*.patch).
BUILD="$VERSION+$(cat "$HERE"/*.patch | sha256sum | cut -c1-16)"

works() { "$1" check >/dev/null 2>&1; }

if [ -x "$PREFIX/sbin/criu" ] && [ "$(cat "$PREFIX/BUILD" 2>/dev/null)" = "$BUILD" ] && works "$PREFIX/sbin/criu"; then
  ln -sf "$PREFIX/sbin/criu" "$LINK"
  echo "criu: using $PREFIX/sbin/criu ($BUILD)"
  exit 0
fi
for candidate in $(type -ap criu 2>/dev/null); do
  if [ "$candidate" != "$LINK" ] && works "$candidate"; then
    echo "criu: system $candidate passes 'criu check'"
    exit 0
  fi
done

deps=(
  build-essential libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev
  libprotobuf-c-dev libprotobuf-dev pkgconf protobuf-c-compiler protobuf-compiler uuid-dev
  python3-protobuf libaio-dev xz-utils patch
)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "criu: installing build dependencies ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/seamless-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The Debian mirror apt already uses here (not the security archive).
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' \
  | awk '$2 !~ /security/ {print $1; exit}')
[ -n "$mirror" ] || { echo "criu: no Debian mirror in apt's configuration" >&2; exit 1; }
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src [signed-by=$keyring] $mirror trixie main" > "$work/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/none"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root"
)
echo "criu: fetching the source of criu $VERSION from $mirror (trixie)"
apt-get "${apt_opts[@]}" -qq update
# Only the upstream tarball is needed (some mirrors carry no .dsc): apt
# prints its address and checksum from the signed Sources index, and
# apt-helper fetches it, checking that checksum.
tarball="$work/src/criu_$VERSION.orig.tar.xz"
line=$(apt-get "${apt_opts[@]}" -qq source --print-uris criu | grep -F "criu_$VERSION.orig.tar.xz" | head -1)
[ -n "$line" ] || { echo "criu: trixie's criu source has no criu_$VERSION.orig.tar.xz" >&2; exit 1; }
uri=$(echo "$line" | awk '{print $1}' | tr -d "'")
hash=$(echo "$line" | awk '{print $4}')
/usr/lib/apt/apt-helper -o "APT::Sandbox::User=root" download-file "$uri" "$tarball" "$hash" >/dev/null

echo "criu: building into $PREFIX"
tar -C "$work" -xf "$tarball"
cd "$work/criu-$VERSION"
for p in "$HERE"/*.patch; do
  echo "criu: applying $(basename "$p")"
  patch -s -p1 < "$p"
done
make -s -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
install -D -m 0755 criu/criu "$PREFIX/sbin/criu"
echo "$BUILD" > "$PREFIX/BUILD"
works "$PREFIX/sbin/criu" || { "$PREFIX/sbin/criu" check >&2 || true; echo "criu: the built criu fails 'criu check'" >&2; exit 1; }
ln -sf "$PREFIX/sbin/criu" "$LINK"
echo "criu: installed $("$PREFIX/sbin/criu" --version | head -1) at $PREFIX/sbin/criu, linked from $LINK"
