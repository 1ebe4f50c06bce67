#!/usr/bin/env bash
# Installs what Sluice's build and tests need and the machine lacks:
# Nix (Debian's nix-bin, 2.8 or newer), Nix 2.26 in a Debian trixie chroot
# (scripts/install-nix-2.26.sh), the PostgreSQL server binaries, an
# S3-compatible server for the binary cache's test (PyPI's moto, in a venv
# at /opt/sluice-moto), headless Chromium for the dashboard's test, and the
# rustfmt and clippy components. Installs only as root on Debian/Ubuntu;
# elsewhere it says what is missing and fails.
set -euo pipefail

missing=()
command -v nix-instantiate >/dev/null 2>&1 || missing+=(nix-bin)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: missing ${missing[*]}; install them (Debian: apt-get install -y ${missing[*]}) and rerun" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The tests also run against Nix 2.26 (protocol 1.38).
"$(dirname "$0")/install-nix-2.26.sh"

# The binary cache's S3 test starts moto's S3 server (about 140 MB, 20 s).
moto=${SLUICE_MOTO_DIR:-/opt/sluice-moto}
if [[ ! -x $moto/bin/moto_server ]]; then
    if [[ $(id -u) -ne 0 && ! -w $(dirname "$moto") ]]; then
        echo "install-deps: moto is missing: run as root, or set SLUICE_MOTO_DIR to a writable place" >&2
        exit 1
    fi
    echo "install-deps: installing moto (an S3-compatible server) into $moto" >&2
    rm -rf "$moto"
    /usr/bin/python3 -m venv "$moto"
    "$moto/bin/pip" install -q 'moto[s3]==5.2.5' flask flask-cors
fi

if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
fi
