// Command snapcycle times Prepare, Mounts, Commit and Remove through
// containerd's snapshots API for several snapshotters in the same containerd,
// interleaved cycle by cycle, and prints median, p90 and the ratio of each
// snapshotter to the first one named (the peer).
//
// Remove through containerd only deletes the metadata record; the backend
// snapshot is removed later by containerd's garbage collector. Each cycle
// therefore runs under its own lease and ends by deleting that lease with
// SynchronousDelete, which waits for the collector; that step is reported as
// the "gc" op so the backend's removal cost is measured rather than leaking
// into the next cycle.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"

	"seamless-bench/internal/benchstat"
)

type options struct {
	address      string
	namespace    string
	snapshotters []string
	cycles       int
	warmup       int
	withParent   bool
	write        bool
	samplesPath  string
	settle       bool
}

func main() {
	var o options
	var snapshotterList string
	flag.StringVar(&o.address, "address", "/run/containerd/containerd.sock", "containerd gRPC address")
	flag.StringVar(&o.namespace, "namespace", "bench", "containerd namespace")
	flag.StringVar(&snapshotterList, "snapshotters", "overlayfs,seamless", "comma-separated snapshotters; ratios are against the first")
	flag.IntVar(&o.cycles, "n", 50, "measured cycles per snapshotter")
	flag.IntVar(&o.warmup, "warmup", 3, "unmeasured cycles per snapshotter before measuring")
	flag.BoolVar(&o.withParent, "parent", true, "prepare every cycle on top of a committed base snapshot holding one file")
	flag.BoolVar(&o.write, "write", true, "mount the active snapshot and write a 4 KiB file before Commit (not timed)")
	flag.StringVar(&o.samplesPath, "samples", "", "append TSV samples to this file")
	flag.BoolVar(&o.settle, "sync", true, "sync(2) after each cycle (not timed) so writeback never lands in the next one")
	flag.Parse()
	o.snapshotters = strings.Split(snapshotterList, ",")

	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "snapcycle: %v\n", err)
		os.Exit(1)
	}
}

func run(o options) error {
	client, err := containerd.New(o.address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w", o.address, err)
	}
	defer client.Close()

	ctx := namespaces.WithNamespace(context.Background(), o.namespace)
	lm := client.LeasesService()

	// The run lease keeps the base snapshots alive across the per-cycle
	// synchronous garbage collections.
	runLease, err := lm.Create(ctx, leases.WithRandomID(), leases.WithExpiration(time.Hour))
	if err != nil {
		return fmt.Errorf("create run lease: %w", err)
	}
	defer func() {
		if err := lm.Delete(ctx, runLease, leases.SynchronousDelete); err != nil {
			fmt.Fprintf(os.Stderr, "snapcycle: delete run lease %s: %v\n", runLease.ID, err)
		}
	}()
	runCtx := leases.WithLease(ctx, runLease.ID)

	prefix := fmt.Sprintf("snapcycle-%d-%d", os.Getpid(), time.Now().UnixNano())
	parents := map[string]string{}
	for _, name := range o.snapshotters {
		sn := client.SnapshotService(name)
		if !o.withParent {
			continue
		}
		base := prefix + "-base"
		if err := prepareWriteCommit(runCtx, sn, base+"-active", base, "", true); err != nil {
			return fmt.Errorf("create base snapshot on %s: %w", name, err)
		}
		parents[name] = base
		defer func(sn snapshots.Snapshotter, name string) {
			if err := sn.Remove(runCtx, base); err != nil {
				fmt.Fprintf(os.Stderr, "snapcycle: remove base snapshot %s on %s: %v\n", base, name, err)
			}
		}(sn, name)
	}

	for i := 0; i < o.warmup; i++ {
		for _, name := range o.snapshotters {
			key := fmt.Sprintf("%s-warmup-%d", prefix, i)
			if _, err := timedCycle(ctx, lm, client.SnapshotService(name), key, parents[name], o.write); err != nil {
				return fmt.Errorf("warmup cycle %d on %s: %w", i, name, err)
			}
		}
	}

	var samples []benchstat.Sample
	for i := 0; i < o.cycles; i++ {
		for _, name := range o.snapshotters {
			key := fmt.Sprintf("%s-%d", prefix, i)
			ops, err := timedCycle(ctx, lm, client.SnapshotService(name), key, parents[name], o.write)
			if err != nil {
				return fmt.Errorf("cycle %d on %s: %w", i, name, err)
			}
			if o.settle {
				syscall.Sync()
			}
			for _, op := range ops {
				samples = append(samples, benchstat.Sample{Bench: "snapcycle", Op: op.name, Snapshotter: name, Iteration: i, Duration: op.took})
			}
		}
	}

	fmt.Printf("snapcycle: %d cycles per snapshotter, interleaved, parent=%v write=%v sync=%v, ratios against %s\n", o.cycles, o.withParent, o.write, o.settle, o.snapshotters[0])
	if err := benchstat.PrintTable(os.Stdout, samples, o.snapshotters, 0); err != nil {
		return err
	}
	if o.samplesPath != "" {
		return benchstat.WriteSamples(o.samplesPath, samples)
	}
	return nil
}

type opTime struct {
	name string
	took time.Duration
}

// timedCycle runs Prepare, Mounts, Commit, Remove and the synchronous
// collection of the removed snapshot under a lease of its own. The write
// between Mounts and Commit is not timed.
func timedCycle(ctx context.Context, lm leases.Manager, sn snapshots.Snapshotter, key, parent string, write bool) ([]opTime, error) {
	lease, err := lm.Create(ctx, leases.WithRandomID(), leases.WithExpiration(10*time.Minute))
	if err != nil {
		return nil, fmt.Errorf("create cycle lease: %w", err)
	}
	cctx := leases.WithLease(ctx, lease.ID)
	active, committed := key+"-active", key

	var ops []opTime
	start := time.Now()
	step := func(name string, fn func() error) error {
		t := time.Now()
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		ops = append(ops, opTime{name, time.Since(t)})
		return nil
	}

	if err := step("prepare", func() error { _, err := sn.Prepare(cctx, active, parent); return err }); err != nil {
		return nil, err
	}
	var mounts []mount.Mount
	if err := step("mounts", func() error { var err error; mounts, err = sn.Mounts(cctx, active); return err }); err != nil {
		return nil, err
	}
	var untimed time.Duration
	if write {
		t := time.Now()
		if err := writeFile(mounts); err != nil {
			return nil, err
		}
		untimed = time.Since(t)
	}
	if err := step("commit", func() error { return sn.Commit(cctx, committed, active) }); err != nil {
		return nil, err
	}
	if err := step("remove", func() error { return sn.Remove(cctx, committed) }); err != nil {
		return nil, err
	}
	if err := step("gc", func() error { return lm.Delete(ctx, lease, leases.SynchronousDelete) }); err != nil {
		return nil, err
	}
	ops = append(ops, opTime{"cycle", time.Since(start) - untimed})
	return ops, nil
}

func prepareWriteCommit(ctx context.Context, sn snapshots.Snapshotter, active, committed, parent string, write bool) error {
	mounts, err := sn.Prepare(ctx, active, parent)
	if err != nil {
		return fmt.Errorf("prepare %s: %w", active, err)
	}
	if write {
		if err := writeFile(mounts); err != nil {
			return err
		}
	}
	if err := sn.Commit(ctx, committed, active); err != nil {
		return fmt.Errorf("commit %s: %w", active, err)
	}
	return nil
}

// writeFile mounts the snapshot the way a container would and writes one
// file, which proves the returned mounts are usable and gives Commit data.
func writeFile(mounts []mount.Mount) (err error) {
	dir, err := os.MkdirTemp("", "snapcycle-mnt-")
	if err != nil {
		return fmt.Errorf("create mount point: %w", err)
	}
	defer os.Remove(dir)
	if err := mount.All(mounts, dir); err != nil {
		return fmt.Errorf("mount %v at %s: %w", mounts, dir, err)
	}
	defer func() {
		if uerr := mount.UnmountAll(dir, 0); uerr != nil && err == nil {
			err = fmt.Errorf("unmount %s: %w", dir, uerr)
		}
	}()
	name := filepath.Join(dir, fmt.Sprintf("snapcycle-%d", time.Now().UnixNano()))
	if err := os.WriteFile(name, make([]byte, 4096), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}
