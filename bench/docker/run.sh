#!/usr/bin/env bash
# Docker Engine checkpoints: our docker-checkpoint and `checkpointctl
# --engine docker` (through our daemon, started here) against Docker's own
# `docker checkpoint create` / `docker start --checkpoint`, in one run, on
# the same kind of container, on a private dockerd started here.
#
# Two sizes:
#   - small: the reference's counter, `sh -c "i=0; while true; do echo
#     Counter: $i; i=$((i+1)); sleep 2; done"`;
#   - large: a busybox shell holding LARGE_MB MB (10^6 bytes) of base64 text
#     of /dev/urandom in a variable (as bench/criu/memory.sh does: random,
#     so nothing flatters anyone; the fill is not timed).
# Per size, each tool has its own container, and each run, in rotating
# order (ours, Docker, ctl; then Docker, ctl, ours; then ctl, ours,
# Docker), takes for each tool a checkpoint that leaves the container
# running, stops the container, and restores it; the restored container is
# the next run's:
#   - ours: `docker-checkpoint -container C -name N -dir D`, then `docker
#     stop` and `docker rm` of C, then `docker-checkpoint -restore
#     -container C -name N -dir D -new-name X` (a new container X);
#   - ctl: `checkpointctl --engine docker create C` (the checkpoint goes
#     into the daemon's catalogue, its default local storage under the
#     daemon's root), then `docker stop` and `docker rm` of C, then
#     `checkpointctl restore ID --name X --resume --validate` (a new
#     container X, unpaused, then the same five checks as ours: its
#     --validate, as docker-checkpoint's restore always checks);
#   - Docker: `docker checkpoint create --leave-running C N`, then `docker
#     stop` of C, then `docker start --checkpoint N C` (the same container).
# Not timed either: before Docker's restore, the wait until containerd has
# collected the checkpoint's blob (see wait_checkpoint_collected: without
# it, Docker 20.10's restore failed in 2 of its first 3 tries here); after each
# restore, the removal of the images containerd unpacked into its TMPDIR
# and never removes (their size is shown).
# Each restored container is checked (not timed): the counter continues
# from where it was checkpointed, or the memory is there (its cgroup's
# total_rss). Then the checkpoint is removed (not timed; ctl's stay in the
# catalogue until the run ends). `sync` runs (not timed) before every timed
# step.
#
# Rows (medians, nearest rank, of all runs; ratios ours/Docker and
# ctl/Docker):
#   - frozen time: ours, the "frozen for:" line docker-checkpoint prints
#     (its freeze to its thaw: the copy of the writable layer and the dump);
#     ctl's, the checkpoint's pause_ms from `checkpointctl list -o json`
#     (the daemon's freeze to its thaw), and CRIU's frozen time from its
#     process.frozen_ms (the daemon reads CRIU's stats-dump);
#     Docker's, CRIU's frozen time from its stats-dump. Docker keeps none
#     (containerd's runc shim gives CRIU a work dir that it deletes after the
#     dump, and the checkpoint directory holds only what the images tar
#     held), so for Docker's checkpoints this script writes
#     /etc/criu/runc.conf with one line, `work-dir DIR`, which CRIU takes
#     over the shim's (runc passes that file to CRIU; CRIU lets it override
#     the RPC's work dir), and removes it after: CRIU then leaves stats-dump
#     and dump.log in DIR. Ours keeps stats-dump in its checkpoint
#     directory: CRIU's frozen time of our dump is shown besides, so that
#     CRIU's frozen times compare like for like.
#   - container stopped, watched from the host the same way for all three
#     (bench/criu/watch_stopped.py: the container's freezer not THAWED, or
#     its main process traced by CRIU): the like-for-like stall. Ours and
#     ctl's are their freeze to their thaw. Docker's is longer than CRIU's
#     frozen time: containerd's client (Task.Checkpoint, which the engine
#     calls) pauses the task through the freezer before the dump and
#     resumes it only after containerd has written the images as a tar into
#     its content store; the engine unpacks that tar into its checkpoint
#     directory after the resume.
#   - checkpoint wall time of the command.
#   - restore to running: from launching the restore command until `docker
#     inspect -f '{{.State.Status}}'` says running (a background loop, every
#     10 ms; not State.Running, which is true of a paused container too, as
#     ctl's restore is until it resumes it); and the restore command's whole
#     wall time (ours and ctl's include the five verification checks, one
#     of which takes a stats sample).
#
# Environment: BENCH_ITERS (runs per size; default 5 small, 3 large),
# BENCH_LARGE_MB [1000], DOCKER_CHECKPOINT_BIN, SEAMLESS_GRPC_BIN,
# CHECKPOINTCTL_BIN (default target/release/docker-checkpoint,
# containerd-seamless-grpc and checkpointctl, built with `nice cargo build
# --release --bins` when one is missing), BENCH_SAMPLES_OUT (copy the raw samples
# TSV: size, run, metric, value). Needs root, dockerd (Docker 20.10 with
# experimental mode, set in its config here), docker (the CLI; DOCKER_HOST
# points it and docker-checkpoint at the private engine), runc, criu,
# busybox, python3, no /etc/criu/runc.conf. Nothing is pulled: busybox is
# imported as alpine:latest; containers run with --network none.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNC_CONF=/etc/criu/runc.conf
# docker-checkpoint's state directory (its lock on RUNC_CONF is there).
STATE_ROOT=/run/docker-checkpoint

die() { echo "docker bench: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

[[ $EUID -eq 0 ]] || die "run as root (dockerd, CRIU)"
for tool in dockerd docker ctr runc criu busybox python3 jq flock tar; do
    command -v "$tool" >/dev/null || die "$tool not found (run .ci/setup; CRIU: packaging/criu/install.sh)"
done
[[ -d /sys/fs/cgroup/freezer && -d /sys/fs/cgroup/memory ]] ||
    die "no cgroup v1 freezer and memory hierarchies (watch_stopped.py reads freezer.state, the memory check memory.stat)"
[[ ! -e $RUNC_CONF ]] ||
    die "$RUNC_CONF exists: this bench writes it for Docker's dumps (to keep CRIU's stats-dump) and must not change a host's own"
[[ -z ${BENCH_ITERS:-} || $BENCH_ITERS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ITERS takes a positive number, got '$BENCH_ITERS'"
SMALL_ITERS=${BENCH_ITERS:-5}
LARGE_ITERS=${BENCH_ITERS:-3}
LARGE_MB=${BENCH_LARGE_MB:-1000}
[[ $LARGE_MB =~ ^[1-9][0-9]*$ ]] || die "BENCH_LARGE_MB takes a positive number, got '$LARGE_MB'"

BIN=${DOCKER_CHECKPOINT_BIN:-$ROOT/target/release/docker-checkpoint}
DAEMON_BIN=${SEAMLESS_GRPC_BIN:-$ROOT/target/release/containerd-seamless-grpc}
CTL_BIN=${CHECKPOINTCTL_BIN:-$ROOT/target/release/checkpointctl}
if [[ -z ${DOCKER_CHECKPOINT_BIN:-} && ! -x $BIN ]] || [[ -z ${SEAMLESS_GRPC_BIN:-} && ! -x $DAEMON_BIN ]] ||
    [[ -z ${CHECKPOINTCTL_BIN:-} && ! -x $CTL_BIN ]]; then
    log "building the release binaries"
    (cd "$ROOT" && nice cargo build --release --bins) || die "cargo build failed"
fi
[[ -x $BIN ]] || die "docker-checkpoint not found at $BIN"
[[ -x $DAEMON_BIN ]] || die "containerd-seamless-grpc not found at $DAEMON_BIN"
[[ -x $CTL_BIN ]] || die "checkpointctl not found at $CTL_BIN"

DIR=$(mktemp -d /tmp/docker-bench.XXXXXX)
export DOCKER_HOST=unix://$DIR/docker.sock
DOCKERD_PID=""
DAEMON_PID=""
WATCH_PID=""
POLL_PID=""
teardown() {
    local rc=$? i ids
    set +e
    [[ -n $WATCH_PID ]] && kill -TERM "$WATCH_PID" 2>/dev/null
    [[ -n $POLL_PID ]] && kill -TERM "$POLL_PID" 2>/dev/null
    [[ -f $DIR/runc.conf.ours ]] && rm -f "$RUNC_CONF" && rmdir /etc/criu 2>/dev/null
    if [[ -n $DAEMON_PID ]]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        wait "$DAEMON_PID" 2>/dev/null
    fi
    if [[ -n $DOCKERD_PID ]]; then
        # Containers first, so that dockerd leaves no shim or mount behind.
        ids=$(docker ps -aq 2>/dev/null)
        [[ -n $ids ]] && docker rm -f $ids >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for ((i = 0; i < 300; i++)); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    grep -o " $DIR/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l
    rm -rf "$DIR"
    exit "$rc"
}
trap teardown EXIT
# A signal ends the run through the teardown too (bash runs no EXIT trap when killed).
trap 'exit 143' TERM
trap 'exit 130' INT

# --- the private engine ----------------------------------------------------
cat >"$DIR/daemon.json" <<EOF
{
  "data-root": "$DIR/data",
  "exec-root": "$DIR/exec",
  "pidfile": "$DIR/docker.pid",
  "hosts": ["unix://$DIR/docker.sock"],
  "iptables": false,
  "ip-masq": false,
  "bridge": "none",
  "experimental": true,
  "storage-driver": "overlay2"
}
EOF
# containerd 1.6 unpacks the images of every restore from a checkpoint into
# a ctrd-checkpoint* directory of its TMPDIR (XDG_RUNTIME_DIR when set) and
# never removes it (ours and ctl remove it after their restores): the
# engine's containerd gets a TMPDIR of its own here, emptied after each
# restore (not timed) and measured.
mkdir -p "$DIR/tmp"
env -u XDG_RUNTIME_DIR TMPDIR="$DIR/tmp" dockerd --config-file "$DIR/daemon.json" >"$DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for ((i = 0; ; i++)); do
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited; its log:
$(cat "$DIR/dockerd.log")"
    ((i < 300)) || die "dockerd did not answer within 60 s; its log:
$(cat "$DIR/dockerd.log")"
    sleep 0.2
done
[[ $(docker info --format '{{.ExperimentalBuild}}') == true ]] || die "the engine is not in experimental mode"

rootfs=$DIR/rootfs
mkdir -p "$rootfs"/{bin,tmp,etc,proc,sys,dev}
cp "$(command -v busybox)" "$rootfs/bin/busybox"
for applet in sh echo sleep cat ls ps true head base64 touch test; do
    ln -s busybox "$rootfs/bin/$applet"
done
tar -C "$rootfs" -c . | docker import - alpine:latest >/dev/null
rm -rf "$rootfs"

SERVER=$(docker version --format '{{.Server.Version}}')
CLIENT=$(docker version --format '{{.Client.Version}}')
CONTAINERD=$(docker info --format '{{.ContainerdCommit.ID}}')
RUNC=$(docker info --format '{{.RuncCommit.ID}}')
CRIU=$(criu --version | awk '/^Version/ {print $2}')
log "engine: dockerd $SERVER (client $CLIENT), containerd $CONTAINERD, runc $RUNC, criu $CRIU"
log "ours: $BIN"

# --- our daemon, for checkpointctl --engine docker ------------------------------
# In a directory of its own (it puts its REST socket beside its gRPC one);
# plain directories for storage; the engine above; no containerd (a Docker
# container's checkpoints do not use it). checkpointctl reads a config file
# of ours, not the host's ~/.checkpointctl.yaml.
mkdir -p "$DIR/seamless/run"
SEAMLESS_SOCK=$DIR/seamless/run/daemon.sock
printf 'version = 1\n[storage]\nbackend = "directory"\n[docker]\naddress = "%s"\n' "$DIR/docker.sock" \
    >"$DIR/seamless/config.toml"
echo "engine: docker" >"$DIR/seamless/checkpointctl.yaml"
"$DAEMON_BIN" --root "$DIR/seamless/root" --address "$SEAMLESS_SOCK" \
    --containerd-address "$DIR/seamless/no-containerd.sock" --config "$DIR/seamless/config.toml" \
    </dev/null >"$DIR/seamless/daemon.log" 2>&1 &
DAEMON_PID=$!
for ((i = 0; ; i++)); do
    python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$SEAMLESS_SOCK" 2>/dev/null && break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "containerd-seamless-grpc exited; its log:
$(cat "$DIR/seamless/daemon.log")"
    ((i < 300)) || die "containerd-seamless-grpc did not serve within 60 s; its log:
$(cat "$DIR/seamless/daemon.log")"
    sleep 0.2
done
ctl() {
    "$CTL_BIN" --address "$SEAMLESS_SOCK" --namespace bench --config "$DIR/seamless/checkpointctl.yaml" \
        --engine docker "$@"
}
log "ctl: $CTL_BIN through $DAEMON_BIN"

# --- helpers ------------------------------------------------------------------
samples=$DIR/samples.tsv
: >"$samples"
sample() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$samples"; } # size run metric value
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f", b - a}'; }
inspect() { docker inspect -f "$2" "$1"; }
cgroup_dir() { # controller container
    local pid path
    pid=$(inspect "$2" '{{.State.Pid}}')
    [[ $pid -gt 0 ]] || die "container $2 has no process"
    path=$(awk -F: -v c="$1" '$2 == c {print $3}' "/proc/$pid/cgroup")
    [[ -n $path && -d /sys/fs/cgroup/$1$path ]] || die "no $1 cgroup for container $2 (pid $pid)"
    echo "/sys/fs/cgroup/$1$path"
}
anon_bytes() { awk '$1 == "total_rss" {print $2}' "$(cgroup_dir memory "$1")/memory.stat"; }
# Duration as Rust's Debug prints it (1.5s, 830.2ms, 95µs, 120ns) in ms.
debug_duration_ms() {
    awk -v d="$1" 'BEGIN {
        if (match(d, /ms$/)) v = substr(d, 1, length(d) - 2);
        else if (match(d, /µs$/)) v = substr(d, 1, length(d) - length("µs")) / 1000;
        else if (match(d, /ns$/)) v = substr(d, 1, length(d) - 2) / 1000000;
        else if (match(d, /s$/)) v = substr(d, 1, length(d) - 1) * 1000;
        else exit 1;
        printf "%.3f", v }' || die "cannot read the duration '$1'"
}
# CRIU's times from the stats-dump in DIR, as samples.
criu_stats() { # size run tool dir
    local stats
    stats=$(python3 "$HERE/../criu/read_stats_dump.py" "$4") || die "no CRIU statistics in $4"
    sample "$1" "$2" "$3.criu_freezing_ms" "$(jq .freezing_ms <<<"$stats")"
    sample "$1" "$2" "$3.criu_frozen_ms" "$(jq .frozen_ms <<<"$stats")"
    sample "$1" "$2" "$3.criu_memdump_ms" "$(jq .memdump_ms <<<"$stats")"
    sample "$1" "$2" "$3.criu_memwrite_ms" "$(jq .memwrite_ms <<<"$stats")"
}
last_counter() { docker logs --tail 1 "$1" 2>&1 | awk '/^Counter: / {print $2}'; }

# Starts a container of a size and waits until it is ready: the counter has
# printed a line past 0, or the memory is filled.
start_container() { # size name
    local i upper
    if [[ $1 == small ]]; then
        docker run -d --network none --name "$2" alpine:latest \
            sh -c 'i=0; while true; do echo Counter: $i; i=$((i+1)); sleep 2; done' >/dev/null
        for ((i = 0; i < 100; i++)); do
            [[ $(last_counter "$2") -ge 1 ]] 2>/dev/null && return 0
            sleep 0.1
        done
        die "$2 did not count"
    fi
    docker run -d --network none --name "$2" alpine:latest sh -c \
        "x=\$(head -c $((LARGE_MB * 750000)) /dev/urandom | base64); touch /ready; while true; do sleep 1000; done" >/dev/null
    upper=$(inspect "$2" '{{.GraphDriver.Data.UpperDir}}')
    for ((i = 0; i < 3000; i++)); do
        [[ -e $upper/ready ]] && break
        sleep 0.1
    done
    [[ -e $upper/ready ]] || die "$2 did not fill its memory in 300 s"
    local anon
    anon=$(anon_bytes "$2")
    [[ $anon -ge $((LARGE_MB * 1000000)) ]] || die "$2 holds $anon bytes of anonymous memory, not $LARGE_MB MB"
    echo "$anon"
}

# Runs a checkpoint command with the container watched from the host;
# records its wall time and how long the container was stopped.
timed_checkpoint() { # size run tool container command...
    local size=$1 run=$2 tool=$3 container=$4 t0 t1
    shift 4
    sync
    rm -f "$DIR/watch.ready"
    python3 "$HERE/../criu/watch_stopped.py" "$(cgroup_dir freezer "$container")/freezer.state" \
        "$(inspect "$container" '{{.State.Pid}}')" "$DIR/watch.ready" >"$DIR/watch.json" &
    WATCH_PID=$!
    while [[ ! -e $DIR/watch.ready ]]; do
        kill -0 "$WATCH_PID" 2>/dev/null || die "watch_stopped.py exited"
        sleep 0.01
    done
    t0=$EPOCHREALTIME
    if ! "$@" >"$DIR/out" 2>&1; then
        kill -TERM "$WATCH_PID"
        die "$tool checkpoint of $container failed: $* said:
$(cat "$DIR/out")"
    fi
    t1=$EPOCHREALTIME
    kill -TERM "$WATCH_PID"
    wait "$WATCH_PID"
    WATCH_PID=""
    sample "$size" "$run" "$tool.checkpoint_wall_s" "$(elapsed "$t0" "$t1")"
    sample "$size" "$run" "$tool.stopped_ms" "$(python3 -c 'import json,sys; print(json.load(sys.stdin)["stopped_ms"])' <"$DIR/watch.json")"
}

poll_running() { # container file: writes the time at which it runs, unpaused
    while [[ $(docker inspect -f '{{.State.Status}}' "$1" 2>/dev/null) != running ]]; do
        sleep 0.01
    done
    echo "$EPOCHREALTIME" >"$2"
}
# Runs a restore command with a poll of the restored container; records the
# time to running and the command's wall time.
timed_restore() { # size run tool restored-container command...
    local size=$1 run=$2 tool=$3 restored=$4 t0 t1 i
    shift 4
    sync
    rm -f "$DIR/running"
    t0=$EPOCHREALTIME
    poll_running "$restored" "$DIR/running" &
    POLL_PID=$!
    if ! "$@" >"$DIR/out" 2>&1; then
        kill -TERM "$POLL_PID"
        die "$tool restore into $restored failed: $* said:
$(cat "$DIR/out")"
    fi
    t1=$EPOCHREALTIME
    for ((i = 0; i < 500; i++)); do
        [[ -s $DIR/running ]] && break
        sleep 0.01
    done
    [[ -s $DIR/running ]] || die "$restored is not running 5 s after the $tool restore returned"
    wait "$POLL_PID"
    POLL_PID=""
    sample "$size" "$run" "$tool.restore_running_s" "$(elapsed "$t0" "$(cat "$DIR/running")")"
    sample "$size" "$run" "$tool.restore_wall_s" "$(elapsed "$t0" "$t1")"
    # Ours and ctl remove the copy containerd leaves; Docker leaves it.
    local left expected=0
    [[ $tool == docker ]] && expected=1
    left=$(find "$DIR/tmp" -mindepth 1 -maxdepth 1 -name 'ctrd-checkpoint*' | wc -l)
    ((left == expected)) || die "containerd left $left ctrd-checkpoint directories for one $tool restore, expected $expected"
    sample "$size" "$run" "$tool.containerd_left_bytes" "$(du -sb "$DIR/tmp" | cut -f1)"
    rm -rf "${DIR:?}"/tmp/ctrd-checkpoint*
}

# The restored container holds what was checkpointed: the counter goes on
# from at least the value it had printed before the checkpoint (not from
# 0), or the memory is there.
check_restored() { # size container counter-before since anon-bytes
    local i first
    if [[ $1 == large ]]; then
        local got
        got=$(anon_bytes "$2")
        [[ $got -ge $(($5 * 9 / 10)) ]] || die "restored $2 holds $got bytes of anonymous memory, expected about $5"
        return 0
    fi
    for ((i = 0; i < 50; i++)); do
        first=$(docker logs --since "$4" "$2" 2>&1 | awk '/^Counter: / {print $2; exit}')
        [[ -n $first ]] && break
        sleep 0.1
    done
    [[ -n $first ]] || die "restored $2 printed no counter line in 5 s"
    [[ $first -ge $3 ]] || die "restored $2 counts from $first, but it had printed $3 before its checkpoint"
}

# --- one run of each tool ------------------------------------------------------
# Globals: size, run, anon; OURS, CTL and THEIRS name each tool's container.
run_ours() {
    local name=ck$run before since next=ours-$size-$((run + 1)) out
    before=$(last_counter "$OURS")
    timed_checkpoint "$size" "$run" ours "$OURS" "$BIN" -container "$OURS" -name "$name" -dir "$DIR/ours"
    out=$(cat "$DIR/out")
    local frozen
    frozen=$(awk '/^  frozen for:/ {print $3}' <<<"$out")
    [[ -n $frozen ]] || die "docker-checkpoint printed no 'frozen for:' line:
$out"
    sample "$size" "$run" ours.frozen_ms "$(debug_duration_ms "$frozen")"
    criu_stats "$size" "$run" ours "$DIR/ours/$OURS/$name"
    docker stop -t 0 "$OURS" >/dev/null
    docker rm "$OURS" >/dev/null
    since=$(date +%s.%N)
    timed_restore "$size" "$run" ours "$next" \
        "$BIN" -restore -container "$OURS" -name "$name" -dir "$DIR/ours" -new-name "$next"
    grep -q "All 5 checks passed" "$DIR/out" || die "docker-checkpoint restore did not pass its checks:
$(cat "$DIR/out")"
    check_restored "$size" "$next" "${before:-0}" "$since" "$anon"
    rm -rf "${DIR:?}/ours/$OURS"
    OURS=$next
}
run_ctl() {
    local before since next=ctl-$size-$((run + 1)) id row check
    before=$(last_counter "$CTL")
    timed_checkpoint "$size" "$run" ctl "$CTL" ctl create "$CTL"
    id=$(tail -n 1 "$DIR/out")
    row=$(ctl list "$CTL" -o json | jq -e --arg id "$id" '.[] | select(.id == $id)') ||
        die "checkpointctl create printed '$id', which its list does not show:
$(cat "$DIR/out")"
    [[ $(jq -r .engine <<<"$row") == docker ]] || die "checkpoint $id is not a Docker one: $row"
    sample "$size" "$run" ctl.frozen_ms "$(jq -e .pause_ms <<<"$row")"
    sample "$size" "$run" ctl.criu_freezing_ms "$(jq -e .process.freezing_ms <<<"$row")"
    sample "$size" "$run" ctl.criu_frozen_ms "$(jq -e .process.frozen_ms <<<"$row")"
    sample "$size" "$run" ctl.criu_memdump_ms "$(jq -e .process.memdump_ms <<<"$row")"
    sample "$size" "$run" ctl.criu_memwrite_ms "$(jq -e .process.memwrite_ms <<<"$row")"
    docker stop -t 0 "$CTL" >/dev/null
    docker rm "$CTL" >/dev/null
    since=$(date +%s.%N)
    timed_restore "$size" "$run" ctl "$next" ctl restore "$id" --name "$next" --resume --validate
    for check in status process api logs stats; do
        grep -q "ok    $check" "$DIR/out" || die "checkpointctl restore did not pass its check $check:
$(cat "$DIR/out")"
    done
    check_restored "$size" "$next" "${before:-0}" "$since" "$anon"
    CTL=$next
}
# Docker 20.10 uploads the checkpoint directory to containerd as a tar at
# restore and fails with "commit failed: content sha256:...: already exists"
# when containerd still holds the same tar from the checkpoint's creation
# (its image is deleted at once, its blob only at the next garbage
# collection). So Docker's restore waits, not timed, until containerd's
# content store of Docker's namespace is empty, and the wait is recorded.
wait_checkpoint_collected() { # size run
    local t0 i
    t0=$EPOCHREALTIME
    for ((i = 0; i < 6000; i++)); do
        [[ -z $(ctr --address "$DIR/exec/containerd/containerd.sock" -n moby content ls -q) ]] && break
        sleep 0.01
    done
    [[ -z $(ctr --address "$DIR/exec/containerd/containerd.sock" -n moby content ls -q) ]] ||
        die "containerd still holds the checkpoint's blobs 60 s after docker checkpoint create"
    sample "$1" "$2" docker.gc_wait_s "$(elapsed "$t0" "$EPOCHREALTIME")"
}
run_docker() {
    local name=ck$run before since work=$DIR/criu-work-$size-$run lock
    before=$(last_counter "$THEIRS")
    mkdir -p "$work" /etc/criu "$STATE_ROOT"
    # docker-checkpoint's restores write runc's options file under this
    # lock: hold it while the file is ours.
    exec {lock}>"$STATE_ROOT/criu-config.lock"
    flock "$lock"
    (set -C && echo "work-dir $work" >"$RUNC_CONF") 2>/dev/null ||
        die "$RUNC_CONF exists (another program wrote it): this bench will not change it"
    : >"$DIR/runc.conf.ours"
    timed_checkpoint "$size" "$run" docker "$THEIRS" docker checkpoint create --leave-running "$THEIRS" "$name"
    rm -f "$RUNC_CONF" "$DIR/runc.conf.ours"
    rmdir /etc/criu 2>/dev/null || true
    exec {lock}>&-
    [[ -e $work/stats-dump ]] || die "CRIU left no stats-dump in $work: /etc/criu/runc.conf's work-dir did not take"
    criu_stats "$size" "$run" docker "$work"
    rm -rf "$work"
    docker stop -t 0 "$THEIRS" >/dev/null
    wait_checkpoint_collected "$size" "$run"
    since=$(date +%s.%N)
    timed_restore "$size" "$run" docker "$THEIRS" docker start --checkpoint "$name" "$THEIRS"
    check_restored "$size" "$THEIRS" "${before:-0}" "$since" "$anon"
    docker checkpoint rm "$THEIRS" "$name"
}

for size in small large; do
    iters=$SMALL_ITERS
    [[ $size == large ]] && iters=$LARGE_ITERS
    OURS=ours-$size-0
    CTL=ctl-$size-0
    THEIRS=docker-$size
    log "$size: starting $OURS, $CTL and $THEIRS"
    anon=$(start_container "$size" "$OURS")
    a2=$(start_container "$size" "$THEIRS")
    a3=$(start_container "$size" "$CTL")
    if [[ $size == small ]]; then
        # The running poll's resolution: one `docker inspect` takes this long.
        t0=$EPOCHREALTIME
        for ((i = 0; i < 10; i++)); do inspect "$THEIRS" '{{.State.Running}}' >/dev/null; done
        INSPECT_MS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", (b - a) * 100}')
    fi
    if [[ $size == large ]]; then
        sample large 0 ours.memory_bytes "$anon"
        sample large 0 docker.memory_bytes "$a2"
        sample large 0 ctl.memory_bytes "$a3"
        log "large: $((anon >> 20)), $((a2 >> 20)) and $((a3 >> 20)) MiB of anonymous memory"
        ((a2 < anon)) && anon=$a2
        ((a3 < anon)) && anon=$a3
    fi
    for ((run = 0; run < iters; run++)); do
        log "$size: run $((run + 1)) of $iters"
        case $((run % 3)) in
            0) run_ours; run_docker; run_ctl ;;
            1) run_docker; run_ctl; run_ours ;;
            2) run_ctl; run_ours; run_docker ;;
        esac
    done
    docker rm -f "$OURS" "$CTL" "$THEIRS" >/dev/null
    rm -rf "${DIR:?}/ours"
done

# --- report ------------------------------------------------------------------
median() { # size metric: nearest rank, a real sample
    awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $3 == m {print $4}' "$samples" | sort -g |
        awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}'
}
spread() { # size metric scale
    awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $3 == m {print $4}' "$samples" | sort -g |
        awk -v k="$3" '{a[NR] = $1} END {if (NR) printf "%.0f-%.0f", a[1] * k, a[NR] * k}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'; }
row() { # label metric-ours metric-ctl metric-docker unit(s|ms), of $size
    local fmt ours ctl docker
    ours=$(median "$size" "$2")
    ctl=$(median "$size" "$3")
    docker=$(median "$size" "$4")
    case $5 in
        s) fmt='%-52s %10.3f s  %10.3f s  %10.3f s  %9s  %9s\n' ;;
        ms) fmt='%-52s %9.1f ms  %9.1f ms  %9.1f ms  %9s  %9s\n' ;;
    esac
    # shellcheck disable=SC2059
    printf "$fmt" "$1" "$ours" "$ctl" "$docker" "$(ratio "$ours" "$docker")" "$(ratio "$ctl" "$docker")"
}
echo
echo "Docker Engine checkpoints: docker-checkpoint ($BIN) and checkpointctl --engine docker ($CTL_BIN,"
echo "daemon $DAEMON_BIN) vs docker checkpoint, same run"
echo "dockerd $SERVER (experimental), containerd $CONTAINERD, runc $RUNC, criu $CRIU, client $CLIENT"
echo "kernel $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "one docker inspect (the running poll's step, plus 10 ms): $INSPECT_MS ms"
for size in small large; do
    iters=$SMALL_ITERS
    label="small: the reference's counter"
    if [[ $size == large ]]; then
        iters=$LARGE_ITERS
        label="large: $LARGE_MB MB of dirty anonymous memory (held $(($(median large ours.memory_bytes) >> 20)) MiB)"
    fi
    echo
    echo "$label, medians of $iters runs"
    printf '%-52s %12s  %12s  %12s  %9s  %9s\n' "" "ours" "ctl" "Docker" "ours/Dock" "ctl/Dock"
    row "frozen: ours 'frozen for:', ctl pause_ms / CRIU's" ours.frozen_ms ctl.frozen_ms docker.criu_frozen_ms ms
    row "frozen: CRIU's frozen time (stats-dump), all" ours.criu_frozen_ms ctl.criu_frozen_ms docker.criu_frozen_ms ms
    row "container stopped, watched from the host" ours.stopped_ms ctl.stopped_ms docker.stopped_ms ms
    row "checkpoint, wall time" ours.checkpoint_wall_s ctl.checkpoint_wall_s docker.checkpoint_wall_s s
    row "restore, to running" ours.restore_running_s ctl.restore_running_s docker.restore_running_s s
    row "restore, command's wall time (ours, ctl: + 5 checks)" ours.restore_wall_s ctl.restore_wall_s docker.restore_wall_s s
    row "  CRIU's freezing time (stats-dump), all" ours.criu_freezing_ms ctl.criu_freezing_ms docker.criu_freezing_ms ms
    printf '%-52s %s ms (median)\n' "  Docker: wait for containerd's GC (not timed)" \
        "$(awk -v s="$(median $size docker.gc_wait_s)" 'BEGIN {printf "%.0f", s * 1000}')"
    printf '%-52s ours %s MiB, ctl %s MiB, Docker %s MiB\n' "  left by containerd in its TMPDIR per restore" \
        "$(($(median $size ours.containerd_left_bytes) >> 20))" "$(($(median $size ctl.containerd_left_bytes) >> 20))" \
        "$(($(median $size docker.containerd_left_bytes) >> 20))"
    row "  CRIU's memdump time (stats-dump), all" ours.criu_memdump_ms ctl.criu_memdump_ms docker.criu_memdump_ms ms
    row "  CRIU's memwrite time (stats-dump), all" ours.criu_memwrite_ms ctl.criu_memwrite_ms docker.criu_memwrite_ms ms
    printf '%-52s ours %s, ctl %s, Docker %s\n' "  frozen ms, min-max (as the first row)" \
        "$(spread $size ours.frozen_ms 1)" "$(spread $size ctl.frozen_ms 1)" "$(spread $size docker.criu_frozen_ms 1)"
    printf '%-52s ours %s, ctl %s, Docker %s\n' "  checkpoint wall ms, min-max" \
        "$(spread $size ours.checkpoint_wall_s 1000)" "$(spread $size ctl.checkpoint_wall_s 1000)" \
        "$(spread $size docker.checkpoint_wall_s 1000)"
    printf '%-52s ours %s, ctl %s, Docker %s\n' "  restore to running ms, min-max" \
        "$(spread $size ours.restore_running_s 1000)" "$(spread $size ctl.restore_running_s 1000)" \
        "$(spread $size docker.restore_running_s 1000)"
done
if [[ -n ${BENCH_SAMPLES_OUT:-} ]]; then
    cp "$samples" "$BENCH_SAMPLES_OUT"
fi
