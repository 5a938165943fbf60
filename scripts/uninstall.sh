#!/bin/sh
# Remove what scripts/install.sh created:
#   $DESTDIR$PREFIX/venv, $DESTDIR$PREFIX/README.md (and $PREFIX itself if then empty),
#   $DESTDIR/etc/systemd/system/forwarder.service.
# Kept on purpose:
#   /etc/forwarder/forwarder.toml and /etc/forwarder/token (your configuration and secret);
#   /var/lib/private/forwarder (the service's state directory: it may hold frames that were
#   never written to Redis).
#
#   make uninstall [PREFIX=/opt/forwarder] [DESTDIR=/staging/root]
set -eu

PREFIX=${PREFIX:-/opt/forwarder}
DESTDIR=${DESTDIR:-}

case $PREFIX in
/*) ;;
*)
    echo "uninstall.sh: PREFIX must be an absolute path, got '$PREFIX'" >&2
    exit 1
    ;;
esac

ROOT=$DESTDIR$PREFIX
UNIT=$DESTDIR/etc/systemd/system/forwarder.service
LIVE=
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then
    LIVE=yes
fi

if [ -n "$LIVE" ] && [ -e "$UNIT" ]; then
    # Stop it before its program disappears; the drain to Redis runs as on any stop.
    systemctl disable --now forwarder.service || true
fi

if [ -e "$UNIT" ]; then
    rm -f "$UNIT"
    echo "removed $UNIT"
fi

# Only a directory that is recognisably a virtualenv is removed (PREFIX could be /usr/local).
if [ -f "$ROOT/venv/pyvenv.cfg" ]; then
    rm -rf "$ROOT/venv"
    echo "removed $ROOT/venv"
elif [ -e "$ROOT/venv" ]; then
    echo "uninstall.sh: $ROOT/venv is not a virtualenv: left alone" >&2
fi
rm -f "$ROOT/README.md"
rmdir "$ROOT" 2>/dev/null || true

if [ -n "$LIVE" ]; then
    systemctl daemon-reload
fi

echo "kept $DESTDIR/etc/forwarder (configuration and token): remove it yourself if you wish"
