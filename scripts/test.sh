#!/usr/bin/env bash
# The one test command: installs what is missing, then runs formatting and
# lint checks and every test of the workspace against a real PostgreSQL and
# a real Nix (the system's, and Nix 2.26 in the chroot that install-deps.sh
# sets up). Tests that use mount namespaces (isolated builder stores, the
# Nix 2.26 chroot) need root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# Incremental caches only pay off across edits; a test run does not edit, and
# they would double the target directory on a disk that CI shares.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
df -h . | sed 's/^/disk: /'
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The command-line tests run both executables, whichever package's tests
# are running: build every binary first.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
