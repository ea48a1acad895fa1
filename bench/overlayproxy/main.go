// Command overlayproxy serves containerd's own overlay snapshotter over the
// proxy snapshotter API on a unix socket. It is a reference, not a product:
// benchmarked next to the built-in overlayfs it shows what the proxy hop
// alone costs (gRPC over a socket plus a second process), the floor under
// any proxy snapshotter's ratio. bench/run.sh uses it when
// BENCH_SNAPSHOTTERS names "overlayproxy".
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "directory for snapshot data")
	address := flag.String("address", "", "unix socket to serve on")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "overlayproxy: --root and --address are required")
		os.Exit(2)
	}
	if err := serve(*root, *address); err != nil {
		fmt.Fprintf(os.Stderr, "overlayproxy: %v\n", err)
		os.Exit(1)
	}
}

func serve(root, address string) error {
	sn, err := overlay.NewSnapshotter(root)
	if err != nil {
		return fmt.Errorf("create overlay snapshotter in %s: %w", root, err)
	}
	defer sn.Close()

	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))

	if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove stale socket %s: %w", address, err)
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", address, err)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		server.GracefulStop()
	}()
	return server.Serve(l)
}
