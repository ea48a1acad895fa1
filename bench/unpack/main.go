// Command unpack times unpacking an image whose content is already in
// containerd's content store into several snapshotters of the same
// containerd, interleaved, and prints median, p90 and the ratio of each
// snapshotter to the first one named (the peer).
//
// Before each unpack the image's snapshots on that snapshotter are removed
// and containerd's garbage collector is run synchronously, so every unpack
// starts from nothing and no backend cleanup overlaps a measurement. That
// removal is reported as its own op, "remove+gc".
//
// Afterwards every snapshotter's unpacked root filesystem is listed through a
// mounted View and the listings must be identical: otherwise the timings
// compare different work and the run fails.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"seamless-bench/internal/benchstat"
)

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd gRPC address")
	namespace := flag.String("namespace", "bench", "containerd namespace")
	ref := flag.String("image", "", "image reference whose content is already in the content store")
	snapshotterList := flag.String("snapshotters", "overlayfs,seamless", "comma-separated snapshotters; ratios are against the first")
	n := flag.Int("n", 10, "measured unpacks per snapshotter")
	warmup := flag.Int("warmup", 1, "unmeasured unpacks per snapshotter before measuring")
	samplesPath := flag.String("samples", "", "append TSV samples to this file")
	listings := flag.String("listings", "", "write each snapshotter's rootfs listing to DIR/rootfs-<snapshotter>.txt")
	settle := flag.Bool("sync", true, "sync(2) after removing snapshots and before each timed unpack (not timed)")
	flag.Parse()
	if *ref == "" {
		fmt.Fprintln(os.Stderr, "unpack: -image is required")
		os.Exit(2)
	}
	if err := run(*address, *namespace, *ref, strings.Split(*snapshotterList, ","), *n, *warmup, *samplesPath, *listings, *settle); err != nil {
		fmt.Fprintf(os.Stderr, "unpack: %v\n", err)
		os.Exit(1)
	}
}

func run(address, namespace, ref string, snapshotters []string, n, warmup int, samplesPath, listings string, settle bool) error {
	client, err := containerd.New(address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w", address, err)
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), namespace)

	image, err := client.GetImage(ctx, ref)
	if err != nil {
		return fmt.Errorf("get image %s: %w", ref, err)
	}
	diffIDs, err := image.RootFS(ctx)
	if err != nil {
		return fmt.Errorf("read rootfs of %s: %w", ref, err)
	}
	if len(diffIDs) == 0 {
		return fmt.Errorf("image %s has no layers", ref)
	}
	// ChainIDs rewrites its argument in place; keep diffIDs intact.
	chainIDs := identity.ChainIDs(append([]digest.Digest(nil), diffIDs...))

	var samples []benchstat.Sample
	for i := -warmup; i < n; i++ {
		for _, name := range snapshotters {
			removal, unpack, err := timedUnpack(ctx, client, image, name, chainIDs, settle)
			if err != nil {
				return fmt.Errorf("iteration %d on %s: %w", i, name, err)
			}
			if i < 0 {
				continue
			}
			samples = append(samples,
				benchstat.Sample{Bench: "unpack", Op: fmt.Sprintf("unpack %d layers", len(chainIDs)), Snapshotter: name, Iteration: i, Duration: unpack},
				benchstat.Sample{Bench: "unpack", Op: "remove+gc", Snapshotter: name, Iteration: i, Duration: removal},
			)
		}
	}

	fmt.Printf("unpack: %s, %d layers, %d unpacks per snapshotter, interleaved, ratios against %s\n", ref, len(chainIDs), n, snapshotters[0])
	if err := benchstat.PrintTable(os.Stdout, samples, snapshotters, 0); err != nil {
		return err
	}
	if samplesPath != "" {
		if err := benchstat.WriteSamples(samplesPath, samples); err != nil {
			return err
		}
	}
	return compareRootfs(ctx, client, snapshotters, chainIDs[len(chainIDs)-1].String(), listings)
}

// compareRootfs lists the image's root filesystem on every snapshotter and
// fails unless all listings equal the first one.
func compareRootfs(ctx context.Context, client *containerd.Client, snapshotters []string, chainID, listings string) error {
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		return fmt.Errorf("create lease: %w", err)
	}
	defer done(ctx)

	var first []string
	for _, name := range snapshotters {
		lines, err := listRootfs(ctx, client.SnapshotService(name), chainID)
		if err != nil {
			return fmt.Errorf("list rootfs on %s: %w", name, err)
		}
		if listings != "" {
			path := filepath.Join(listings, "rootfs-"+name+".txt")
			if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
				return fmt.Errorf("write listing %s: %w", path, err)
			}
		}
		if first == nil {
			first = lines
			continue
		}
		if diff := firstDifferences(first, lines, 10); len(diff) > 0 {
			return fmt.Errorf("rootfs on %s differs from %s (- %s, + %s):\n%s",
				name, snapshotters[0], snapshotters[0], name, strings.Join(diff, "\n"))
		}
	}
	fmt.Printf("unpack: rootfs identical on %s (%d entries)\n", strings.Join(snapshotters, ", "), len(first))
	return nil
}

// listRootfs mounts a read-only view of chainID and returns one sorted line
// per entry: path, type, mode, size and content digest of regular files,
// target of symlinks.
func listRootfs(ctx context.Context, sn snapshots.Snapshotter, chainID string) (lines []string, err error) {
	key := fmt.Sprintf("unpack-verify-%d-%d", os.Getpid(), time.Now().UnixNano())
	mounts, err := sn.View(ctx, key, chainID)
	if err != nil {
		return nil, fmt.Errorf("view %s: %w", chainID, err)
	}
	defer func() {
		if rerr := sn.Remove(ctx, key); rerr != nil && err == nil {
			err = fmt.Errorf("remove view %s: %w", key, rerr)
		}
	}()
	dir, err := os.MkdirTemp("", "unpack-verify-")
	if err != nil {
		return nil, fmt.Errorf("create mount point: %w", err)
	}
	defer os.Remove(dir)
	if err := mount.All(mounts, dir); err != nil {
		return nil, fmt.Errorf("mount %v at %s: %w", mounts, dir, err)
	}
	defer func() {
		if uerr := mount.UnmountAll(dir, 0); uerr != nil && err == nil {
			err = fmt.Errorf("unmount %s: %w", dir, uerr)
		}
	}()

	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == dir {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		line := fmt.Sprintf("%s %s %o", rel, entryType(info.Mode()), info.Mode().Perm())
		switch {
		case info.Mode().IsRegular():
			sum, err := fileDigest(path)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" %d %s", info.Size(), sum)
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			line += " -> " + target
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk %s: %w", dir, err)
	}
	sort.Strings(lines)
	return lines, nil
}

func fileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	d, err := digest.SHA256.FromReader(f)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return d.Encoded()[:16], nil
}

func entryType(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "d"
	case m&fs.ModeSymlink != 0:
		return "l"
	case m&fs.ModeCharDevice != 0:
		return "c"
	case m&fs.ModeDevice != 0:
		return "b"
	case m&fs.ModeNamedPipe != 0:
		return "p"
	case m&fs.ModeSocket != 0:
		return "s"
	default:
		return "f"
	}
}

// firstDifferences returns up to max lines present in only one of a and b,
// both sorted, prefixed "-" (only in a) or "+" (only in b).
func firstDifferences(a, b []string, max int) []string {
	var out []string
	i, j := 0, 0
	for (i < len(a) || j < len(b)) && len(out) < max {
		switch {
		case j == len(b) || (i < len(a) && a[i] < b[j]):
			out = append(out, "- "+a[i])
			i++
		case i == len(a) || b[j] < a[i]:
			out = append(out, "+ "+b[j])
			j++
		default:
			i++
			j++
		}
	}
	return out
}

// timedUnpack removes the image's snapshots on the snapshotter, waits for the
// garbage collector to remove them from the backend, optionally syncs
// filesystems (not timed), then unpacks the image.
func timedUnpack(ctx context.Context, client *containerd.Client, image containerd.Image, snapshotter string, chainIDs []digest.Digest, settle bool) (removal, unpack time.Duration, err error) {
	sn := client.SnapshotService(snapshotter)
	start := time.Now()
	// Children first: a snapshot with children cannot be removed.
	for i := len(chainIDs) - 1; i >= 0; i-- {
		if err := sn.Remove(ctx, chainIDs[i].String()); err != nil && !errdefs.IsNotFound(err) {
			return 0, 0, fmt.Errorf("remove snapshot %s: %w", chainIDs[i], err)
		}
	}
	if err := collectGarbage(ctx, client.LeasesService()); err != nil {
		return 0, 0, err
	}
	removal = time.Since(start)
	if settle {
		// Deleting thousands of files leaves writeback and, on filesystems
		// mounted with discard, block discards queued in the kernel; flush
		// them so they do not land in the unpack that follows.
		syscall.Sync()
	}

	start = time.Now()
	if err := image.Unpack(ctx, snapshotter); err != nil {
		return 0, 0, fmt.Errorf("unpack %s: %w", image.Name(), err)
	}
	unpack = time.Since(start)

	ok, err := image.IsUnpacked(ctx, snapshotter)
	if err != nil {
		return 0, 0, fmt.Errorf("check unpack of %s: %w", image.Name(), err)
	}
	if !ok {
		return 0, 0, errors.New("image reports not unpacked after Unpack")
	}
	return removal, unpack, nil
}

// collectGarbage runs containerd's garbage collector and waits for it: the
// only client-side way to do that in containerd 1.6 is to delete a lease
// with SynchronousDelete.
func collectGarbage(ctx context.Context, lm leases.Manager) error {
	l, err := lm.Create(ctx, leases.WithRandomID(), leases.WithExpiration(time.Minute))
	if err != nil {
		return fmt.Errorf("create gc lease: %w", err)
	}
	if err := lm.Delete(ctx, l, leases.SynchronousDelete); err != nil {
		return fmt.Errorf("delete gc lease %s synchronously: %w", l.ID, err)
	}
	return nil
}
