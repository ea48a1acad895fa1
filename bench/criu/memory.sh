# Sourced by the CRIU benches after integration/lib.sh: a container on
# seamless holding dirty anonymous memory.

# Starts container ID holding MB megabytes (10^6 bytes) of base64 text of
# /dev/urandom in a busybox shell variable (random, so neither zstd nor
# chunk dedup flatters anyone) and waits until it is filled. base64 writes
# 4 bytes per 3 (plus a newline per 76): 750,000 random bytes per MB.
start_memory_container() { # id mb
    local id=$1 mb=$2 i rootfs
    rootfs=$ENV_DIR/c/state/io.containerd.runtime.v2.task/$NS/$id/rootfs
    ctrn run -d --null-io --snapshotter seamless "$IMAGE" "$id" /bin/sh -c \
        "x=\$(head -c $((mb * 750000)) /dev/urandom | base64); touch /ready; while true; do sleep 1000; done"
    for ((i = 0; i < 3000; i++)); do
        [[ -e $rootfs/ready ]] && return 0
        sleep 0.1
    done
    env_die "$id did not fill its memory in 300 s"
}
