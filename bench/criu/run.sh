#!/usr/bin/env bash
# Process-state checkpoints (CRIU) through seamless against containerd's own
# path, in one run, on the same running container.
#
# Per size, a container on seamless holds SIZE MB (10^6 bytes) of dirty
# anonymous memory: a busybox shell keeps base64 text of /dev/urandom in a
# variable (random, so neither zstd nor chunk dedup flatters anyone; the
# fill is not timed). Then, RUNS times, in alternating order (ours first on
# even runs, ctr first on odd ones):
#   - ours: `checkpointctl create` (our daemon runs `runc checkpoint
#     --leave-running`; the images are stored as content-defined chunks,
#     zstd, in the checkpoint catalogue), then `checkpointctl restore
#     --resume` under a new name, timed until the task is RUNNING;
#   - ctr: `ctr containers checkpoint --task` (ctr pauses the task, the runc
#     shim dumps into a temp dir, containerd tars it uncompressed into its
#     content store, then ctr resumes the task), then `ctr containers
#     restore --live` under a new name (the shim's runc restore), timed
#     until RUNNING;
#   - ctr's CRIU statistics: `ctr tasks checkpoint --image-path --work-path`,
#     the same shim dump left in a directory, because CRIU writes stats-dump
#     to its work dir and `ctr containers checkpoint` deletes that. Decoded
#     by read_stats_dump.py (crit is not installed); its wall time is shown
#     as a reference row.
# Both restores run while the original keeps running (a new pid namespace
# each), and each restored container is checked to hold the memory, then
# removed. `sync` (not timed) runs before every timed step.
#
# Rows: wall time of each command; CRIU's frozen time (ours: process.frozen_ms
# of `checkpointctl list -o json`; ctr: stats-dump); how long the container's
# main process was kept from running, watched from the host the same way for
# both (watch_stopped.py: freezer not THAWED, or traced by CRIU; ctr keeps the
# task paused across the dump and the write into its content store); restore
# to RUNNING; storage: ours process.stored_bytes (memory chunks not already
# in the catalogue), ctr the bytes of the checkpoint image (its blobs and
# index). Run 0 is the container's first checkpoint, which ours stores
# whole: its wall time and storage are shown alone, the other rows are
# medians of runs 1 to RUNS-1. Storage of the second checkpoint is run 1's
# (the container idles in between: its memory does not change). containerd 1.6
# cannot keep two checkpoints of one container (see create_ctr below), so
# ctr's second checkpoint is taken after the first is removed and stores
# everything again.
#
# --pre-dump: run when `criu check --feature mem_dirty_track` passes
# (timed like create, ratio against ctr's plain checkpoint: ctr 1.6 has no
# pre-dump); otherwise the daemon must refuse it naming CONFIG_MEM_SOFT_DIRTY,
# and the row says "unsupported on this kernel".
#
# Environment: CRIU_BENCH_SIZES ["100:6 1000:6"], MB:RUNS per size, RUNS >= 2
# (run 0 is shown alone, the rest as medians; 5 of them by default because
# one CRIU dump of 1 GB took from 1 to 5 s on the shared test VM, for both);
# CRIU_BENCH_SAMPLES_OUT (copy the raw samples TSV: size, run, metric, value);
# SEAMLESS_GRPC_BIN / CHECKPOINTCTL_BIN (integration/lib.sh: target/debug;
# use release binaries for numbers). Needs root, what integration/lib.sh
# needs, criu and python3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-bench-criu
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"
# shellcheck source=bench/criu/memory.sh
source "$HERE/memory.sh"

SIZES=${CRIU_BENCH_SIZES:-"100:6 1000:6"}
die() { echo "criu bench: $*" >&2; exit 1; }
for spec in $SIZES; do
    [[ $spec =~ ^[1-9][0-9]*:([2-9]|[1-9][0-9]+)$ ]] ||
        die "CRIU_BENCH_SIZES takes MB:RUNS pairs with RUNS >= 2 (the second run is the second checkpoint), got '$spec'"
done
command -v criu >/dev/null || die "criu not found (packaging/criu/install.sh)"
command -v python3 >/dev/null || die "python3 not found"
[[ -d /sys/fs/cgroup/freezer ]] ||
    die "no cgroup v1 freezer at /sys/fs/cgroup/freezer (watch_stopped.py polls freezer.state)"

WATCH_PID=""
bench_down() {
    local rc=$?
    set +e
    [[ -n $WATCH_PID ]] && kill -TERM "$WATCH_PID" 2>/dev/null
    # env_down ends with exit: a subshell, so that the namespace's cgroups
    # (empty once its tasks are gone) can be removed after it.
    (
        (exit "$rc")
        env_down
    )
    rmdir /sys/fs/cgroup/*/"$NS" 2>/dev/null
    # containerd 1.6 leaves a ctrd-checkpoint directory (the whole dump) in
    # $TMPDIR after some `ctr containers checkpoint` runs: remove this run's.
    for dir in "${TMPDIR:-/tmp}"/ctrd-checkpoint*; do
        [[ -d $dir && $dir -nt $BENCH_STARTED ]] && rm -rf "$dir"
    done
    rm -f "$BENCH_STARTED"
    exit "$rc"
}
BENCH_STARTED=$(mktemp)
env_up
trap bench_down EXIT
env_log "criu $(criu --version | awk '/^Version/ {print $2}'), $(runc --version | head -1), $(ctr --version)"
env_log "daemon $SEAMLESS_BIN, CLI $CHECKPOINTCTL_BIN"
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null

now() { date +%s.%N; }
samples=$ENV_DIR/samples.tsv
: >"$samples"
sample() { echo -e "$1\t$2\t$3\t$4" >>"$samples"; } # size run metric value
task_field() { ctrn tasks ls | awk -v id="$1" -v f="$2" '$1 == id {print $f}'; }
task_status() { task_field "$1" 3; }
cgroup_dir() { # controller container
    local pid path
    pid=$(task_field "$2" 2)
    [[ -n $pid ]] || die "container $2 has no task"
    path=$(awk -F: -v c="$1" '$2 == c {print $3}' "/proc/$pid/cgroup")
    [[ -n $path && -d /sys/fs/cgroup/$1$path ]] || die "no $1 cgroup for container $2 (pid $pid)"
    echo "/sys/fs/cgroup/$1$path"
}
anon_bytes() { awk '$1 == "total_rss" {print $2}' "$(cgroup_dir memory "$1")/memory.stat"; }
wait_running() {
    local i
    for ((i = 0; i < 1000; i++)); do
        [[ $(task_status "$1") == RUNNING ]] && return 0
        sleep 0.01
    done
    die "container $1 is not RUNNING ($(task_status "$1"))"
}
remove_container() {
    local i
    ctrn tasks kill -s KILL "$1" >/dev/null 2>&1 || true
    for ((i = 0; i < 200; i++)); do
        ctrn tasks delete "$1" >/dev/null 2>&1 && break
        sleep 0.1
    done
    ctrn containers delete "$1" >/dev/null
}

# Runs a command timed, with the container's main process watched (frozen
# or traced: watch_stopped.py); appends the wall seconds and the stopped ms
# as samples.
timed() { # size run name container command...
    local size=$1 run=$2 name=$3 container=$4 t0 t1
    shift 4
    sync
    rm -f "$ENV_DIR/watch.ready"
    python3 "$HERE/watch_stopped.py" "$(cgroup_dir freezer "$container")/freezer.state" \
        "$(task_field "$container" 2)" "$ENV_DIR/watch.ready" >"$ENV_DIR/watch.json" &
    WATCH_PID=$!
    while [[ ! -e $ENV_DIR/watch.ready ]]; do
        kill -0 "$WATCH_PID" 2>/dev/null || die "watch_stopped.py exited"
        sleep 0.01
    done
    t0=$(now)
    "$@"
    t1=$(now)
    kill -TERM "$WATCH_PID"
    wait "$WATCH_PID"
    WATCH_PID=""
    sample "$size" "$run" "$name.wall_s" "$(echo "$t1 - $t0" | bc)"
    sample "$size" "$run" "$name.stopped_ms" "$(jq .stopped_ms "$ENV_DIR/watch.json")"
}
timed_restore() { # size run name new-container command...
    local size=$1 run=$2 name=$3 new=$4 t0 t1
    shift 4
    sync
    t0=$(now)
    "$@"
    wait_running "$new"
    t1=$(now)
    sample "$size" "$run" "$name.wall_s" "$(echo "$t1 - $t0" | bc)"
}
# The restored container must hold the memory, or the restore timed nothing.
check_restored() { # container expected-bytes
    local got
    got=$(anon_bytes "$1")
    [[ $got -ge $(($2 * 9 / 10)) ]] || die "restored $1 holds $got bytes of anonymous memory, expected about $2"
}

# --memory-limit: the default (1G) refuses the 1 GB container.
ours_create() { checkpointctl create "$1" --memory-limit 64G >"$ENV_DIR/ours.id"; }
ours_create_predump() { checkpointctl create "$1" --pre-dump --memory-limit 64G >"$ENV_DIR/ours.id"; }
ours_restore() { checkpointctl restore "$1" --name "$2" --resume >/dev/null; }
ctr_checkpoint() { ctrn containers checkpoint --task "$1" "$2" >/dev/null; }
ctr_task_checkpoint() { mkdir -p "$2" "$3" && ctrn tasks checkpoint --image-path "$2" --work-path "$3" "$1" >/dev/null; }
ctr_restore() { ctrn containers restore --live "$1" "$2" </dev/null >/dev/null; }
listed() { checkpointctl list -o json | jq -c --arg id "$1" '.[] | select(.id == $id)'; }
# Bytes of a checkpoint image's blobs, the index included; fails unless it
# holds the CRIU images.
image_bytes() {
    local digest index
    digest=$(ctrn images ls "name==$1" | awk 'NR == 2 {print $3}')
    [[ -n $digest ]] || die "checkpoint image $1 not found"
    index=$(ctrn content get "$digest")
    jq -e '.manifests | any(.mediaType == "application/vnd.containerd.container.criu.checkpoint.criu.tar")' \
        <<<"$index" >/dev/null || die "checkpoint image $1 holds no CRIU images: $index"
    jq --argjson own "${#index}" '[.manifests[].size] | add + $own' <<<"$index"
}

PREDUMP=""
predump_probe() { # container
    if criu check --feature mem_dirty_track >/dev/null 2>&1; then
        PREDUMP=supported
        return
    fi
    local err
    if err=$(checkpointctl create "$1" --pre-dump --memory-limit 64G 2>&1); then
        die "criu check says the kernel has no dirty-page tracking, yet create --pre-dump succeeded: $err"
    fi
    [[ $err == *CONFIG_MEM_SOFT_DIRTY* ]] || die "create --pre-dump failed without naming CONFIG_MEM_SOFT_DIRTY: $err"
    PREDUMP=$(echo "$err" | tr '\n' ' ' | sed 's/^FATA\[[^]]*\] //')
    env_log "--pre-dump refused as expected: $PREDUMP"
}

# The steps of one run, on the globals of the loop below: mb, run, id (the
# container), ref (ctr's checkpoint image), tdir (ctr's task checkpoint).
create_ours() {
    timed "$mb" "$run" ours.create "$id" ours_create "$id"
    ours_id=$(cat "$ENV_DIR/ours.id")
}
create_ctr() {
    # containerd 1.6 cannot hold two checkpoints of one container:
    # a blob that already exists (the spec, always) makes the task
    # checkpoint fail with AlreadyExists, which the client drops,
    # leaving an image without its CRIU images that restore refuses
    # ("media type not found", containerd#7980). So the previous one
    # goes first, its blobs with it (not timed).
    ((run == 0)) || ctrn images rm --sync "checkpoint/$id:$((run - 1))" >/dev/null
    timed "$mb" "$run" ctr.create "$id" ctr_checkpoint "$id" "$ref"
    timed "$mb" "$run" ctr.task_checkpoint "$id" ctr_task_checkpoint "$id" "$tdir/images" "$tdir/work"
}
restore_ours() {
    timed_restore "$mb" "$run" ours.restore "$id-ours-$run" ours_restore "$ours_id" "$id-ours-$run"
    check_restored "$id-ours-$run" "$anon"
    remove_container "$id-ours-$run"
}
restore_ctr() {
    timed_restore "$mb" "$run" ctr.restore "$id-ctr-$run" ctr_restore "$id-ctr-$run" "$ref"
    check_restored "$id-ctr-$run" "$anon"
    remove_container "$id-ctr-$run"
}
for spec in $SIZES; do
    mb=${spec%%:*}
    runs=${spec##*:}
    id=mem${mb}m-$$
    env_log "$id: filling $mb MB of anonymous memory"
    start_memory_container "$id" "$mb"
    anon=$(anon_bytes "$id")
    [[ $anon -ge $((mb * 1000000)) ]] || die "$id holds $anon bytes of anonymous memory, not $mb MB"
    sample "$mb" 0 memory_bytes "$anon"
    env_log "$id holds $((anon >> 20)) MiB of anonymous memory"
    [[ -n $PREDUMP ]] || predump_probe "$id"

    for ((run = 0; run < runs; run++)); do
        env_log "$id: run $((run + 1)) of $runs"
        ref=checkpoint/$id:$run
        tdir=$ENV_DIR/task-checkpoint-$run
        if ((run % 2 == 0)); then create_ours; create_ctr; else create_ctr; create_ours; fi

        json=$(listed "$ours_id")
        [[ -n $json ]] || die "checkpoint $ours_id is not listed"
        sample "$mb" "$run" ours.criu_frozen_ms "$(jq .process.frozen_ms <<<"$json")"
        sample "$mb" "$run" ours.criu_memdump_ms "$(jq .process.memdump_ms <<<"$json")"
        sample "$mb" "$run" ours.criu_memwrite_ms "$(jq .process.memwrite_ms <<<"$json")"
        # What the daemon reports of the stop, to cross-check the watch:
        # the filesystem capture's pause, then CRIU freezing and frozen.
        sample "$mb" "$run" ours.reported_stop_ms \
            "$(jq '.pause_ms + .process.freezing_ms + .process.frozen_ms' <<<"$json")"
        sample "$mb" "$run" ours.stored_bytes "$(jq .process.stored_bytes <<<"$json")"
        sample "$mb" "$run" ours.size_bytes "$(jq .size <<<"$json")"
        sample "$mb" "$run" ours.images_bytes "$(jq .process.images_size <<<"$json")"
        stats=$(python3 "$HERE/read_stats_dump.py" "$tdir/work" "$tdir/images")
        sample "$mb" "$run" ctr.criu_frozen_ms "$(jq .frozen_ms <<<"$stats")"
        sample "$mb" "$run" ctr.criu_memdump_ms "$(jq .memdump_ms <<<"$stats")"
        sample "$mb" "$run" ctr.criu_memwrite_ms "$(jq .memwrite_ms <<<"$stats")"
        sample "$mb" "$run" ctr.images_bytes "$(du -sb "$tdir/images" | cut -f1)"
        rm -rf "$tdir"
        sample "$mb" "$run" ctr.stored_bytes "$(image_bytes "$ref")"

        # Not on run 0: run 1's create must be the container's second
        # checkpoint for the storage row.
        if [[ $PREDUMP == supported ]] && ((run > 0)); then
            timed "$mb" "$run" ours.predump "$id" ours_create_predump "$id"
            sample "$mb" "$run" ours.predump_criu_frozen_ms "$(listed "$(cat "$ENV_DIR/ours.id")" | jq .process.frozen_ms)"
        fi

        if ((run % 2 == 0)); then restore_ours; restore_ctr; else restore_ctr; restore_ours; fi
    done
    remove_container "$id"
    ctrn images rm --sync "checkpoint/$id:$((runs - 1))" >/dev/null
done

# Median (nearest rank, a real sample) of a metric over a size's runs after
# the first: run 0 is the container's first checkpoint, which ours stores
# whole, so it is shown on its own.
median() { # size metric
    awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $2 > 0 && $3 == m {print $4}' "$samples" | sort -g |
        awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}'
}
spread() { # size metric: min-max over the runs after the first
    awk -F'\t' -v s="$1" -v m="$2" '$1 == s && $2 > 0 && $3 == m {print $4}' "$samples" | sort -g |
        awk '{a[NR] = $1} END {if (NR) printf "%.2f-%.2f", a[1], a[NR]}'
}
at_run() { awk -F'\t' -v s="$1" -v r="$2" -v m="$3" '$1 == s && $2 == r && $3 == m {print $4}' "$samples"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.3f", a / b; else print "n/a"}'; }
row() { # label ours ctr unit(s|ms|MiB)
    local ours=$2 ctr=$3 fmt
    case $4 in
        s) fmt='%-48s %10.3f s  %10.3f s  %8s\n' ;;
        ms) fmt='%-48s %9.1f ms  %9.1f ms  %8s\n' ;;
        MiB) fmt='%-48s %8.2f MiB %8.2f MiB %8s\n'
            ours=$(awk -v b="$ours" 'BEGIN {print b / 1048576}')
            ctr=$(awk -v b="$ctr" 'BEGIN {print b / 1048576}') ;;
    esac
    # shellcheck disable=SC2059
    printf "$fmt" "$1" "$ours" "$ctr" "$(ratio "$2" "$3")"
}

echo
echo "Process-state checkpoints, ours (checkpointctl) vs ctr (containerd 1.6 + runc shim), same run"
echo "criu $(criu --version | awk '/^Version/ {print $2}'), kernel $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for spec in $SIZES; do
    mb=${spec%%:*}
    runs=${spec##*:}
    echo
    echo "$mb MB of dirty anonymous memory (the container held $(($(at_run "$mb" 0 memory_bytes) >> 20)) MiB):" \
        "the 1st checkpoint, then medians of the next $((runs - 1))"
    printf '%-48s %12s  %12s  %8s\n' "" "ours" "ctr" "ours/ctr"
    row "checkpoint, wall time: 1st" "$(at_run "$mb" 0 ours.create.wall_s)" "$(at_run "$mb" 0 ctr.create.wall_s)" s
    row "checkpoint, wall time: next ones" "$(median "$mb" ours.create.wall_s)" "$(median "$mb" ctr.create.wall_s)" s
    row "  CRIU frozen time (stats-dump)" "$(median "$mb" ours.criu_frozen_ms)" "$(median "$mb" ctr.criu_frozen_ms)" ms
    row "  container stopped (frozen or traced)" "$(median "$mb" ours.create.stopped_ms)" \
        "$(median "$mb" ctr.create.stopped_ms)" ms
    row "restore --resume / restore --live, to RUNNING" "$(median "$mb" ours.restore.wall_s)" \
        "$(median "$mb" ctr.restore.wall_s)" s
    row "storage, 1st checkpoint" "$(at_run "$mb" 0 ours.stored_bytes)" "$(at_run "$mb" 0 ctr.stored_bytes)" MiB
    row "storage, 2nd checkpoint (memory unchanged)" "$(at_run "$mb" 1 ours.stored_bytes)" \
        "$(at_run "$mb" 1 ctr.stored_bytes)" MiB
    if [[ $PREDUMP == supported ]]; then
        row "checkpoint --pre-dump (ctr: plain), wall" "$(median "$mb" ours.predump.wall_s)" \
            "$(median "$mb" ctr.create.wall_s)" s
        row "  CRIU frozen time of the final dump" "$(median "$mb" ours.predump_criu_frozen_ms)" \
            "$(median "$mb" ctr.criu_frozen_ms)" ms
    else
        printf '%-48s %s\n' "checkpoint --pre-dump" \
            "unsupported on this kernel (criu check --feature mem_dirty_track fails; ctr 1.6 has no pre-dump)"
    fi
    echo "reference rows:"
    printf '%-48s ours %s, ctr %s\n' "  CRIU frozen ms, min-max of the same runs" \
        "$(spread "$mb" ours.criu_frozen_ms)" "$(spread "$mb" ctr.criu_frozen_ms)"
    printf '%-48s ours %s, ctr %s\n' "  CRIU memwrite ms, min-max of the same runs" \
        "$(spread "$mb" ours.criu_memwrite_ms)" "$(spread "$mb" ctr.criu_memwrite_ms)"
    row "  vs ctr tasks checkpoint --image-path: wall" "$(median "$mb" ours.create.wall_s)" \
        "$(median "$mb" ctr.task_checkpoint.wall_s)" s
    row "  vs ctr tasks checkpoint: container stopped" "$(median "$mb" ours.create.stopped_ms)" \
        "$(median "$mb" ctr.task_checkpoint.stopped_ms)" ms
    row "  ours as reported: pause + CRIU freezing+frozen" "$(median "$mb" ours.reported_stop_ms)" \
        "$(median "$mb" ctr.create.stopped_ms)" ms
    row "  CRIU images of one dump, uncompressed" "$(at_run "$mb" 0 ours.images_bytes)" \
        "$(at_run "$mb" 0 ctr.images_bytes)" MiB
    row "  ours: whole checkpoint size (fs + memory)" "$(at_run "$mb" 0 ours.size_bytes)" \
        "$(at_run "$mb" 0 ctr.stored_bytes)" MiB
done
if [[ $PREDUMP != supported ]]; then
    echo
    echo "--pre-dump: $PREDUMP"
fi
if [[ -n ${CRIU_BENCH_SAMPLES_OUT:-} ]]; then
    cp "$samples" "$CRIU_BENCH_SAMPLES_OUT"
fi
