#!/usr/bin/env bash
# Incremental checkpoints against full copies, interleaved in one run.
#
# A container on seamless holds a tree of BENCH_MB MiB in BENCH_FILES files
# (random data, so compression does not flatter anyone). Then, CHECKPOINTS
# times: 1% of the files is rewritten inside the container, and
#   - ours: `checkpointctl create` with the previous checkpoint as parent
#     (the first one whole): a pause of milliseconds, then only the changed
#     files are read and stored;
#   - peer: a full copy of the same tree, `tar | zstd -3`, as a classic
#     filesystem checkpoint stores it every time (not even paused, which
#     flatters it).
# Each create and copy is timed; storage is what each keeps in the end
# (du of the checkpoint storage; the sum of the full copies, which are
# deleted once measured so the disk does not fill).
#
# Environment: BENCH_MB [1024], BENCH_FILES [1000], CHECKPOINTS [50],
# SEAMLESS_GRPC_BIN / CHECKPOINTCTL_BIN (integration/lib.sh: target/debug).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-bench-cp
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"

MB=${BENCH_MB:-1024}
FILES=${BENCH_FILES:-1000}
COUNT=${CHECKPOINTS:-50}
die() { echo "checkpoints bench: $*" >&2; exit 1; }
for v in MB FILES COUNT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
command -v zstd >/dev/null || die "zstd not found: apt-get install zstd"
CHANGED=$(( (FILES + 99) / 100 ))
per_file=$((MB * 1024 / FILES))
[[ $per_file -ge 1 ]] || die "BENCH_MB / BENCH_FILES is below 1 KiB per file"

env_up
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
ctrn run -d --null-io --snapshotter seamless "$IMAGE" bench /bin/sh -c 'while true; do sleep 1; done'
env_log "writing $MB MiB in $FILES files into the container"
ctrn tasks exec --exec-id fill bench /bin/sh -c "i=0; while [ \$i -lt $FILES ]; do
    d=/data/d\$((i % 20)); mkdir -p \$d
    head -c $((per_file * 1024)) /dev/urandom > \$d/f\$i; i=\$((i + 1)); done; sync"
ROOTFS=$ENV_DIR/c/state/io.containerd.runtime.v2.task/$NS/bench/rootfs
[[ -d $ROOTFS/data ]] || die "the container's root is not at $ROOTFS"
FULL=$ENV_DIR/full
mkdir -p "$FULL"

now() { date +%s.%N; }
samples=$ENV_DIR/samples.tsv
parent=""
peer_bytes=0
for ((i = 0; i < COUNT; i++)); do
    if [[ $i -gt 0 ]]; then
        ctrn tasks exec --exec-id "change$i" bench /bin/sh -c "j=0; while [ \$j -lt $CHANGED ]; do
            k=\$(( ($i * $CHANGED + \$j) % $FILES )); head -c $((per_file * 1024)) /dev/urandom > /data/d\$((k % 20))/f\$k
            j=\$((j + 1)); done; sync"
    fi
    t0=$(now)
    if [[ -z $parent ]]; then
        id=$(checkpointctl create bench)
    else
        id=$(checkpointctl create bench --parent "$parent")
    fi
    t1=$(now)
    tar -C "$ROOTFS" -cf - data | zstd -3 -q -T1 -o "$FULL/$i.tar.zst"
    t2=$(now)
    peer_bytes=$((peer_bytes + $(stat -c %s "$FULL/$i.tar.zst")))
    rm -f "$FULL/$i.tar.zst"
    echo -e "ours\t$i\t$(echo "$t1 - $t0" | bc)" >>"$samples"
    echo -e "peer\t$i\t$(echo "$t2 - $t1" | bc)" >>"$samples"
    parent=$id
done
ours_bytes=$(du -sb "$ENV_DIR/seamless/checkpoints" | cut -f1)

# The first checkpoint of each kind is whole; the rest is what a loop of
# checkpoints costs.
stat_of() { # kind field(median|p90|first)
    local col
    col=$(grep "^$1" "$samples" | awk -F'\t' '$2 > 0 {print $3}' | sort -n)
    case $2 in
        median) echo "$col" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}' ;;
        p90) echo "$col" | awk '{a[NR]=$1} END {i=int(NR*0.9+0.5); if (i<1) i=1; print a[i]}' ;;
        first) grep "^$1	0	" "$samples" | cut -f3 ;;
    esac
}
echo "checkpoints of a container changing 1% ($CHANGED of $FILES files) of a $MB MiB tree between $COUNT checkpoints"
printf '%-46s %10s %10s %10s\n' "" "first" "median" "p90"
printf '%-46s %9.3fs %9.3fs %9.3fs\n' "ours: checkpointctl create --parent (zstd)" \
    "$(stat_of ours first)" "$(stat_of ours median)" "$(stat_of ours p90)"
printf '%-46s %9.3fs %9.3fs %9.3fs\n' "peer: full copy, tar | zstd -3" \
    "$(stat_of peer first)" "$(stat_of peer median)" "$(stat_of peer p90)"
printf 'create latency ratio ours/peer (median of incremental): %.3f\n' \
    "$(echo "$(stat_of ours median) / $(stat_of peer median)" | bc -l)"
printf 'storage: ours %s MiB, peer %s MiB, ratio %.3f\n' "$((ours_bytes >> 20))" "$((peer_bytes >> 20))" \
    "$(echo "$ours_bytes / $peer_bytes" | bc -l)"
