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
//	rpull --address SOCKET --namespace NS --snapshotter NAME [--plain-http]
//	      [--hosts-dir DIR] [--user USER:PASSWORD] REF
//
// --hosts-dir reads containerd's certs.d layout (DIR/<host>/hosts.toml, its
// CA files) as containerd's own pulls do; --user answers the registry's
// authentication challenges.
//
// Prints the image's name and manifest digest once it is unpacked.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/remotes/docker/config"
)

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd's socket")
	namespace := flag.String("namespace", "default", "containerd namespace to pull into")
	snapshotter := flag.String("snapshotter", "seamless", "snapshotter to unpack on")
	plainHTTP := flag.Bool("plain-http", false, "talk to the registry over plain HTTP")
	timeout := flag.Duration("timeout", 5*time.Minute, "give up after this long")
	hostsDir := flag.String("hosts-dir", "", "containerd-style certs.d directory of hosts.toml files")
	user := flag.String("user", "", "USER:PASSWORD for the registry")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: rpull [flags] REF")
		flag.PrintDefaults()
		os.Exit(2)
	}
	hosts := hostOptions{plainHTTP: *plainHTTP, dir: *hostsDir, user: *user}
	if err := pull(*address, *namespace, *snapshotter, hosts, *timeout, flag.Arg(0)); err != nil {
		fmt.Fprintf(os.Stderr, "rpull: %v\n", err)
		os.Exit(1)
	}
}

// hostOptions says how the registry is reached.
type hostOptions struct {
	plainHTTP bool
	dir       string
	user      string
}

func pull(address, namespace, snapshotter string, hosts hostOptions, timeout time.Duration, ref string) error {
	client, err := containerd.New(address)
	if err != nil {
		return fmt.Errorf("connecting to containerd at %s: %w", address, err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), namespace), timeout)
	defer cancel()

	options := config.HostOptions{}
	if hosts.plainHTTP {
		options.DefaultScheme = "http"
	}
	if hosts.dir != "" {
		options.HostDir = config.HostDirFromRoot(hosts.dir)
	}
	if hosts.user != "" {
		name, password, found := strings.Cut(hosts.user, ":")
		if !found {
			return fmt.Errorf("--user must be USER:PASSWORD")
		}
		options.Credentials = func(string) (string, string, error) { return name, password, nil }
	}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: config.ConfigureHosts(ctx, options),
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
