// Command rpull pulls an image into containerd with containerd's client and
// unpacks it on a snapshotter the way CRI and nerdctl do: each layer's
// `containerd.io/snapshot/*` annotations, and the image's reference and the
// layer's digest added by the image handler, reach the snapshotter as labels
// of its Prepare. `ctr images pull` of containerd 1.6 passes none of them,
// and a remote snapshotter needs them to fetch what containerd does not: our
// snapshotter fetches Nydus data blobs itself.
//
// Usage:
//
//	rpull --address SOCKET --namespace NS --snapshotter NAME [--plain-http] REF
//
// Prints the image's name and manifest digest once it is unpacked.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
)

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd's socket")
	namespace := flag.String("namespace", "default", "containerd namespace to pull into")
	snapshotter := flag.String("snapshotter", "seamless", "snapshotter to unpack on")
	plainHTTP := flag.Bool("plain-http", false, "talk to the registry over plain HTTP")
	timeout := flag.Duration("timeout", 5*time.Minute, "give up after this long")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: rpull [flags] REF")
		flag.PrintDefaults()
		os.Exit(2)
	}
	if err := pull(*address, *namespace, *snapshotter, *plainHTTP, *timeout, flag.Arg(0)); err != nil {
		fmt.Fprintf(os.Stderr, "rpull: %v\n", err)
		os.Exit(1)
	}
}

func pull(address, namespace, snapshotter string, plainHTTP bool, timeout time.Duration, ref string) error {
	client, err := containerd.New(address)
	if err != nil {
		return fmt.Errorf("connecting to containerd at %s: %w", address, err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), namespace), timeout)
	defer cancel()

	var registryOpts []docker.RegistryOpt
	if plainHTTP {
		registryOpts = append(registryOpts, docker.WithPlainHTTP(docker.MatchAllHosts))
	}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(registryOpts...),
	})
	image, err := client.Pull(ctx, ref,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		// Adds cri.image-ref, cri.layer-digest and the like to every layer
		// descriptor, which the unpacker hands on as snapshot labels.
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		return fmt.Errorf("pulling %s onto snapshotter %s: %w", ref, snapshotter, err)
	}
	fmt.Printf("%s %s\n", image.Name(), image.Target().Digest)
	return nil
}
