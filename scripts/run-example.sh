#!/usr/bin/env bash
# The main job, on one machine: builds Sluice, starts the queue runner on its
# embedded PostgreSQL, starts one local builder agent, queues the example
# jobs in examples/jobs.nix and shows their progress and results.
#
# Needs root (the embedded PostgreSQL runs as a system user it creates, and
# the local store is served by `nix-daemon --stdio`). State goes to
# $SLUICE_DATA (default: ./.sluice-data). Status: http://127.0.0.1:9198/status
# With $SLUICE_BIN_DIR set, the executables there are used and nothing is
# built (the tests run this script so, with the binaries they built).
# Stopped (or done), it stops the queue runner with SIGTERM, which stops
# its embedded PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export NIX_CONFIG=$'build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command ca-derivations'
if [[ -n ${SLUICE_BIN_DIR:-} ]]; then
    bin=$SLUICE_BIN_DIR
else
    cargo build --release --locked -p sluice-queue-runner -p sluice-builder-agent
    bin=target/release
fi

data=${SLUICE_DATA:-$PWD/.sluice-data}
mkdir -p "$data"
token_file="$data/agent-tokens"
[[ -s $token_file ]] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token_file"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$bin"/queue-runner serve --data-dir "$data" --agent-token-file "$token_file" \
    --grpc-listen 127.0.0.1:50051 --http-listen 127.0.0.1:9198 &
pids+=($!)

# Wait for the embedded database and the gRPC port.
for _ in $(seq 1 120); do
    curl -fs http://127.0.0.1:9198/status >/dev/null 2>&1 && break
    sleep 0.5
done
curl -fs http://127.0.0.1:9198/status >/dev/null || { echo "queue runner did not come up" >&2; exit 1; }

"$bin"/builder-agent --queue-runner http://127.0.0.1:50051 --token-file "$token_file" \
    --name local --max-jobs 2 &
pids+=($!)

nonce=$(date +%s)
jobs=()
for attr in base left right top; do
    drv=$(nix-instantiate examples/jobs.nix -A "$attr" --argstr nonce "$nonce" 2>/dev/null)
    jobs+=(--job "$attr" "$drv")
done
"$bin"/queue-runner submit --data-dir "$data" --project examples --jobset jobs --wait "${jobs[@]}"
echo
echo "status:   $(curl -fs http://127.0.0.1:9198/status)"
echo "logs:     $data/build-logs/"
