#!/usr/bin/env bash
# The main job, end to end on this machine: a private registry and containerd
# with the `seamless` snapshotter; a container that keeps writing runs on it
# and is committed seamlessly to the registry (pause printed), then the
# committed image is pulled and run. Everything is torn down at the end.
# Needs root and what .ci/setup installs.
set -euo pipefail
# shellcheck source=integration/lib.sh
source "$(dirname "$0")/lib.sh"

env_up
env_log "containerd reaches the daemon as proxy plugin 'seamless':"
ctrn plugins ls | grep -E "TYPE|seamless"

env_log "ctr images pull --snapshotter seamless $IMAGE"
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
ctrn run -d --null-io --snapshotter seamless "$IMAGE" demo1 \
    /bin/sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tick.new; mv /tick.new /tick; done'
ctrn tasks exec --exec-id write demo1 /bin/sh -c 'echo written-in-the-container > /data.txt'
env_log "the container runs on the daemon's storage:"
grep -E "snapshotter ready" "$ENV_DIR/seamless.log" | sed 's/^/    /'
ctrn snapshots --snapshotter seamless ls

TARGET=$REGISTRY/seamless-demo-committed:1
env_log "checkpointctl seamless-commit --container demo1 --target $TARGET --format oci --wait"
checkpointctl seamless-commit --container demo1 --target "$TARGET" --format oci \
    --target-insecure --source-insecure --wait

rootfs=$ENV_DIR/c/state/io.containerd.runtime.v2.task/$NS/demo1/rootfs
env_log "the container kept running: its tick is now $(cat "$rootfs/tick")"
ctrn tasks kill -s KILL demo1 >/dev/null

env_log "pull and run the committed image ($TARGET) on seamless:"
ctrn images pull --plain-http --snapshotter seamless "$TARGET" >/dev/null
ctrn run --rm --snapshotter seamless "$TARGET" demo2 /bin/sh -c 'echo "    /data.txt: $(cat /data.txt)"; echo "    /tick at commit time: $(cat /tick)"'
