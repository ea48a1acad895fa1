#!/usr/bin/env bash
# Measures the stall a running container really sees while it is committed,
# seamless against the classic paused commit, interleaved in one run.
#
# The container runs bench/commit-stall/ticker.c (bind-mounted, read-only):
# it spins on CLOCK_MONOTONIC and records the largest gap between consecutive
# iterations per window; SIGUSR1 from this script closes a window and the
# ticker appends its max gap to a bind-mounted host directory. Before the
# ticker starts, the container writes its writable layer (one scenario each).
#
# Per commit and scenario:
#   baseline  an idle window of STALL_BASELINE_SECS, no commit: the scheduler
#             noise floor of this machine
#   seamless  checkpointctl seamless-commit --format oci --wait; window
#             "capture" from the invocation to the line "Seamless snapshot
#             created successfully", window "background" from there to the
#             end of the job (layer build and push); reported Pause Time
#   classic   what nerdctl commit does: ctr tasks pause, tar | gzip of the
#             container's upper directory, ctr tasks resume; pause measured
#             from the pause command to the end of resume
#
# Environment (defaults in brackets):
#   COMMITS              measured commits per kind and scenario [20]
#   STALL_WARMUP         unrecorded commits per kind first [1]
#   STALL_SCENARIOS      subset of "10mb 1gb 100k" [all]
#   STALL_10MB_MB        size of the single file of "10mb" in MiB [10]
#   STALL_1GB_MB         total MiB of "1gb" [1024], in STALL_1GB_FILES files [4]
#   STALL_SMALL_FILES    files of "100k" (about 200 B each) [100000]
#   STALL_BASELINE_SECS  length of the idle window [1]
#   STALL_COMPRESSOR     --compressor for seamless-commit [the CLI's default]
#   STALL_SAMPLES_OUT    copy the raw TSV samples here
#   SEAMLESS_GRPC_BIN, CHECKPOINTCTL_BIN  binaries (integration/lib.sh: target/debug)
#
# Needs root, gcc with static glibc (libc6-dev), and what integration/lib.sh
# needs. See BENCHMARKS.md, "Seamless commit: observed stall".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NS=seamless-stall
# shellcheck source=integration/lib.sh
source "$HERE/../../integration/lib.sh"

COMMITS=${COMMITS:-20}
WARMUP=${STALL_WARMUP:-1}
SCENARIOS=${STALL_SCENARIOS:-10mb 1gb 100k}
MB_10MB=${STALL_10MB_MB:-10}
MB_1GB=${STALL_1GB_MB:-1024}
FILES_1GB=${STALL_1GB_FILES:-4}
SMALL_FILES=${STALL_SMALL_FILES:-100000}
BASELINE_SECS=${STALL_BASELINE_SECS:-1}
COMPRESSOR=${STALL_COMPRESSOR:-}

die() { echo "commit-stall: $*" >&2; exit 1; }
log() { echo "commit-stall: $*" >&2; }

# --- prerequisites: fail loudly, never skip ---------------------------------
[[ $(id -u) == 0 ]] || die "must run as root (containerd, runc, cgroup freezer)"
for v in COMMITS MB_10MB MB_1GB FILES_1GB SMALL_FILES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "STALL_WARMUP must be a non-negative integer, got '$WARMUP'"
[[ $BASELINE_SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "STALL_BASELINE_SECS must be a number, got '$BASELINE_SECS'"
for s in $SCENARIOS; do
    [[ " 10mb 1gb 100k " == *" $s "* ]] || die "unknown scenario '$s' in STALL_SCENARIOS (10mb 1gb 100k)"
done
for cmd in gcc gzip tar awk sort; do
    command -v "$cmd" >/dev/null || die "missing prerequisite: $cmd"
done
[[ $(gcc -print-file-name=libc.a) == /* ]] || die "static glibc (libc.a) is missing: apt install libc6-dev"
[[ -n ${EPOCHREALTIME:-} ]] || die "bash 5 is needed (EPOCHREALTIME)"
# env_require (lib.sh) checks containerd, runc, registry, busybox and the binaries.

# --- environment --------------------------------------------------------------
env_up
BIN=$ENV_DIR/bench
OUT=$ENV_DIR/out
SAMPLES=$ENV_DIR/samples.tsv
mkdir -p "$BIN" "$OUT"
gcc -O2 -static -Wall -Wextra -Werror -o "$BIN/ticker" "$HERE/ticker.c" ||
    die "gcc -static failed: static glibc (libc.a) comes with libc6-dev"
printf 'scenario\tkind\titeration\tmetric\tvalue_ms\n' >"$SAMPLES"
ctrn images pull --plain-http --snapshotter seamless "$IMAGE" >/dev/null
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# Shell run inside the container: fill the writable layer, then become the ticker.
populate_script() {
    local scenario=$1
    case $scenario in
    10mb) echo "mkdir /data && dd if=/dev/urandom of=/data/blob0 bs=1048576 count=$MB_10MB 2>/dev/null" ;;
    1gb) echo "mkdir /data && i=0 && while [ \$i -lt $FILES_1GB ]; do
            dd if=/dev/urandom of=/data/blob\$i bs=1048576 count=$((MB_1GB / FILES_1GB)) 2>/dev/null || exit 1
            i=\$((i + 1)); done" ;;
    100k) echo "pad=0123456789abcdef; pad=\$pad\$pad\$pad\$pad; pad=\$pad\$pad\$pad
            i=0; while [ \$i -lt $SMALL_FILES ]; do d=/data/small/\$((i / 1000))
            [ -d \$d ] || mkdir -p \$d; echo \"\$i \$pad\" >\$d/f\$i || exit 1; i=\$((i + 1)); done" ;;
    esac
    echo "sync; exec /bench/ticker /out"
}

# Host pid of the container's init (the ticker once populated).
task_pid() { ctrn tasks ls | awk -v id="$1" '$1 == id && $3 == "RUNNING" { print $2 }'; }

# Closes the ticker's current window; prints its max gap in ms.
TICKER_PID=
close_window() {
    local before i line
    before=$(wc -l <"$OUT/windows")
    kill -USR1 "$TICKER_PID" || die "ticker (pid $TICKER_PID) is gone"
    for ((i = 0; i < 2000; i++)); do
        if (($(wc -l <"$OUT/windows") > before)); then
            line=$(sed -n "$((before + 1))p" "$OUT/windows")
            awk '{ printf "%.3f\n", $2 / 1e6 }' <<<"$line"
            return
        fi
        sleep 0.005
    done
    die "ticker did not close window $before within 10s"
}

# Appends one sample: scenario kind iteration metric value_ms.
record() {
    (($3 > 0)) || return 0 # warm-up rounds are numbered <= 0
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$SAMPLES"
}

# A Go duration as checkpointctl prints it ("8.72416ms", "512.3µs",
# "1.5s") -> ms
pause_ms() {
    case $1 in
    *ns) awk -v s="${1%ns}" 'BEGIN { printf "%.6f\n", s / 1000000 }' ;;
    *µs) awk -v s="${1%µs}" 'BEGIN { printf "%.3f\n", s / 1000 }' ;;
    *ms) echo "${1%ms}" ;;
    *m*s) die "a pause of minutes: '$1'" ;;
    *s) awk -v s="${1%s}" 'BEGIN { printf "%.3f\n", s * 1000 }' ;;
    *) die "cannot parse Pause Time '$1'" ;;
    esac
}

ms_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }'; }

measure_baseline() { # scenario iteration
    close_window >/dev/null
    sleep "$BASELINE_SECS"
    record "$1" baseline "$2" idle_window_stall "$(close_window)"
}

measure_seamless() { # scenario iteration container
    local scenario=$1 n=$2 id=$3 target=$REGISTRY/stall:$1-$2 cli_out=$ENV_DIR/cli.out
    local -a extra=()
    [[ -z $COMPRESSOR ]] || extra=(--compressor "$COMPRESSOR")
    : >"$cli_out"
    : >"$cli_out.times"
    close_window >/dev/null
    local t0=$EPOCHREALTIME capture="" line
    # The CLI writes its stdout line by line: the capture window closes as soon
    # as the "created" line arrives, while the CLI goes on following the job.
    while IFS= read -r line; do
        echo "$line" >>"$cli_out"
        if [[ $line == "Seamless snapshot created successfully:"* ]]; then
            capture=$(close_window)
            echo "capture_wall $(ms_since "$t0")" >>"$cli_out.times"
        fi
    done < <(
        rc=0
        checkpointctl seamless-commit --container "$id" --target "$target" --format oci \
            --target-insecure --source-insecure --wait "${extra[@]}" 2>>"$ENV_DIR/cli.err" || rc=$?
        echo "exit $rc"
    )
    local rc
    rc=$(awk '$1 == "exit" { print $2 }' "$cli_out")
    [[ $rc == 0 ]] || { cat "$cli_out" "$ENV_DIR/cli.err" >&2; die "seamless-commit of $id failed (exit $rc)"; }
    [[ -n $capture ]] || { cat "$cli_out" >&2; die "seamless-commit printed no 'created' line"; }
    local background whole pause capture_wall
    background=$(close_window)
    whole=$(ms_since "$t0")
    pause=$(pause_ms "$(awk '$1 == "Pause" && $2 == "Time:" { print $3 }' "$cli_out")")
    capture_wall=$(awk '$1 == "capture_wall" { v = $2 } END { print v }' "$cli_out.times")
    record "$scenario" seamless "$n" stall_capture "$capture"
    record "$scenario" seamless "$n" stall_background "$background"
    record "$scenario" seamless "$n" stall_whole "$(awk -v a="$capture" -v b="$background" 'BEGIN { print (a > b ? a : b) }')"
    record "$scenario" seamless "$n" pause "$pause"
    record "$scenario" seamless "$n" wall_capture "$capture_wall"
    record "$scenario" seamless "$n" wall_whole "$whole"
    log "$scenario seamless #$n: pause ${pause}ms, stall capture ${capture}ms, background ${background}ms, ${whole}ms in all"
}

upper_dir() { # container id -> its snapshot's overlay upperdir on the host
    ctrn snapshots --snapshotter seamless mounts /mnt "$1" | tr ',' '\n' |
        sed -n 's/^upperdir=//p' | tr -d ' '
}

measure_classic() { # scenario iteration container
    local scenario=$1 n=$2 id=$3 upper
    upper=$(upper_dir "$id")
    [[ -d $upper ]] || die "cannot find the upper directory of $id (got '$upper')"
    close_window >/dev/null
    local t0=$EPOCHREALTIME
    ctrn tasks pause "$id"
    if ! tar --numeric-owner --xattrs -C "$upper" -cf - . | gzip >"$ENV_DIR/classic.tar.gz"; then
        ctrn tasks resume "$id"
        die "tar | gzip of $upper failed"
    fi
    ctrn tasks resume "$id"
    local pause stall
    pause=$(ms_since "$t0")
    stall=$(close_window)
    record "$scenario" classic "$n" stall_capture "$stall"
    record "$scenario" classic "$n" stall_whole "$stall"
    record "$scenario" classic "$n" pause "$pause"
    log "$scenario classic #$n: pause ${pause}ms, stall ${stall}ms, layer $(stat -c %s "$ENV_DIR/classic.tar.gz") bytes"
}

run_scenario() {
    local scenario=$1 id=stall-$1 i t0
    rm -f "$OUT/ready" "$OUT/windows"
    log "$scenario: writing the container's writable layer"
    t0=$EPOCHREALTIME
    ctrn run -d --null-io --snapshotter seamless \
        --mount "type=bind,src=$BIN,dst=/bench,options=rbind:ro" \
        --mount "type=bind,src=$OUT,dst=/out,options=rbind:rw" \
        "$IMAGE" "$id" /bin/sh -c "$(populate_script "$scenario")"
    for ((i = 0; i < 36000; i++)); do
        [[ -e $OUT/ready ]] && break
        [[ -n $(task_pid "$id") ]] || die "container $id stopped while writing its layer"
        sleep 0.05
    done
    [[ -e $OUT/ready ]] || die "container $id did not start the ticker within 30 minutes"
    TICKER_PID=$(task_pid "$id")
    local upper
    upper=$(upper_dir "$id")
    log "$scenario: layer written in $(ms_since "$t0")ms: $(du -sh "$upper" | cut -f1), $(find "$upper" | wc -l) entries"
    sync
    for ((i = 1 - WARMUP; i <= COMMITS; i++)); do
        measure_baseline "$scenario" "$i"
        measure_seamless "$scenario" "$i" "$id"
        measure_classic "$scenario" "$i" "$id"
    done
    ctrn tasks kill -s KILL "$id" >/dev/null
    for ((i = 0; i < 100; i++)); do [[ -z $(task_pid "$id") ]] && break; sleep 0.1; done
    ctrn tasks delete "$id" >/dev/null 2>&1 || true
    ctrn containers delete "$id" >/dev/null
}

for s in $SCENARIOS; do run_scenario "$s"; done
[[ -z ${STALL_SAMPLES_OUT:-} ]] || cp "$SAMPLES" "$STALL_SAMPLES_OUT"

# --- report -----------------------------------------------------------------
echo
echo "commit-stall: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r), containerd $(containerd --version | awk '{print $3}')"
echo "daemon $SEAMLESS_BIN, checkpointctl $CHECKPOINTCTL_BIN (repo HEAD $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?')), $(grep -m1 -o 'storage=[^ ]*' "$ENV_DIR/seamless.log" | tr -d '"'), cgroup $(stat -fc %T /sys/fs/cgroup)"
echo "load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "commits per kind and scenario: $COMMITS (+$WARMUP warm-up), baseline window ${BASELINE_SECS}s"
awk -F'\t' -v goal=10 '
function pct(key, p,    n, k, a, i) {
    n = split(vals[key], a, " ")
    if (n == 0) return ""
    # insertion sort: a few dozen samples
    for (i = 2; i <= n; i++) { v = a[i] + 0; for (k = i - 1; k >= 1 && a[k] + 0 > v; k--) a[k + 1] = a[k]; a[k + 1] = v }
    k = int(p * n); if (k < p * n) k++; if (k < 1) k = 1
    return a[k] + 0
}
function ms(v) { return v == "" ? "-" : (v >= 1000 ? sprintf("%.2fs", v / 1000) : sprintf("%.2fms", v)) }
function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.1fx", a / b) }
NR > 1 {
    key = $1 SUBSEP $2 SUBSEP $4
    vals[key] = vals[key] " " $5
    if (!($1 in seen)) { seen[$1] = 1; order[++ns] = $1 }
}
END {
    split("stall_capture stall_background stall_whole pause wall_capture wall_whole", metrics, " ")
    label["stall_capture"] = "observed stall, capture"
    label["stall_background"] = "observed stall, background job"
    label["stall_whole"] = "observed stall, whole command"
    label["pause"] = "pause (seamless: reported)"
    label["wall_capture"] = "CLI wall time to created"
    label["wall_whole"] = "CLI wall time with --wait"
    for (s = 1; s <= ns; s++) {
        sc = order[s]
        printf "\n%s\n", sc
        printf "| %-33s | %12s | %10s | %12s | %10s | %9s | %9s |\n", "metric", "seamless p50", "p99", "classic p50", "p99", "ratio p50", "ratio p99"
        printf "|%s|%s|%s|%s|%s|%s|%s|\n", "-----------------------------------", "--------------", "------------", "--------------", "------------", "-----------", "-----------"
        for (m = 1; m <= 6; m++) {
            me = metrics[m]
            s50 = pct(sc SUBSEP "seamless" SUBSEP me, 0.5); s99 = pct(sc SUBSEP "seamless" SUBSEP me, 0.99)
            c50 = pct(sc SUBSEP "classic" SUBSEP me, 0.5); c99 = pct(sc SUBSEP "classic" SUBSEP me, 0.99)
            printf "| %-33s | %12s | %10s | %12s | %10s | %9s | %9s |\n", label[me], ms(s50), ms(s99), ms(c50), ms(c99), ratio(c50, s50), ratio(c99, s99)
        }
        b50 = pct(sc SUBSEP "baseline" SUBSEP "idle_window_stall", 0.5); b99 = pct(sc SUBSEP "baseline" SUBSEP "idle_window_stall", 0.99)
        printf "| %-33s | %12s | %10s | %12s | %10s | %9s | %9s |\n", "baseline: idle window, no commit", ms(b50), ms(b99), "", "", "", ""
        cap99 = pct(sc SUBSEP "seamless" SUBSEP "stall_capture", 0.99)
        whole99 = pct(sc SUBSEP "seamless" SUBSEP "stall_whole", 0.99)
        printf "goal p99 observed stall < %dms (seamless): capture %s (%s), whole command %s (%s)\n", goal,
            ms(cap99), cap99 < goal ? "ok" : "OVER", ms(whole99), whole99 < goal ? "ok" : "OVER"
    }
    print "\nratio = classic / seamless; percentiles are nearest-rank (below 100 samples, p99 is the largest)"
}' "$SAMPLES"
