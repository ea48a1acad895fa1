#!/usr/bin/env bash
# The main job, end to end on this machine: a private registry and containerd
# with the `seamless` snapshotter, a test image pushed and pulled through it, a
# container run on it that writes to its root filesystem. Everything is torn
# down at the end. Needs root and what .ci/setup installs.
set -euo pipefail
# shellcheck source=integration/lib.sh
source "$(dirname "$0")/lib.sh"

env_up
env_log "containerd reaches the daemon as proxy plugin 'seamless':"
ctrn plugins ls | grep -E "TYPE|seamless"

env_log "ctr images pull --snapshotter seamless $IMAGE"
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
ctrn run -d --snapshotter seamless "$IMAGE" demo1 /bin/sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tick; sleep 0.1; done'
sleep 1
ctrn tasks exec --exec-id write demo1 /bin/sh -c 'echo written-in-the-container > /data.txt'
env_log "the container runs on the daemon's storage:"
grep -E "snapshotter ready|serving" "$ENV_DIR/seamless.log" | sed 's/^/    /'
env_log "its snapshots (ctr snapshots --snapshotter seamless ls):"
ctrn snapshots --snapshotter seamless ls
upper=$(find "$ENV_DIR/seamless" -path '*/snapshots/*/fs/data.txt' -print -quit)
[[ -n $upper ]] || env_die "the container's write is not in the daemon's storage"
env_log "the container's write landed in its writable layer: $upper = $(cat "$upper")"
env_log "tick counter inside the container: $(ctrn tasks exec --exec-id read demo1 cat /tick 2>/dev/null || echo '?')"
echo
echo "Seamless commit of this container to the registry (checkpointctl seamless-commit, with the"
echo "pause printed) is not implemented yet; this demo stops at running it on the snapshotter."
ctrn tasks kill -s KILL demo1 >/dev/null
