#!/bin/sh
# Install forwarder as a systemd service: a virtualenv with the package under $PREFIX, the
# unit, and an example configuration. Run from the checkout, usually through make:
#
#   make install [PREFIX=/opt/forwarder] [DESTDIR=/staging/root] [PYTHON=python3]
#   (= PREFIX=… DESTDIR=… PYTHON=… sh scripts/install.sh)
#
# Creates:
#   $DESTDIR$PREFIX/venv                         the package and its dependencies (pip install .)
#   $DESTDIR$PREFIX/README.md                    the unit's Documentation=
#   $DESTDIR/etc/systemd/system/forwarder.service
#   $DESTDIR/etc/forwarder/forwarder.toml        only if absent (mode 0640)
# Never creates, reads or overwrites an existing configuration or /etc/forwarder/token.
# Running it again upgrades the package in place. scripts/uninstall.sh undoes it.
set -eu

PREFIX=${PREFIX:-/opt/forwarder}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

case $PREFIX in
/*) ;;
*) die "PREFIX must be an absolute path, got '$PREFIX'" ;;
esac
case $DESTDIR$PREFIX in
*'|'* | *'
'*) die "DESTDIR and PREFIX may not contain '|' or a newline" ;;
esac

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$DESTDIR$PREFIX
VENV=$ROOT/venv
UNIT_DIR=$DESTDIR/etc/systemd/system
CONF_DIR=$DESTDIR/etc/forwarder

# The service runs as a dynamic user: everything it executes must be world-readable, even
# when root's umask is 077.
umask 022

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11+)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is older than Python 3.11"

# Build from a copy of what the package needs: setuptools builds in the source tree, and a
# stale build/ there can carry deleted modules into the wheel.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/forwarder-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM # leave through the EXIT trap instead of carrying on
cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/forwarder" "$SRC/forwarder_sim" "$WORK/"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +

echo "installing forwarder into $VENV"
mkdir -p "$ROOT"
"$PYTHON" -m venv "$VENV" || die "cannot create a virtualenv (Debian/Ubuntu: apt-get install python3-venv)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$WORK"

if [ -n "$DESTDIR" ]; then
    # A staged tree (packaging): the scripts must point at where the venv will finally be.
    for f in "$VENV"/bin/* "$VENV/pyvenv.cfg"; do
        if [ -f "$f" ] && [ ! -h "$f" ] && grep -q "$VENV" "$f" 2>/dev/null; then
            sed "s|$VENV|$PREFIX/venv|g" "$f" >"$WORK/rewrite"
            cat "$WORK/rewrite" >"$f" # keeps the file's mode
        fi
    done
fi

cp "$SRC/README.md" "$ROOT/README.md"
chmod 0644 "$ROOT/README.md"

mkdir -p "$UNIT_DIR"
sed "s|/opt/forwarder|$PREFIX|g" "$SRC/systemd/forwarder.service" >"$UNIT_DIR/forwarder.service"
chmod 0644 "$UNIT_DIR/forwarder.service"
echo "installed $UNIT_DIR/forwarder.service"

if [ ! -d "$CONF_DIR" ]; then
    mkdir -p "$CONF_DIR"
    chmod 0750 "$CONF_DIR" # holds the token: nobody but root needs to list it
fi
if [ -e "$CONF_DIR/forwarder.toml" ]; then
    echo "kept the existing $CONF_DIR/forwarder.toml (the example is $SRC/deploy/forwarder.toml)"
else
    cp "$SRC/deploy/forwarder.toml" "$CONF_DIR/forwarder.toml"
    chmod 0640 "$CONF_DIR/forwarder.toml"
    echo "installed the example configuration $CONF_DIR/forwarder.toml"
fi

if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "ran systemctl daemon-reload"
fi

cat <<EOF

forwarder $("$VENV/bin/python" -c 'import forwarder; print(forwarder.__version__)') is installed. Next steps (as root):

  1. Put the instance token (the JWT from POST /instance/create) in /etc/forwarder/token:
       install -m 0600 /dev/stdin /etc/forwarder/token      # paste it, then Ctrl-D
  2. Edit /etc/forwarder/forwarder.toml (url, events, Redis), then check it. Outside the
     service the token is at /etc/forwarder/token rather than in the credentials directory:
       sed 's|/run/credentials/forwarder.service/|/etc/forwarder/|' /etc/forwarder/forwarder.toml \\
         | $PREFIX/venv/bin/forwarder check-config --config /dev/stdin
  3. systemctl daemon-reload
  4. systemctl enable --now forwarder
     systemctl status forwarder; journalctl -u forwarder -f
     curl -s http://127.0.0.1:9108/status
EOF
