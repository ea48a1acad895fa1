#!/usr/bin/env bash
# CRIU's frozen time for one container of 1,000 MB of dirty memory, dumped
# four ways back to back, with nothing else running (no watcher, no
# restores in between): runc by hand into /tmp and into the daemon's root,
# `checkpointctl create` (our daemon runs runc), and `ctr tasks checkpoint
# --image-path` (containerd's shim runs runc). Prints CRIU's own frozen,
# memdump and memwrite times of each (stats-dump). It separates what our
# path adds to the dump from what bench/criu/run.sh's sequence adds.
# Environment: SEAMLESS_GRPC_BIN / CHECKPOINTCTL_BIN as for run.sh;
# FROZEN_BENCH_MB [1000]. Needs root, criu, python3, jq.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-bench-frozen
MB=${FROZEN_BENCH_MB:-1000}
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"
# shellcheck source=bench/criu/memory.sh
source "$HERE/memory.sh"
env_up
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
id=frozen-$$
start_memory_container "$id" "$MB"
stats() { python3 "$HERE/read_stats_dump.py" "$1" | jq -r '"frozen \(.frozen_ms) ms, memdump \(.memdump_ms) ms, memwrite \(.memwrite_ms) ms"'; }
by_hand() { # dir
    mkdir -p "$1/img" "$1/work"
    sync
    runc --root "/run/containerd/runc/$NS" checkpoint --image-path "$1/img" --work-path "$1/work" --leave-running "$id"
    echo "runc by hand into $1: $(stats "$1/work")"
    rm -rf "$1"
}
scratch=$(mktemp -d)
by_hand "$scratch/a"
by_hand "$ENV_DIR/seamless/frozen-bench"
sync
checkpointctl create "$id" --memory-limit 64G >/dev/null
echo "checkpointctl create: $(checkpointctl list -o json |
    jq -r '.[-1].process | "frozen \(.frozen_ms) ms, memdump \(.memdump_ms) ms, memwrite \(.memwrite_ms) ms"')"
mkdir -p "$scratch/d"
sync
ctrn tasks checkpoint --image-path "$scratch/d/img" --work-path "$scratch/d/work" "$id" >/dev/null
echo "ctr tasks checkpoint --image-path: $(stats "$scratch/d/work")"
rm -rf "$scratch"
