//go:build linux
// +build linux

// Package conformance runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite) against a real
// containerd-seamless-grpc process, reached through containerd's own proxy
// snapshotter client. Each sub-test gets a fresh daemon on its own root and
// socket; the cleanup stops it with SIGTERM and leaves no mount or loop
// device behind. It only drives the daemon: it never implements snapshots.
//
// Run it through run.sh beside this file (root, GOPATH mode, three storage
// configurations); see README.md for what the suite demands of the daemon.
package conformance

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/log/logtest"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/containerd/continuity/fs/fstest"
	"golang.org/x/sys/unix"
)

const (
	envBinary  = "SEAMLESS_GRPC_BIN"
	envBackend = "SEAMLESS_CONFORMANCE_BACKEND"
	envSockDir = "SEAMLESS_CONFORMANCE_SOCKDIR"
	envLogDir  = "SEAMLESS_CONFORMANCE_LOGDIR"

	// suiteName names the snapshotter in the suite's temp dirs
	// (snapshot-suite-Seamless-*) and in its one name-based skip (Aufs).
	suiteName = "Seamless"

	// Longest run-dir parent that keeps "<dir>/ssc-NNNNNNNNNN/grpc.sock"
	// inside sun_path (108 bytes, NUL included).
	maxSockDirLen = 107 - len("/ssc-0123456789/grpc.sock")
)

func TestSeamlessConformance(t *testing.T) {
	cfg := requireSetup(t)

	testsuite.SnapshotterSuite(t, suiteName, cfg.newSnapshotter)

	// The suite's Rename check calls t.Skip before doing anything ("rename test
	// still fails on some kernels with overlay"), so it never exercises the
	// daemon. The same check, run for real:
	t.Run("RenameUnskipped", func(t *testing.T) {
		runOnFreshDaemon(t, cfg, checkRenameUnskipped)
	})
}

// requireSetup fails (never skips) when the run cannot be a real one.
func requireSetup(t *testing.T) daemonConfig {
	t.Helper()
	// The flag is registered by containerd's pkg/testutil, which the suite imports.
	if f := flag.Lookup("test.root"); f == nil || f.Value.String() != "true" {
		t.Fatal("pass -test.root: the suite mounts overlay, bind and loop filesystems")
	}
	if os.Geteuid() != 0 {
		t.Fatalf("must run as root, running as uid %d", os.Geteuid())
	}

	cfg := daemonConfig{
		binary:  os.Getenv(envBinary),
		backend: os.Getenv(envBackend),
		sockDir: os.Getenv(envSockDir),
		logDir:  os.Getenv(envLogDir),
	}
	if cfg.binary == "" {
		t.Fatalf("%s must name the containerd-seamless-grpc binary", envBinary)
	}
	if st, err := os.Stat(cfg.binary); err != nil {
		t.Fatalf("%s: %v", envBinary, err)
	} else if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
		t.Fatalf("%s=%s is not an executable file", envBinary, cfg.binary)
	}
	switch cfg.backend {
	case "", "auto", "btrfs", "pool", "directory":
	default:
		t.Fatalf("%s=%q: want directory, btrfs, pool or auto", envBackend, cfg.backend)
	}
	if cfg.sockDir == "" {
		cfg.sockDir = "/tmp"
	}
	if len(cfg.sockDir) > maxSockDirLen {
		t.Fatalf("%s=%s is longer than %d bytes: socket paths would not fit sun_path", envSockDir, cfg.sockDir, maxSockDirLen)
	}
	for _, dir := range []string{cfg.sockDir, cfg.logDir} {
		if dir == "" {
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("daemon %s, backend %q, suite temp dir %s", cfg.binary, cfg.backend, os.TempDir())
	return cfg
}

// runOnFreshDaemon sets a check up exactly as the suite's makeTest does:
// parallel, namespaced context, <tmp>/root for the snapshotter, <tmp>/work
// for the check.
func runOnFreshDaemon(t *testing.T, cfg daemonConfig, check func(context.Context, *testing.T, snapshots.Snapshotter, string)) {
	t.Parallel()
	ctx := logtest.WithT(context.Background(), t)
	ctx = namespaces.WithNamespace(ctx, "testsuite")

	tmpDir, err := os.MkdirTemp("", "snapshot-suite-"+suiteName+"-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmpDir)
	root := filepath.Join(tmpDir, "root")
	work := filepath.Join(tmpDir, "work")
	for _, dir := range []string{root, work} {
		if err := os.MkdirAll(dir, 0o777); err != nil {
			t.Fatal(err)
		}
	}

	sn, cleanup, err := cfg.newSnapshotter(ctx, root)
	if err != nil {
		t.Fatalf("Failed to initialize snapshotter: %+v", err)
	}
	defer func() {
		if err := cleanup(); err != nil {
			t.Errorf("Cleanup failed: %v", err)
		}
	}()
	check(ctx, t, sn, work)
}

// checkRenameUnskipped is the suite's checkRename (docker/docker#25409)
// without its unconditional skip: renames of a lower directory and of lower
// files, and a rename over a lower file, must show in the next layer.
func checkRenameUnskipped(ctx context.Context, t *testing.T, sn snapshots.Snapshotter, work string) {
	l1 := fstest.Apply(
		fstest.CreateDir("/dir1", 0o700),
		fstest.CreateDir("/somefiles", 0o700),
		fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0o644),
		fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0o644),
	)
	l2 := fstest.Apply(
		fstest.Rename("/dir1", "/dir2"),
		fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0o644),
		fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
		fstest.Rename("/somefiles/f2", "/somefiles/f3"),
	)
	if err := checkLayerChain(ctx, sn, work, l1, l2); err != nil {
		t.Fatalf("Check snapshots failed: %+v", err)
	}
}

var gcRootLabel = snapshots.WithLabels(map[string]string{
	"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339),
})

// checkLayerChain commits one snapshot per applier, each on the previous one,
// and compares a View of every commit with the same appliers run on a plain
// directory.
func checkLayerChain(ctx context.Context, sn snapshots.Snapshotter, work string, layers ...fstest.Applier) error {
	flat, err := os.MkdirTemp(work, "flat")
	if err != nil {
		return err
	}
	parent := ""
	for i, layer := range layers {
		name := fmt.Sprintf("layer-%d", i)
		active := name + "-active"
		mounts, err := sn.Prepare(ctx, active, parent, gcRootLabel)
		if err != nil {
			return fmt.Errorf("prepare %s: %w", active, err)
		}
		if err := withMounted(work, mounts, layer.Apply); err != nil {
			return fmt.Errorf("apply layer %d: %w", i, err)
		}
		if err := sn.Commit(ctx, name, active, gcRootLabel); err != nil {
			return fmt.Errorf("commit %s: %w", name, err)
		}
		if err := layer.Apply(flat); err != nil {
			return fmt.Errorf("apply layer %d to the flat directory: %w", i, err)
		}

		view := name + "-view"
		mounts, err = sn.View(ctx, view, name, gcRootLabel)
		if err != nil {
			return fmt.Errorf("view %s: %w", name, err)
		}
		if err := withMounted(work, mounts, func(dir string) error {
			return fstest.CheckDirectoryEqual(flat, dir)
		}); err != nil {
			return fmt.Errorf("layer %d: %w", i, err)
		}
		if err := sn.Remove(ctx, view); err != nil {
			return fmt.Errorf("remove %s: %w", view, err)
		}
		parent = name
	}
	return nil
}

// withMounted mounts on a fresh directory under work, runs fn, and unmounts
// the way the suite does (lazily).
func withMounted(work string, mounts []mount.Mount, fn func(dir string) error) (err error) {
	dir, err := os.MkdirTemp(work, "mnt")
	if err != nil {
		return err
	}
	if err := mount.All(mounts, dir); err != nil {
		return fmt.Errorf("mount %+v: %w", mounts, err)
	}
	defer func() {
		if uerr := mount.UnmountAll(dir, unix.MNT_DETACH); uerr != nil && err == nil {
			err = fmt.Errorf("unmount %s: %w", dir, uerr)
		}
	}()
	return fn(dir)
}
