#!/usr/bin/env bash
# Reading a Nydus image's files, in one run: the image served lazily over FUSE
# (RAFS v6, lz4_block, chunks read from the registry as files are read), the
# same files as an uncompressed RAFS v6 image mounted with the kernel's erofs
# (blobs fetched whole when the container starts), and the same files as an
# OCI image on containerd's built-in overlayfs (the peer). Then the stall a
# container reading a FUSE-served image sees while the daemon is restarted,
# upgraded (a copy of its binary started from another path, whose serving
# process replaces the old one), and while its serving process is killed.
#
# One container writes a payload (SERVE_MB MiB in SERVE_FILES files) and is
# committed three times: OCI (zstd), Nydus lz4_block, Nydus uncompressed; the
# daemon runs with fs_driver "auto", which serves the first Nydus image over
# FUSE and mounts the second with erofs. Per kind: pull (ctr for OCI,
# integration/rpull for Nydus), run a container, then from the host, through
# /proc/<pid>/root, read every file once (cold: nothing read before; for FUSE
# every chunk comes from the registry), drop the page cache, and read them
# again (warm: FUSE's chunk cache and erofs's blob cache are on disk).
# Printed: throughput (MB/s) and the median and worst time to a file's first
# byte, with ratios against OCI on overlayfs.
#
# Stall: a reader loops over the FUSE image's files (page cache dropped after
# each file, so each read reaches the serving process) and logs each file's
# read time; the worst read in the window of each event is compared with the
# worst read of a quiet window of the same length before it.
#
# Environment: SERVE_MB [256], SERVE_FILES [1000], SEAMLESS_GRPC_BIN /
# CHECKPOINTCTL_BIN (integration/lib.sh: target/debug; use release builds).
# Needs root, what integration/lib.sh needs, python3, golang-go and
# golang-github-containerd-containerd-dev (to build rpull offline).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-serve
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"

MB=${SERVE_MB:-256}
FILES=${SERVE_FILES:-1000}
die() { echo "nydus-serve: $*" >&2; exit 1; }
for v in MB FILES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
command -v go >/dev/null || die "go not found: apt-get install golang-go"
command -v python3 >/dev/null || die "python3 not found"

SEAMLESS_CONFIG=$(mktemp /tmp/nydus-serve-config.XXXXXX)
printf 'version = 1\n[nydus]\nfs_driver = "auto"\n' >"$SEAMLESS_CONFIG"
export SEAMLESS_CONFIG
env_up
env_build_rpull

env_log "writing ${MB} MiB in $FILES files into a container; committing it as OCI, Nydus lz4 and Nydus uncompressed"
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
ctrn run -d --null-io --snapshotter seamless "$IMAGE" payload /bin/sh -c 'while true; do sleep 1; done'
per_file=$((MB * 1024 / FILES))
[[ $per_file -ge 1 ]] || die "SERVE_MB / SERVE_FILES is below 1 KiB per file"
ctrn tasks exec --exec-id fill payload /bin/sh -c "i=0; while [ \$i -lt $FILES ]; do
    d=/payload/d\$((i % 50)); mkdir -p \$d
    head -c $((per_file * 1024)) /dev/urandom > \$d/f\$i; i=\$((i + 1)); done; sync"
OCI=$REGISTRY/serve:oci
FUSE=$REGISTRY/serve:nydus-lz4
EROFS=$REGISTRY/serve:nydus-none
commit() { # target, args...
    local target=$1
    shift
    checkpointctl seamless-commit --container payload --target "$target" "$@" \
        --target-insecure --source-insecure --wait >/dev/null
}
commit "$OCI" --format oci --compressor zstd
commit "$FUSE" --format nydus --compressor lz4_block
commit "$EROFS" --format nydus --compressor none
ctrn tasks kill -s KILL payload >/dev/null
ctrn tasks delete payload >/dev/null 2>&1 || sleep 1
ctrn tasks delete payload >/dev/null 2>&1 || true
ctrn containers delete payload >/dev/null
ctrn images rm --sync "$IMAGE" >/dev/null

pid_of() { ctrn tasks ls | awk -v id="$1" '$1 == id {print $2}'; }
results=$ENV_DIR/results
mkdir -p "$results"
for kind in oci fuse erofs; do
    case $kind in
    oci)
        ctrn images pull --plain-http --snapshotter overlayfs "$OCI" >/dev/null
        ctrn run -d --null-io --snapshotter overlayfs "$OCI" "read-$kind" /bin/sh -c 'while true; do sleep 1; done'
        ;;
    fuse | erofs)
        ref=$FUSE
        [[ $kind == erofs ]] && ref=$EROFS
        "$RPULL" --address "$ENV_DIR/c.sock" --namespace "$NS" --snapshotter seamless --plain-http "$ref" >/dev/null
        ctrn run -d --null-io --snapshotter seamless "$ref" "read-$kind" /bin/sh -c 'while true; do sleep 1; done'
        ;;
    esac
    pid=$(pid_of "read-$kind")
    [[ -n $pid ]] || die "no task for read-$kind"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    python3 "$HERE/read.py" pass "/proc/$pid/root" /payload >"$results/$kind.cold"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    python3 "$HERE/read.py" pass "/proc/$pid/root" /payload >"$results/$kind.warm"
done
checkpointctl mounts >"$results/mounts"
grep -q "fuse\|served" "$results/mounts" || die "the lz4 image is not served over FUSE:
$(cat "$results/mounts")"
grep -q "mounted" "$results/mounts" || die "the uncompressed image is not mounted with erofs:
$(cat "$results/mounts")"

# The stall: a reader of the FUSE image through each event.
pid=$(pid_of read-fuse)
log=$ENV_DIR/stall.log
stop=$ENV_DIR/stall.stop
python3 "$HERE/read.py" loop "/proc/$pid/root" /payload "$log" "$stop" &
READER=$!
restart_daemon() { # binary
    env_stop seamless
    env_start seamless "$1" --root "$ENV_DIR/seamless" --address "$ENV_DIR/s.sock" \
        --containerd-address "$ENV_DIR/c.sock" --log-level info --config "$SEAMLESS_CONFIG"
    env_wait "containerd-seamless-grpc" 30 "${ENV_PIDS[seamless]}" test -S "$ENV_DIR/s.sock"
}
server_pid() { pgrep -f "serve-rafs --dir $ENV_DIR/seamless/nydus/servers" | head -1; }
UPGRADED=$ENV_DIR/upgrade/containerd-seamless-grpc
mkdir -p "$(dirname "$UPGRADED")"
cp "$SEAMLESS_BIN" "$UPGRADED"
events=$ENV_DIR/events
: >"$events"
sleep 3
for event in restart upgrade kill-server; do
    t0=$(date +%s.%N)
    case $event in
    restart) restart_daemon "$SEAMLESS_BIN" ;;
    upgrade) restart_daemon "$UPGRADED" ;;
    kill-server)
        old=$(server_pid)
        kill -KILL "$old"
        for ((i = 0; i < 100; i++)); do
            new=$(server_pid)
            [[ -n $new && $new != "$old" ]] && break
            sleep 0.05
        done
        ;;
    esac
    t1=$(date +%s.%N)
    echo "$event $t0 $t1" >>"$events"
    sleep 3
done
touch "$stop"
wait "$READER" || die "the reader failed: $(grep error "$log" | head -3)"

python3 - "$results" "$log" "$events" "$MB" "$FILES" <<'EOF'
import json, sys
results, log, events, mb, files = sys.argv[1:]
load = lambda name: json.load(open(f"{results}/{name}"))
print(f"reading {mb} MiB in {files} files of a container's image, from the host through /proc/<pid>/root")
print(f"{'':34} {'MB/s':>8} {'ratio':>6} {'1st byte med ms':>16} {'ratio':>6} {'1st byte max ms':>16}")
for phase in ["cold", "warm"]:
    oci = load(f"oci.{phase}")
    oci_rate = oci["bytes"] / oci["seconds"] / 1e6
    for kind, label in [("oci", "OCI zstd on overlayfs"), ("fuse", "Nydus lz4 over FUSE (lazy)"), ("erofs", "Nydus uncompressed on erofs")]:
        r = load(f"{kind}.{phase}")
        rate = r["bytes"] / r["seconds"] / 1e6
        print(f"{phase + ': ' + label:34} {rate:8.1f} {rate / oci_rate:6.2f} {r['first_byte_median_ms']:16.3f} "
              f"{r['first_byte_median_ms'] / oci['first_byte_median_ms']:6.2f} {r['first_byte_max_ms']:16.1f}")
reads = []
for line in open(log):
    start, seconds = line.split()
    reads.append((float(start), float(seconds)))
print()
print("stall of a reader of the FUSE image (each file read with its page cache dropped), worst single read")
print(f"{'event':12} {'event ms':>9} {'reads':>6} {'worst ms':>9} {'quiet worst ms':>15} {'ratio':>6}")
for line in open(events):
    name, t0, t1 = line.split()
    t0, t1 = float(t0), float(t1)
    # The event's window: reads that started in it or were under way at it.
    during = [s for (start, s) in reads if start + s >= t0 and start <= t1 + 0.5]
    quiet = [s for (start, s) in reads if t0 - 2.5 <= start + s < t0]
    worst, calm = max(during, default=0) * 1000, max(quiet, default=0) * 1000
    print(f"{name:12} {(t1 - t0) * 1000:9.0f} {len(during):6} {worst:9.1f} {calm:15.1f} {worst / calm if calm else 0:6.1f}")
print(f"{len(reads)} reads, none failed")
EOF
rm -f "$SEAMLESS_CONFIG"
