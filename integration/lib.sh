# shellcheck shell=bash
# Shared shell environment for the demo (and scripts that want a private
# registry + containerd + seamless daemon). Source it, call env_up, use
# `ctrn` (ctr against our containerd and namespace); env_down runs on exit.
#
#   env_up            temp dir, registry, test image pushed, daemon, containerd
#   IMAGE             the pushed test image reference
#   ctrn ARGS...      ctr --address <ours> -n $NS ARGS...
#   SEAMLESS_CONFIG   (optional) a daemon config file passed as --config

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEAMLESS_BIN=${SEAMLESS_GRPC_BIN:-$REPO/target/debug/containerd-seamless-grpc}
CHECKPOINTCTL_BIN=${CHECKPOINTCTL_BIN:-$REPO/target/debug/checkpointctl}
NS=${NS:-seamless-demo}
declare -A ENV_PIDS=()

env_die() { echo "error: $*" >&2; exit 1; }
env_log() { echo "==> $*" >&2; }

env_require() {
    [[ $(id -u) == 0 ]] || env_die "run as root (containers, mounts, loop devices)"
    local tool
    for tool in containerd ctr runc docker-registry mkfs.btrfs busybox sha256sum tar jq ss curl; do
        command -v "$tool" >/dev/null || env_die "$tool is missing: run 'bash .ci/setup' first"
    done
    [[ -x $SEAMLESS_BIN ]] || env_die "$SEAMLESS_BIN is missing: run 'cargo build' (or 'bash .ci/setup')"
    [[ -x $CHECKPOINTCTL_BIN ]] || env_die "$CHECKPOINTCTL_BIN is missing: run 'cargo build' (or 'bash .ci/setup')"
}

ctrn() { ctr --address "$ENV_DIR/c.sock" -n "$NS" "$@"; }
checkpointctl() { "$CHECKPOINTCTL_BIN" --address "$ENV_DIR/s.sock" --namespace "$NS" "$@"; }

env_wait() { # what, seconds, pid, command...
    local what=$1 secs=$2 pid=$3 i
    shift 3
    for ((i = 0; i < secs * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || { tail -20 "$ENV_DIR"/*.log >&2; env_die "$what exited"; }
        sleep 0.1
    done
    env_die "$what not ready after ${secs}s"
}

env_free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        [[ -z $(ss -Hltn "sport = :$port") ]] && { echo "$port"; return; }
    done
    env_die "no free TCP port"
}

env_start() { # name, command... (logs to $ENV_DIR/name.log)
    local name=$1
    shift
    "$@" >"$ENV_DIR/$name.log" 2>&1 &
    ENV_PIDS[$name]=$!
}

env_stop() {
    local name=$1 pid=${ENV_PIDS[$1]:-} i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

env_down() {
    local rc=$?
    set +e
    if [[ -n ${ENV_PIDS[containerd]:-} ]]; then
        for id in $(ctrn tasks ls -q 2>/dev/null); do
            ctrn tasks kill -s KILL "$id" >/dev/null 2>&1
            ctrn tasks delete -f "$id" >/dev/null 2>&1
        done
        for id in $(ctrn containers ls -q 2>/dev/null); do ctrn containers delete "$id" >/dev/null 2>&1; done
    fi
    env_stop containerd
    for pidfile in "$ENV_DIR"/c/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
        [[ -f $pidfile ]] && kill -KILL "$(cat "$pidfile")" 2>/dev/null
    done
    env_stop seamless
    # Serving processes of Nydus mounts outlive the daemon by design.
    pkill -KILL -f "serve-rafs --dir $ENV_DIR/" 2>/dev/null
    env_stop registry
    findmnt -rn -o TARGET | grep "^$ENV_DIR/" | sort -r | while read -r m; do umount -l "$m"; done
    rmdir "/run/containerd/runc/$NS" 2>/dev/null
    rm -rf --one-file-system "$ENV_DIR"
    exit "$rc"
}

# Builds integration/rpull offline into $ENV_DIR/rpull (containerd's Go
# sources from Debian) and sets RPULL.
env_build_rpull() {
    command -v go >/dev/null || env_die "go not found: apt-get install golang-go"
    [[ -d /usr/share/gocode/src/github.com/containerd/containerd ]] ||
        env_die "containerd Go sources missing: apt-get install golang-github-containerd-containerd-dev"
    RPULL=$ENV_DIR/rpull
    (cd "$REPO/integration/rpull" && GO111MODULE=off GOFLAGS= GOPROXY=off CGO_ENABLED=0 \
        GOPATH="$ENV_DIR/gopath:/usr/share/gocode" GOCACHE="$ENV_DIR/gocache" go build -o "$RPULL" .) ||
        env_die "building integration/rpull failed"
}

# Builds an OCI image from static busybox (no network) and pushes it.
env_push_image() {
    local img=$ENV_DIR/image root=$ENV_DIR/image/rootfs
    mkdir -p "$root/bin" "$root/etc" "$img/blobs/sha256"
    cp /usr/bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    echo "seamless demo image" >"$root/etc/motd"
    tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$img/layer.tar" .
    local layer_digest layer_size config_digest config_size manifest_digest manifest_size
    layer_digest=$(sha256sum "$img/layer.tar" | cut -d' ' -f1)
    layer_size=$(stat -c %s "$img/layer.tar")
    mv "$img/layer.tar" "$img/blobs/sha256/$layer_digest"
    jq -cn --arg d "sha256:$layer_digest" '{architecture: "amd64", os: "linux",
        config: {Cmd: ["/bin/sh"], Env: ["PATH=/bin"]},
        rootfs: {type: "layers", diff_ids: [$d]},
        history: [{created_by: "seamless demo: busybox"}]}' >"$img/config.json"
    config_digest=$(sha256sum "$img/config.json" | cut -d' ' -f1)
    config_size=$(stat -c %s "$img/config.json")
    mv "$img/config.json" "$img/blobs/sha256/$config_digest"
    jq -cn --arg c "sha256:$config_digest" --argjson cs "$config_size" \
        --arg l "sha256:$layer_digest" --argjson ls "$layer_size" '{schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
        layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls}]}' >"$img/manifest.json"
    manifest_digest=$(sha256sum "$img/manifest.json" | cut -d' ' -f1)
    manifest_size=$(stat -c %s "$img/manifest.json")
    mv "$img/manifest.json" "$img/blobs/sha256/$manifest_digest"
    jq -cn --arg m "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg ref "$IMAGE" '{schemaVersion: 2,
        manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
        annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": "1"}}]}' >"$img/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$img/oci-layout"
    tar -C "$img" -cf "$ENV_DIR/image.tar" oci-layout index.json blobs
    ctrn images import --no-unpack --index-name "$IMAGE" "$ENV_DIR/image.tar" >/dev/null
    ctrn images push --plain-http "$IMAGE" >/dev/null
    ctrn images rm --sync "$IMAGE" >/dev/null
}

env_up() {
    env_require
    ENV_DIR=$(mktemp -d /tmp/seamless-env.XXXXXX)
    trap env_down EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local port
    port=$(env_free_port)
    REGISTRY=127.0.0.1:$port
    IMAGE=$REGISTRY/seamless-demo:1
    cat >"$ENV_DIR/registry.yml" <<EOT
version: 0.1
storage:
  filesystem:
    rootdirectory: $ENV_DIR/registry
http:
  addr: 127.0.0.1:$port
EOT
    env_start registry docker-registry serve "$ENV_DIR/registry.yml"
    env_wait "registry" 20 "${ENV_PIDS[registry]}" curl -sf "http://127.0.0.1:$port/v2/"

    env_log "starting containerd-seamless-grpc (root $ENV_DIR/seamless)"
    env_start seamless "$SEAMLESS_BIN" --root "$ENV_DIR/seamless" --address "$ENV_DIR/s.sock" \
        --containerd-address "$ENV_DIR/c.sock" --log-level "${SEAMLESS_LOG_LEVEL:-info}" \
        ${SEAMLESS_CONFIG:+--config "$SEAMLESS_CONFIG"}
    env_wait "containerd-seamless-grpc" 30 "${ENV_PIDS[seamless]}" test -S "$ENV_DIR/s.sock"

    mkdir -p "$ENV_DIR/c/root/io.containerd.snapshotter.v1.seamless"
    cat >"$ENV_DIR/containerd.toml" <<EOT
version = 2
root = "$ENV_DIR/c/root"
state = "$ENV_DIR/c/state"
[grpc]
  address = "$ENV_DIR/c.sock"
[proxy_plugins.seamless]
  type = "snapshot"
  address = "$ENV_DIR/s.sock"
EOT
    env_start containerd containerd --config "$ENV_DIR/containerd.toml"
    env_wait "containerd" 30 "${ENV_PIDS[containerd]}" ctr --address "$ENV_DIR/c.sock" version
    env_log "building and pushing $IMAGE"
    env_push_image
}
