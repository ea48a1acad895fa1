#!/usr/bin/env bash
# One container of 1,000 MB of dirty memory, checkpointed once and restored
# twice by checkpointctl with nothing else running, and how the daemon's
# time splits: CRIU's dump, chunking (hash, zstd, write) and the storage's
# flush for create; fetching and unpacking the images, then containerd,
# runc and CRIU for restore. What run.sh measures against ctr, taken apart.
# Environment: SEAMLESS_GRPC_BIN / CHECKPOINTCTL_BIN as for run.sh;
# ISOLATED_BENCH_MB [1000]. Needs root, criu, jq, bc.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-bench-isolated
MB=${ISOLATED_BENCH_MB:-1000}
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"
# shellcheck source=bench/criu/memory.sh
source "$HERE/memory.sh"
env_up
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
id=isolated-$$
start_memory_container "$id" "$MB"
log=$ENV_DIR/seamless.log
field() { grep -o "$1=[0-9.]*" | head -1 | cut -d= -f2; } # name < line
now() { date +%s.%N; }

sync
t0=$(now)
checkpoint=$(checkpointctl create "$id" --memory-limit 64G)
t1=$(now)
frozen=$(checkpointctl list -o json | jq '.[-1].process.frozen_ms')
dumped=$(grep "processes dumped" "$log" | tail -1 | field seconds)
chunks=$(grep "chunks stored" "$log" | tail -1)
echo "create: $(echo "$t1 - $t0" | bc) s (CRIU frozen $frozen ms; dump done after $dumped s;" \
    "chunking $(field split_seconds <<<"$chunks") s, flush $(field sync_seconds <<<"$chunks") s)"
for n in 1 2; do
    sync
    t0=$(now)
    checkpointctl restore "$checkpoint" --name "$id-r$n" --resume >/dev/null
    t1=$(now)
    restored=$(grep "checkpoint restored" "$log" | tail -1)
    echo "restore $n: $(echo "$t1 - $t0" | bc) s (daemon $(field seconds <<<"$restored") s," \
        "of which fetch and unpack $(field fetch_seconds <<<"$restored") s)"
    ctrn tasks kill -s KILL "$id-r$n" >/dev/null
    for ((i = 0; i < 100; i++)); do
        ctrn tasks delete "$id-r$n" >/dev/null 2>&1 && break
        sleep 0.1
    done
    ctrn containers delete "$id-r$n" >/dev/null
done
