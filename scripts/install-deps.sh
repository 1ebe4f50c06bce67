#!/usr/bin/env bash
# Installs what Sluice's build and tests need and the machine lacks:
# Nix (Debian's nix-bin, 2.8 or newer), Nix 2.26 in a Debian trixie chroot
# (scripts/install-nix-2.26.sh), the PostgreSQL server binaries, and the
# rustfmt and clippy components. Installs only as root on Debian/Ubuntu;
# elsewhere it says what is missing and fails.
set -euo pipefail

missing=()
command -v nix-instantiate >/dev/null 2>&1 || missing+=(nix-bin)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)

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

if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
fi
