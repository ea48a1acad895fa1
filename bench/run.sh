#!/usr/bin/env bash
# Compares the seamless proxy snapshotter with containerd's built-in overlayfs
# inside ONE private containerd, runs interleaved (A, B, A, B ...), and prints
# median, p90 and the ratio seamless/overlayfs for:
#   snapcycle  Prepare, Mounts, Commit, Remove (+ synchronous GC) through
#              containerd's snapshots API (bench/snapcycle)
#   unpack     unpacking a 5-layer image already in the content store
#              (bench/unpack)
#   start      ctr run --rm IMAGE ID true
#   pull       ctr images pull from a local registry (fetch + unpack)
#
# Everything lives in a temp dir (registry, containerd, daemon) and is torn
# down on exit. Needs root. See BENCHMARKS.md for what each number means.
#
# Environment:
#   BENCH_ITERS         measured iterations per snapshotter for start, unpack
#                       and pull (default 30); snapcycle runs 10x as many
#   BENCH_CYCLES        override snapcycle's cycle count
#   BENCH_SNAPSHOTTERS  space-separated, the first is the peer every ratio is
#                       against (default "overlayfs seamless"); "overlayproxy"
#                       adds containerd's overlay code behind the proxy API
#   BENCH_BENCHES       subset of "snapcycle unpack start pull" (default all)
#   BENCH_GOAL          ratio of medians each candidate must stay under (1.10)
#   SEAMLESS_GRPC_BIN   daemon binary (default target/release/containerd-seamless-grpc,
#                       built with `cargo build --release --bins` if missing)
#   BENCH_SEAMLESS_BACKEND  storage.backend for the daemon (auto, btrfs, pool,
#                       directory); unset runs the daemon without --config
#   BENCH_SAMPLES_OUT   copy the raw TSV samples here before teardown
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ITERS=${BENCH_ITERS:-30}
read -r -a SNAPSHOTTERS <<<"${BENCH_SNAPSHOTTERS:-overlayfs seamless}"
BENCHES=${BENCH_BENCHES:-snapcycle unpack start pull}
GOAL=${BENCH_GOAL:-1.10}
SEAMLESS_BIN=${SEAMLESS_GRPC_BIN:-$REPO/target/release/containerd-seamless-grpc}
NS=seamless-bench
GOCODE=/usr/share/gocode

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }
has_snapshotter() { [[ " ${SNAPSHOTTERS[*]} " == *" $1 "* ]]; }
has_bench() { [[ " $BENCHES " == *" $1 "* ]]; }

# --- prerequisites: fail loudly, never skip ---------------------------------
[[ $(id -u) == 0 ]] || die "must run as root (containerd, mounts, runc)"
[[ "$ITERS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ITERS must be a positive integer, got '$ITERS'"
CYCLES=${BENCH_CYCLES:-$((ITERS * 10))}
[[ "$CYCLES" =~ ^[1-9][0-9]*$ ]] || die "BENCH_CYCLES must be a positive integer, got '$CYCLES'"
for cmd in containerd ctr runc containerd-shim-runc-v2 docker-registry go busybox \
    tar gzip sha256sum jq ss curl findmnt mountpoint losetup; do
    command -v "$cmd" >/dev/null || die "missing prerequisite: $cmd"
done
[[ -d $GOCODE/src/github.com/containerd/containerd ]] ||
    die "missing containerd Go sources in $GOCODE (apt install golang-github-containerd-containerd-dev)"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
    die "kernel has no overlay filesystem"
busybox_bin=$(command -v busybox)
# The image has no libc: busybox must be static (ldd fails on static binaries).
! ldd "$busybox_bin" >/dev/null 2>&1 || die "$busybox_bin is dynamically linked (install busybox-static)"
for b in $BENCHES; do
    [[ " snapcycle unpack start pull " == *" $b "* ]] || die "unknown benchmark '$b' in BENCH_BENCHES"
done
if has_snapshotter seamless; then
    command -v mkfs.btrfs >/dev/null || die "missing prerequisite: mkfs.btrfs (btrfs-progs) for the daemon's pool"
fi
[[ ${SNAPSHOTTERS[0]} == overlayfs ]] || log "peer (first snapshotter) is ${SNAPSHOTTERS[0]}, not overlayfs"

if has_snapshotter seamless && [[ ! -x $SEAMLESS_BIN ]]; then
    [[ -z ${SEAMLESS_GRPC_BIN:-} ]] || die "SEAMLESS_GRPC_BIN=$SEAMLESS_BIN is not an executable"
    command -v cargo >/dev/null || die "missing $SEAMLESS_BIN and no cargo to build it"
    log "building the daemon: cargo build --release --bins"
    (cd "$REPO" && cargo build --release --bins) || die "cargo build --release --bins failed"
    [[ -x $SEAMLESS_BIN ]] || die "cargo build did not produce $SEAMLESS_BIN"
fi

# --- temp env and teardown --------------------------------------------------
umask 022
# Short path: unix socket paths must stay under 108 bytes.
T=$(mktemp -d /tmp/sb.XXXXXX)
CSOCK=$T/c.sock
SAMPLES=$T/samples.tsv
: >"$SAMPLES"
declare -A PIDS=()

stop_pid() { # name, signal timeout seconds
    local name=$1 timeout=$2 pid=${PIDS[$1]:-} i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for ${timeout}s, killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ $rc != 0 ]]; then
        for f in "$T"/*.log; do
            [[ -s $f ]] || continue
            echo "----- last lines of $f -----" >&2
            tail -n 30 "$f" >&2
        done
    fi
    if [[ -n ${BENCH_SAMPLES_OUT:-} && -s $SAMPLES ]]; then
        cp "$SAMPLES" "$BENCH_SAMPLES_OUT"
    fi
    if [[ -n ${PIDS[containerd]:-} ]] && kill -0 "${PIDS[containerd]}" 2>/dev/null; then
        # ctr run --rm normally leaves nothing; after a failure, kill what is left.
        for id in $(ctr --address "$CSOCK" -n "$NS" tasks ls -q 2>/dev/null); do
            ctr --address "$CSOCK" -n "$NS" tasks kill -s KILL "$id" >/dev/null 2>&1
            ctr --address "$CSOCK" -n "$NS" tasks delete -f "$id" >/dev/null 2>&1
        done
    fi
    stop_pid containerd 10
    # Shims outlive containerd by design; only ours live under $T.
    for pidfile in "$T"/c/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
        [[ -f $pidfile ]] && kill -KILL "$(cat "$pidfile")" 2>/dev/null
    done
    for name in seamless overlayproxy registry; do stop_pid "$name" 10; done
    # The daemon's pool stays mounted after it exits (integration/CONTRACT.md).
    mountpoint -q "$T/seamless/pool" && umount "$T/seamless/pool"
    # Anything else still mounted under $T, deepest first.
    findmnt -rn -o TARGET | grep "^$T/" | sort -r | while read -r m; do umount -l "$m"; done
    losetup -n -O NAME,BACK-FILE -l 2>/dev/null | awk -v t="$T/" 'index($2, t) == 1 {print $1}' |
        while read -r dev; do losetup -d "$dev"; done
    rm -rf --one-file-system "$T"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ctrn() { ctr --address "$CSOCK" -n "$NS" "$@"; }

wait_for() { # description, timeout seconds, pid to watch or "", command...
    local what=$1 timeout=$2 pid=$3 i
    shift 3
    for ((i = 0; i < timeout * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || die "$what: process $pid exited"
        sleep 0.1
    done
    die "$what: not ready after ${timeout}s"
}

free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        [[ -z $(ss -Hltn "sport = :$port") ]] && { echo "$port"; return; }
    done
    die "no free TCP port found"
}

# --- Go tools ---------------------------------------------------------------
build_go_tools() {
    # GOPATH mode against Debian's packaged containerd sources: no downloads.
    mkdir -p "$T/gopath/src" "$T/bin"
    ln -s "$REPO/bench" "$T/gopath/src/seamless-bench"
    local tool
    for tool in snapcycle unpack summarize overlayproxy; do
        (cd "$T/gopath/src/seamless-bench" &&
            GOPATH="$T/gopath:$GOCODE" GO111MODULE=off GOFLAGS= \
                go build -o "$T/bin/$tool" "./$tool") || die "go build bench/$tool failed"
    done
}

# --- registry ---------------------------------------------------------------
start_registry() {
    REGISTRY=127.0.0.1:$(free_port)
    mkdir -p "$T/registry"
    cat >"$T/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $T/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
    PIDS[registry]=$!
    wait_for "registry on $REGISTRY" 20 "${PIDS[registry]}" curl -fsS "http://$REGISTRY/v2/"
}

# --- test image: OCI layout built offline from busybox + generated files ----
LAYER_FILES=${BENCH_LAYER_FILES:-800} # files in each generated layer (4 of them)

add_blob() { # file -> prints "digest size", moves the file into the layout
    local f=$1 sum size
    sum=$(sha256sum "$f" | cut -d' ' -f1)
    size=$(stat -c %s "$f")
    mv "$f" "$T/image/layout/blobs/sha256/$sum"
    echo "sha256:$sum $size"
}

tar_layer() { # dir -> writes dir.tar with stable ordering and ownership
    local dir=$1
    (cd "$dir" && find . -mindepth 1 | sed 's#^\./##' | LC_ALL=C sort) >"$dir.list"
    tar --no-recursion --owner=0 --group=0 --numeric-owner --mtime=@1700000000 \
        --format=posix --pax-option=delete=atime,delete=ctime \
        -C "$dir" -cf "$dir.tar" -T "$dir.list"
}

generate_files() { # dir, layer number, count: small files of 100 B .. 8 KiB
    local dir=$1 layer=$2 count=$3 i d
    for ((i = 0; i < count; i++)); do
        d=$dir/usr/share/bench/l$layer/d$((i % 20))
        [[ -d $d ]] || mkdir -p "$d"
        # printf is a builtin: thousands of files without a fork each.
        printf '%s' "${BLOCK:0:$((100 + (i * 997 + layer * 131) % 8092))}" >"$d/f$i"
    done
}

build_image() {
    IMAGE=$REGISTRY/bench/busybox-layers:v1
    local L=$T/image
    mkdir -p "$L/layout/blobs/sha256"
    BLOCK=$(head -c 6144 /dev/urandom | base64 -w0) # 8192 printable bytes

    # Layer 1: busybox and the applets the benchmarks use.
    mkdir -p "$L/l1/bin" "$L/l1/etc" "$L/l1/tmp" "$L/l1/proc" "$L/l1/sys" "$L/l1/dev"
    cp "$busybox_bin" "$L/l1/bin/busybox"
    for applet in sh true ls cat; do ln -s busybox "$L/l1/bin/$applet"; done
    echo 'root:x:0:0:root:/:/bin/sh' >"$L/l1/etc/passwd"
    chmod 1777 "$L/l1/tmp"
    # Layers 2-5: small files; layer 5 also deletes and replaces earlier ones.
    for n in 2 3 4 5; do
        mkdir -p "$L/l$n"
        generate_files "$L/l$n" "$n" "$LAYER_FILES"
    done
    mkdir -p "$L/l5/usr/share/bench/l2" "$L/l5/usr/share/bench/l3/d1" "$L/l5/etc"
    mkdir -p "$L/l5/usr/share/bench/l2/d1"
    : >"$L/l5/usr/share/bench/l2/.wh.d0" # whiteout a directory
    for i in 1 21 41; do : >"$L/l5/usr/share/bench/l2/d1/.wh.f$i"; done # and files
    : >"$L/l5/usr/share/bench/l3/d1/.wh..wh..opq"         # opaque directory
    echo 'root:x:0:0:bench:/:/bin/sh' >"$L/l5/etc/passwd" # replace a lower file

    local layers_json='[]' diff_ids='[]' n diff_id blob
    for n in 1 2 3 4 5; do
        tar_layer "$L/l$n"
        diff_id=sha256:$(sha256sum "$L/l$n.tar" | cut -d' ' -f1)
        gzip -n -6 "$L/l$n.tar"
        read -r blob size < <(add_blob "$L/l$n.tar.gz")
        diff_ids=$(jq -c --arg d "$diff_id" '. + [$d]' <<<"$diff_ids")
        layers_json=$(jq -c --arg d "$blob" --argjson s "$size" \
            '. + [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $d, size: $s}]' <<<"$layers_json")
    done
    jq -n --argjson ids "$diff_ids" '{
        architecture: "amd64", os: "linux",
        config: {Env: ["PATH=/bin"], Cmd: ["/bin/sh"]},
        rootfs: {type: "layers", diff_ids: $ids}
    }' >"$L/config.json"
    local config config_size
    read -r config config_size < <(add_blob "$L/config.json")
    jq -n --arg c "$config" --argjson cs "$config_size" --argjson layers "$layers_json" '{
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
        layers: $layers
    }' >"$L/manifest.json"
    local manifest manifest_size
    read -r manifest manifest_size < <(add_blob "$L/manifest.json")
    jq -n --arg m "$manifest" --argjson ms "$manifest_size" --arg name "$IMAGE" '{
        schemaVersion: 2,
        manifests: [{
            mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
            annotations: {"io.containerd.image.name": $name, "org.opencontainers.image.ref.name": "v1"}
        }]
    }' >"$L/layout/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$L/layout/oci-layout"
    tar -C "$L/layout" -cf "$L/image.tar" oci-layout index.json blobs

    local files
    files=$(cat "$L"/l[1-5].list | wc -l)
    IMAGE_DESC="5 layers, $files entries, $(du -sh "$L/image.tar" | cut -f1) compressed"
    log "test image $IMAGE: $IMAGE_DESC"

    # Import in a staging namespace, push, then drop the staging copy so the
    # bench namespace is the content's only owner and pulls really fetch.
    ctr --address "$CSOCK" -n seamless-bench-import images import --no-unpack "$L/image.tar" >/dev/null
    # ctr 1.6 push to a local registry fails now and then with "failed to
    # copy: ... unexpected EOF" (seen here once in ~10 runs; containerd
    # issue #5734); it is setup, not a measurement, so retry it.
    local attempt
    for attempt in 1 2 3; do
        ctr --address "$CSOCK" -n seamless-bench-import images push --plain-http "$IMAGE" >/dev/null && break
        ((attempt < 3)) || die "push of $IMAGE to $REGISTRY failed 3 times"
        log "push of $IMAGE failed (attempt $attempt), retrying"
        sleep 1
    done
    ctr --address "$CSOCK" -n seamless-bench-import images rm --sync "$IMAGE" >/dev/null
    ctr --address "$CSOCK" namespaces rm seamless-bench-import >/dev/null
    ctrn images pull --plain-http --snapshotter "${SNAPSHOTTERS[0]}" "$IMAGE" >/dev/null
}

# --- daemons ----------------------------------------------------------------
start_proxy() { # name binary
    local name=$1 bin=$2
    mkdir -p "$T/$name"
    # --containerd-address and --log-level are the daemon's contract flags;
    # the overlay reference takes only --root and --address.
    local extra=()
    if [[ $name == seamless ]]; then
        extra=(--containerd-address "$CSOCK" --log-level "${BENCH_SEAMLESS_LOG_LEVEL:-info}")
        if [[ -n ${BENCH_SEAMLESS_BACKEND:-} ]]; then
            printf 'version = 1\n[storage]\nbackend = "%s"\n' "$BENCH_SEAMLESS_BACKEND" >"$T/seamless.toml"
            extra+=(--config "$T/seamless.toml")
        fi
    fi
    "$bin" --root "$T/$name" --address "$T/$name.sock" "${extra[@]}" >"$T/$name.log" 2>&1 &
    PIDS[$name]=$!
    wait_for "$name socket $T/$name.sock" 30 "${PIDS[$name]}" test -S "$T/$name.sock"
}

start_containerd() {
    mkdir -p "$T/c/root" "$T/c/state" "$T/c/opt"
    {
        cat <<EOF
version = 2
root = "$T/c/root"
state = "$T/c/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$CSOCK"

[ttrpc]
  address = "$CSOCK.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$T/c/opt"
EOF
        local name
        for name in seamless overlayproxy; do
            has_snapshotter "$name" || continue
            mkdir -p "$T/c/root/io.containerd.snapshotter.v1.$name"
            printf '\n[proxy_plugins.%s]\n  type = "snapshot"\n  address = "%s"\n' "$name" "$T/$name.sock"
        done
    } >"$T/containerd.toml"
    containerd --config "$T/containerd.toml" >"$T/containerd.log" 2>&1 &
    PIDS[containerd]=$!
    wait_for "containerd on $CSOCK" 30 "${PIDS[containerd]}" ctr --address "$CSOCK" version
    local sn
    for sn in "${SNAPSHOTTERS[@]}"; do
        # Lists through containerd, so a proxy must accept and answer.
        wait_for "snapshotter $sn through containerd" 30 "" ctrn snapshots --snapshotter "$sn" ls
    done
}

# --- shell-timed benchmarks -------------------------------------------------
record() { # bench op snapshotter iteration start_us end_us
    local us=$(($6 - $5))
    printf '%s\t%s\t%s\t%d\t%d.%06d\n' "$1" "$2" "$3" "$4" $((us / 1000000)) $((us % 1000000)) >>"$SAMPLES"
}
now_us() { echo "${EPOCHREALTIME/./}"; }

# containerd removes snapshots from the backend in a later garbage collection;
# run it now, synchronously, so it never lands inside the next measurement.
collect_garbage() {
    local lease
    lease=$(ctrn leases create --expires 1m)
    ctrn leases delete --sync "$lease" >/dev/null
}

# Flush writeback (and, with `discard` mounts, queued block discards) left by
# the previous step so it is not billed to the next measurement. Not timed.
settle() { sync; }

bench_start() {
    local i sn id t0 t1 t2
    for sn in "${SNAPSHOTTERS[@]}"; do # warm up: unpack if needed, page cache
        ctrn run --rm --snapshotter "$sn" "$IMAGE" "warm-$sn-$$" true
        collect_garbage
    done
    settle
    for ((i = 0; i < ITERS; i++)); do
        for sn in "${SNAPSHOTTERS[@]}"; do
            id=start-$sn-$$-$i
            t0=$(now_us)
            ctrn run --rm --snapshotter "$sn" "$IMAGE" "$id" true
            t1=$(now_us)
            collect_garbage
            t2=$(now_us)
            settle
            record start "ctr run --rm true" "$sn" "$i" "$t0" "$t1"
            record start "gc after run" "$sn" "$i" "$t1" "$t2"
        done
    done
}

bench_pull() {
    local i sn t0 t1
    for ((i = -1; i < ITERS; i++)); do # i = -1 is the warm-up
        for sn in "${SNAPSHOTTERS[@]}"; do
            # Removes the image, its content and every snapshotter's snapshots.
            ctrn images rm --sync "$IMAGE" >/dev/null
            settle
            t0=$(now_us)
            # ctr's progress printer logs a harmless "context canceled" on exit.
            ctrn images pull --plain-http --snapshotter "$sn" "$IMAGE" >/dev/null 2>>"$T/ctr.log"
            t1=$(now_us)
            ((i < 0)) || record pull "pull + unpack" "$sn" "$i" "$t0" "$t1"
        done
    done
}

# bench/unpack has already checked that every snapshotter produced the same
# root filesystem; spot-check that layer 5's deletions are in it at all.
check_whiteouts() {
    local list=$T/rootfs-${SNAPSHOTTERS[0]}.txt
    [[ -s $list ]] || die "unpack wrote no rootfs listing $list"
    grep -q '^usr/share/bench/l2/d0 ' "$list" && die "whiteout of usr/share/bench/l2/d0 not applied"
    grep -q '^usr/share/bench/l3/d1/f1 ' "$list" && die "opaque directory usr/share/bench/l3/d1 not applied"
    grep -q '^usr/share/bench/l4/d1/f1 ' "$list" || die "usr/share/bench/l4/d1/f1 missing from rootfs"
    return 0
}

# --- main -------------------------------------------------------------------
snap_csv=$(IFS=,; echo "${SNAPSHOTTERS[*]}")
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "temp dir $T; snapshotters: ${SNAPSHOTTERS[*]}; iterations: $ITERS (snapcycle $CYCLES)"
build_go_tools
start_registry
has_snapshotter seamless && start_proxy seamless "$SEAMLESS_BIN"
has_snapshotter overlayproxy && start_proxy overlayproxy "$T/bin/overlayproxy"
start_containerd
build_image
if has_snapshotter seamless; then
    if mountpoint -q "$T/seamless/pool"; then
        SEAMLESS_STORAGE="loop-mounted btrfs pool at <root>/pool"
    else
        SEAMLESS_STORAGE="no pool; root on $(findmnt -n -o FSTYPE -T "$T/seamless")"
    fi
    SEAMLESS_STORAGE+=" (backend ${BENCH_SEAMLESS_BACKEND:-default}); overlayfs: containerd root on $(findmnt -n -o FSTYPE -T "$T/c/root")"
    log "seamless storage: $SEAMLESS_STORAGE"
fi

if has_bench snapcycle; then
    log "snapcycle: $CYCLES cycles per snapshotter"
    TMPDIR=$T "$T/bin/snapcycle" -address "$CSOCK" -namespace "$NS" \
        -snapshotters "$snap_csv" -n "$CYCLES" -samples "$SAMPLES" >&2
fi
if has_bench unpack; then
    log "unpack: $ITERS unpacks per snapshotter"
    TMPDIR=$T "$T/bin/unpack" -address "$CSOCK" -namespace "$NS" -image "$IMAGE" \
        -snapshotters "$snap_csv" -n "$ITERS" -samples "$SAMPLES" -listings "$T" >&2
    check_whiteouts
fi
if has_bench start; then
    log "start: $ITERS container runs per snapshotter"
    bench_start
fi
if has_bench pull; then
    log "pull: $ITERS pulls per snapshotter"
    bench_pull
fi

echo
echo "seamless-snapshotter bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, kernel $(uname -r), containerd $(containerd --version | awk '{print $3}')"
echo "image: $IMAGE_DESC; runs interleaved ${SNAPSHOTTERS[*]}; ratios against ${SNAPSHOTTERS[0]}; goal <= ${GOAL}x"
[[ -n ${SEAMLESS_STORAGE:-} ]] && echo "seamless storage: $SEAMLESS_STORAGE"
echo "load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews both columns)"
echo
"$T/bin/summarize" -samples "$SAMPLES" -snapshotters "$snap_csv" -goal "$GOAL"
