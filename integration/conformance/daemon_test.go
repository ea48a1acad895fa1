//go:build linux
// +build linux

package conformance

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

const (
	// proxyPluginName is the name containerd would know the plugin by
	// ([proxy_plugins.seamless]); the proxy sends it as the Snapshotter field.
	proxyPluginName = "seamless"

	readyTimeout = 20 * time.Second
	stopTimeout  = 30 * time.Second
	// loopReleaseTimeout bounds how long the kernel may take to drop an
	// autoclear loop device once the pool's superblock is gone.
	loopReleaseTimeout = 5 * time.Second
	logTailLines       = 60
)

// daemonConfig says how every daemon of one run is started.
type daemonConfig struct {
	binary  string
	backend string // "" leaves --config off: the daemon's defaults
	sockDir string // parent of the per-daemon run directories (short: sun_path is 108 bytes)
	logDir  string // "" keeps each log in the run directory, removed at cleanup
}

// daemon is one containerd-seamless-grpc process serving one suite root.
type daemon struct {
	cmd     *exec.Cmd
	runDir  string
	socket  string
	logPath string
	logFile *os.File
	exited  chan struct{}
	waitErr error // set before exited is closed
}

// newSnapshotter is the testsuite.SnapshotterFunc: a fresh daemon on
// <root>/daemon, reached through containerd's own proxy snapshotter.
func (c daemonConfig) newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	d, err := c.startDaemon(ctx, filepath.Join(root, "daemon"))
	if err != nil {
		return nil, nil, joinErrors(err, releaseMounts(ctx, root))
	}
	conn, err := dialLikeContainerd(d.socket)
	if err != nil {
		return nil, nil, joinErrors(fmt.Errorf("dial %s: %w", d.socket, err), d.stop(), releaseMounts(ctx, root), d.removeRunDir())
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), proxyPluginName)
	cleanup := func() error {
		var errs []error
		if err := conn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close grpc connection: %w", err))
		}
		errs = append(errs, d.stop(), releaseMounts(ctx, root), d.removeRunDir())
		return joinErrors(errs...)
	}
	return sn, cleanup, nil
}

// configTOML is the daemon config for a backend; the pool is capped so that
// parallel sub-tests do not each reserve half the disk.
func configTOML(backend string) string {
	var b strings.Builder
	b.WriteString("version = 1\n[storage]\n")
	fmt.Fprintf(&b, "backend = %q\n", backend)
	if backend == "pool" || backend == "auto" {
		b.WriteString("pool_size = \"2GiB\"\n")
	}
	return b.String()
}

func (c daemonConfig) startDaemon(ctx context.Context, daemonRoot string) (*daemon, error) {
	runDir, err := os.MkdirTemp(c.sockDir, "ssc-")
	if err != nil {
		return nil, fmt.Errorf("create daemon run directory: %w", err)
	}
	d := &daemon{
		runDir:  runDir,
		socket:  filepath.Join(runDir, "grpc.sock"),
		logPath: filepath.Join(runDir, "daemon.log"),
		exited:  make(chan struct{}),
	}
	if c.logDir != "" {
		// Named after the suite's temp dir (<tmp>/root/daemon), which the
		// sub-test's own output names too.
		d.logPath = filepath.Join(c.logDir, filepath.Base(filepath.Dir(filepath.Dir(daemonRoot)))+".log")
	}
	args := []string{
		"--root", daemonRoot,
		"--address", d.socket,
		// Never let a sub-test reach a containerd that happens to run on this machine.
		"--containerd-address", filepath.Join(runDir, "no-containerd.sock"),
		"--log-level", "debug",
	}
	if c.backend != "" {
		configPath := filepath.Join(runDir, "config.toml")
		if err := os.WriteFile(configPath, []byte(configTOML(c.backend)), 0o644); err != nil {
			return nil, joinErrors(fmt.Errorf("write daemon config: %w", err), d.removeRunDir())
		}
		args = append(args, "--config", configPath)
	}
	if d.logFile, err = os.Create(d.logPath); err != nil {
		return nil, joinErrors(fmt.Errorf("create daemon log: %w", err), d.removeRunDir())
	}

	d.cmd = exec.Command(c.binary, args...)
	d.cmd.Stdout = d.logFile
	d.cmd.Stderr = d.logFile
	d.cmd.Env = append(os.Environ(), "RUST_BACKTRACE=1")
	// A test binary killed by its timeout must not leave daemons behind.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		d.logFile.Close()
		return nil, joinErrors(fmt.Errorf("start %s: %w", c.binary, err), d.removeRunDir())
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		d.logFile.Close()
		close(d.exited)
	}()
	log.G(ctx).WithField("pid", d.cmd.Process.Pid).WithField("log", d.logPath).
		Infof("started %s", strings.Join(d.cmd.Args, " "))

	if err := d.waitServing(); err != nil {
		d.abort()
		return nil, joinErrors(err, d.removeRunDir())
	}
	return d, nil
}

// waitServing returns once the socket exists and accepts a connection
// (CONTRACT: the file may exist before the daemon serves).
func (d *daemon) waitServing() error {
	deadline := time.Now().Add(readyTimeout)
	for {
		select {
		case <-d.exited:
			return fmt.Errorf("daemon exited before serving (%v)%s", d.waitErr, d.logTail())
		default:
		}
		if _, err := os.Stat(d.socket); err == nil {
			if conn, err := net.DialTimeout("unix", d.socket, time.Second); err == nil {
				conn.Close()
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon did not accept connections on %s within %s%s", d.socket, readyTimeout, d.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM and requires the clean exit the contract promises.
func (d *daemon) stop() error {
	select {
	case <-d.exited:
		if d.waitErr != nil {
			return fmt.Errorf("daemon died during the test (%v)%s", d.waitErr, d.logTail())
		}
		return fmt.Errorf("daemon exited during the test without being asked to%s", d.logTail())
	default:
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("send SIGTERM to daemon: %w", err)
	}
	select {
	case <-d.exited:
	case <-time.After(stopTimeout):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("daemon did not exit within %s of SIGTERM; killed%s", stopTimeout, d.logTail())
	}
	if d.waitErr != nil {
		return fmt.Errorf("daemon did not exit 0 after SIGTERM (%v)%s", d.waitErr, d.logTail())
	}
	return nil
}

// abort kills a daemon that failed to start; its log is already in the error.
func (d *daemon) abort() {
	select {
	case <-d.exited:
	default:
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
}

func (d *daemon) removeRunDir() error {
	if err := os.RemoveAll(d.runDir); err != nil {
		return fmt.Errorf("remove daemon run directory: %w", err)
	}
	return nil
}

// logTail is the end of the daemon's log, for error messages.
func (d *daemon) logTail() string {
	f, err := os.Open(d.logPath)
	if err != nil {
		return fmt.Sprintf("\n(daemon log %s unreadable: %v)", d.logPath, err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > logTailLines {
			lines = lines[1:]
		}
	}
	return fmt.Sprintf("\n--- last %d lines of daemon log %s ---\n%s\n--- end of daemon log ---",
		len(lines), d.logPath, strings.Join(lines, "\n"))
}

// dialLikeContainerd dials the way containerd 1.6 dials a proxy plugin
// (services/server/server.go, proxyClients.getClient), so the daemon sees
// the same target, :authority and message limits as in production.
func dialLikeContainerd(socket string) (*grpc.ClientConn, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	return grpc.Dial(dialer.DialAddress(socket),
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
}

// releaseMounts leaves nothing mounted or attached under the suite's temp
// dir (the parent of root) before the suite removes it. The pool at
// <root>/daemon/pool is expected to outlive the daemon (CONTRACT); any other
// mount under <root>/daemon is a daemon leak and reported. Mounts under the
// suite's work dir are what a failed check left behind: released silently.
func releaseMounts(ctx context.Context, root string) error {
	suiteDir := filepath.Dir(root)
	daemonRoot := filepath.Join(root, "daemon")
	pool := filepath.Join(daemonRoot, "pool")

	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(suiteDir))
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	// Deepest first, so overlays on top of the pool go before the pool.
	sort.Slice(infos, func(i, j int) bool { return len(infos[i].Mountpoint) > len(infos[j].Mountpoint) })

	var errs []error
	poolMounted := false
	for _, m := range infos {
		switch {
		case m.Mountpoint == pool:
			poolMounted = true
			continue
		case isUnder(m.Mountpoint, daemonRoot):
			errs = append(errs, fmt.Errorf("daemon left %s mounted (%s from %s) after exiting", m.Mountpoint, m.FSType, m.Source))
		default:
			log.G(ctx).WithField("mountpoint", m.Mountpoint).Warn("releasing a mount the check left behind")
		}
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m.Mountpoint, err))
		}
	}
	if poolMounted {
		if err := mount.UnmountAll(pool, 0); err != nil {
			errs = append(errs, fmt.Errorf("unmount pool %s: %w", pool, err))
			_ = unix.Unmount(pool, unix.MNT_DETACH)
		}
	}
	errs = append(errs, releaseLoopDevices(suiteDir))
	return joinErrors(errs...)
}

// releaseLoopDevices waits for loop devices backed by files under dir to be
// freed (autoclear) and detaches any that stay: CONTRACT says unmounting
// <root>/pool is all that whoever discards a root has to do.
func releaseLoopDevices(dir string) error {
	deadline := time.Now().Add(loopReleaseTimeout)
	for {
		leaked, err := loopDevicesUnder(dir)
		if err != nil {
			return err
		}
		if len(leaked) == 0 {
			return nil
		}
		if time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		var errs []error
		for dev, backing := range leaked {
			errs = append(errs, fmt.Errorf("loop device %s still attached to %s after its filesystem was unmounted (attach it with LO_FLAGS_AUTOCLEAR)", dev, backing))
			if err := detachLoop(dev); err != nil {
				errs = append(errs, fmt.Errorf("detach %s: %w", dev, err))
			}
		}
		return joinErrors(errs...)
	}
}

// loopDevicesUnder maps /dev/loopN to its backing file, for files under dir.
func loopDevicesUnder(dir string) (map[string]string, error) {
	paths, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	found := map[string]string{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // detached while we looked
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if isUnder(backing, dir) {
			dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p)))
			found[dev] = backing
		}
	}
	return found, nil
}

func detachLoop(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
}

func isUnder(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, dir+"/")
}

// joinErrors is errors.Join for go 1.19: nil when every error is nil.
func joinErrors(errs ...error) error {
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "\n"))
}
