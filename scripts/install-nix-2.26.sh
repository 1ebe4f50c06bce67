#!/usr/bin/env bash
# Sets up Nix 2.26 (daemon protocol 1.38) beside the system's Nix, for the
# tests that run against a current Nix: a Debian trixie chroot with its
# nix-bin (2.26.x) at $SLUICE_TRIXIE_ROOT (default /srv/trixie). The tests
# start `chroot <root> nix-daemon` in a private mount namespace with the
# store bind-mounted over <root>/nix; nothing outside the chroot changes.
#
# Idempotent: does nothing when the chroot already has nix-bin 2.26. A
# half-made chroot (an interrupted run) is built again from scratch, in a
# scratch directory that is moved into place only when complete. Needs root
# and apt-get (it installs debootstrap when missing). The Debian mirror is
# the one this machine's apt uses, or $SLUICE_TRIXIE_MIRROR.
set -euo pipefail

root=${SLUICE_TRIXIE_ROOT:-/srv/trixie}
want=2.26

installed_version() {
    [[ -x $1/usr/bin/nix-daemon ]] || return 0
    chroot "$1" dpkg-query -W -f='${Version}' nix-bin 2>/dev/null || true
}

case $(installed_version "$root") in
"$want".*)
    exit 0
    ;;
esac

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-nix-2.26: $root has no nix-bin $want; run this script as root on Debian or Ubuntu to set it up" >&2
    exit 1
fi
if [[ -e $root ]] && ! rmdir "$root" 2>/dev/null; then
    echo "install-nix-2.26: $root exists, is not empty, and has no nix-bin $want (found: '$(installed_version "$root")'); remove it and rerun" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "install-nix-2.26: installing debootstrap" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

mirror=${SLUICE_TRIXIE_MIRROR:-}
if [[ -z $mirror ]]; then
    # deb822 sources first, then the one-line format.
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [[ -z $mirror ]]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -n 's/\[[^]]*\]//; s/^deb[[:space:]]\+\([^[:space:]]\+\).*/\1/p' | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

scratch=$root.partial
if [[ -e $scratch ]]; then
    # Left by an interrupted run; debootstrap may have left proc or sys
    # mounted in it.
    for m in proc sys dev/pts dev; do
        umount -l "$scratch/$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$scratch"
fi
mkdir -p "$(dirname "$root")"

echo "install-nix-2.26: debootstrap trixie into $scratch from $mirror" >&2
debootstrap --variant=minbase trixie "$scratch" "$mirror" >"$scratch.log" 2>&1 || {
    echo "install-nix-2.26: debootstrap failed; its log:" >&2
    tail -n 30 "$scratch.log" >&2
    exit 1
}
echo "install-nix-2.26: installing nix-bin in the chroot" >&2
chroot "$scratch" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-bin' \
    >>"$scratch.log" 2>&1 || {
    echo "install-nix-2.26: installing nix-bin in the chroot failed; its log:" >&2
    tail -n 30 "$scratch.log" >&2
    exit 1
}
# Mount points for the store, /proc and /dev (see crates/test-support).
mkdir -p "$scratch/nix" "$scratch/proc" "$scratch/dev"
chroot "$scratch" apt-get clean

got=$(installed_version "$scratch")
case $got in
"$want".*) ;;
*)
    echo "install-nix-2.26: trixie's nix-bin is '$got', not $want.x" >&2
    exit 1
    ;;
esac
mv "$scratch" "$root"
rm -f "$scratch.log"
echo "install-nix-2.26: Nix $got is in $root" >&2
