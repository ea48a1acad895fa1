#!/usr/bin/env bash
# Installs what `cargo build --release` built: the daemon, checkpointctl,
# the daemon's configuration (kept if one is there) and its systemd unit.
# Also links `nydusify` to checkpointctl, so that scripts written for
# `nydusify seamless-commit` work, but only where no other nydusify exists:
# one on PATH or at the link's place is never replaced.
#
#   bash packaging/install.sh            # into /usr/local/bin, /etc
#   DESTDIR=/tmp/stage bash packaging/install.sh
#   BINDIR=/opt/bin BUILD=target/debug bash packaging/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
BINDIR=${BINDIR:-/usr/local/bin}
CONFDIR=${CONFDIR:-/etc/containerd-seamless}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BUILD=${BUILD:-target/release}

for bin in containerd-seamless-grpc checkpointctl docker-checkpoint; do
  if [ ! -x "$BUILD/$bin" ]; then
    echo "install: $BUILD/$bin is missing: run cargo build --release first" >&2
    exit 1
  fi
done

install -d "$DESTDIR$BINDIR" "$DESTDIR$CONFDIR" "$DESTDIR$UNITDIR"
install -m 0755 "$BUILD/containerd-seamless-grpc" "$BUILD/checkpointctl" "$BUILD/docker-checkpoint" "$DESTDIR$BINDIR/"
if [ -e "$DESTDIR$CONFDIR/config.toml" ]; then
  echo "install: keeping $DESTDIR$CONFDIR/config.toml"
else
  install -m 0644 packaging/config.toml "$DESTDIR$CONFDIR/config.toml"
fi
install -m 0644 packaging/containerd-seamless-grpc.service "$DESTDIR$UNITDIR/"

link="$DESTDIR$BINDIR/nydusify"
if [ -L "$link" ] && [ "$(readlink "$link")" = checkpointctl ]; then
  echo "install: $link already answers as checkpointctl"
elif [ -e "$link" ] || [ -L "$link" ]; then
  echo "install: $link exists and is not ours: left as it is"
elif other=$(command -v nydusify 2>/dev/null); then
  echo "install: nydusify is already at $other: no link made"
else
  ln -s checkpointctl "$link"
  echo "install: $link -> checkpointctl (nydusify seamless-commit, nydusify version)"
fi
