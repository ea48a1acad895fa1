#!/usr/bin/env bash
# Container cold start from a Nydus image on seamless against the same image
# as OCI on containerd's built-in overlayfs, interleaved in one run.
#
# One container writes a payload (STARTUP_MB MiB in STARTUP_FILES files) and
# is committed twice, as OCI (--format oci) and as Nydus (RAFS v6,
# lz4_block), so both images hold the same tree. Then, per iteration and
# kind: pull (ctr images pull for OCI; integration/rpull, which passes the
# CRI labels a remote snapshotter needs, for Nydus), run a container that
# reads one file and exits; timed from the pull to the container's exit.
# The image and its content are removed after each start (cold again; the
# daemon drops the blobs and their chunk cache with the layers).
#
# NYDUS_FS_DRIVER [auto] is the daemon's [nydus] fs_driver: "auto" serves
# these lz4 blobs over FUSE, reading chunks from the registry as files are
# read; "erofs" fetches each blob whole and mounts it with the kernel.
#
# Environment: STARTUP_ITERS [10], STARTUP_MB [256], STARTUP_FILES [2000],
# NYDUS_FS_DRIVER [auto],
# SEAMLESS_GRPC_BIN / CHECKPOINTCTL_BIN (integration/lib.sh: target/debug).
# Needs root and what integration/lib.sh needs, plus golang-go and
# golang-github-containerd-containerd-dev (to build rpull offline).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-startup
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"

ITERS=${STARTUP_ITERS:-10}
DRIVER=${NYDUS_FS_DRIVER:-auto}
MB=${STARTUP_MB:-256}
FILES=${STARTUP_FILES:-2000}
die() { echo "nydus-start: $*" >&2; exit 1; }
for v in ITERS MB FILES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ $DRIVER =~ ^(auto|erofs|fuse)$ ]] || die "NYDUS_FS_DRIVER must be auto, erofs or fuse, got '$DRIVER'"
command -v go >/dev/null || die "go not found: apt-get install golang-go"
[[ -d /usr/share/gocode/src/github.com/containerd/containerd ]] ||
    die "containerd Go sources missing: apt-get install golang-github-containerd-containerd-dev"

SEAMLESS_CONFIG=$(mktemp /tmp/nydus-start-config.XXXXXX)
printf 'version = 1\n[nydus]\nfs_driver = "%s"\n' "$DRIVER" >"$SEAMLESS_CONFIG"
export SEAMLESS_CONFIG
env_up
env_build_rpull

env_log "writing ${MB} MiB in $FILES files into a container and committing it as OCI and as Nydus"
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
ctrn run -d --null-io --snapshotter seamless "$IMAGE" payload /bin/sh -c 'while true; do sleep 1; done'
per_file=$((MB * 1024 / FILES))
[[ $per_file -ge 1 ]] || die "STARTUP_MB / STARTUP_FILES is below 1 KiB per file"
ctrn tasks exec --exec-id fill payload /bin/sh -c "i=0; while [ \$i -lt $FILES ]; do
    d=/payload/d\$((i % 50)); mkdir -p \$d
    head -c $((per_file * 1024)) /dev/urandom > \$d/f\$i; i=\$((i + 1)); done; sync"
OCI=$REGISTRY/startup:oci
NYDUS=$REGISTRY/startup:nydus
checkpointctl seamless-commit --container payload --target "$OCI" --format oci --compressor zstd \
    --target-insecure --source-insecure --wait >/dev/null
checkpointctl seamless-commit --container payload --target "$NYDUS" --format nydus \
    --target-insecure --source-insecure --wait >/dev/null
ctrn tasks kill -s KILL payload >/dev/null
ctrn tasks delete payload >/dev/null 2>&1 || sleep 1
ctrn tasks delete payload >/dev/null 2>&1 || true
ctrn containers delete payload >/dev/null
ctrn images rm --sync "$IMAGE" >/dev/null

now() { date +%s.%N; }
start_oci() {
    ctrn images pull --plain-http --snapshotter overlayfs "$OCI" >/dev/null
    ctrn run --rm --snapshotter overlayfs "$OCI" "oci-$1" /bin/sh -c 'cat /payload/d7/f7 >/dev/null'
}
start_nydus() {
    "$RPULL" --address "$ENV_DIR/c.sock" --namespace "$NS" --snapshotter seamless --plain-http "$NYDUS" >/dev/null
    ctrn run --rm --snapshotter seamless "$NYDUS" "nydus-$1" /bin/sh -c 'cat /payload/d7/f7 >/dev/null'
}
samples=$ENV_DIR/samples.tsv
for ((i = 0; i < ITERS; i++)); do
    for kind in oci nydus; do
        t0=$(now)
        "start_$kind" "$i"
        t1=$(now)
        echo -e "$kind\t$(echo "$t1 - $t0" | bc)" >>"$samples"
        ref=$OCI
        [[ $kind == nydus ]] && ref=$NYDUS
        ctrn images rm --sync "$ref" >/dev/null
    done
done
median() { grep "^$1" "$samples" | cut -f2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
oci=$(median oci)
nydus=$(median nydus)
echo "cold start (pull + run to exit) of a ${MB} MiB, $FILES-file image, $ITERS interleaved iterations, median seconds"
printf '%-44s %8.3f s\n' "OCI (zstd) on overlayfs (ctr pull + run)" "$oci"
printf '%-44s %8.3f s\n' "Nydus RAFS v6 lz4 on seamless, $DRIVER (rpull + run)" "$nydus"
printf 'nydus/oci ratio: %.2f\n' "$(echo "$nydus / $oci" | bc -l)"
rm -f "$SEAMLESS_CONFIG"
