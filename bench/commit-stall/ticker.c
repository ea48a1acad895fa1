/*
 * ticker: the workload whose stalls bench/commit-stall/run.sh measures.
 *
 * It spins on clock_gettime(CLOCK_MONOTONIC) (vDSO, no syscall) and keeps the
 * largest gap between two consecutive iterations: any time the task did not
 * run (frozen cgroup, paused task, preempted by the scheduler) shows up as a
 * gap, with the resolution of one iteration (tens of nanoseconds).
 *
 * Windows: SIGUSR1 closes the current window. The loop then appends
 * "<window> <max_gap_ns> <iterations>\n" to OUT_DIR/windows and starts the
 * next window. Nothing is reported from inside a window, so the measured loop
 * costs one load of a flag per iteration; the write that closes a window is
 * not counted as a gap (the clock is re-read after it).
 *
 * OUT_DIR/ready appears once the handler is installed.
 *
 * Built statically at run time (gcc -O2 -static) so it runs in a busybox
 * image without a libc.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t close_requested;

static void on_close_signal(int sig)
{
	(void)sig;
	close_requested = 1;
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int open_in(const char *dir, const char *name, int flags)
{
	char path[4096];

	if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path) {
		fprintf(stderr, "ticker: path too long: %s/%s\n", dir, name);
		return -1;
	}
	int fd = open(path, flags | O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		perror(path);
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: ticker OUT_DIR\n");
		return 2;
	}
	int windows = open_in(argv[1], "windows", O_TRUNC | O_APPEND);
	if (windows < 0)
		return 1;

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_close_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGUSR1, &sa, NULL) != 0) {
		perror("sigaction SIGUSR1");
		return 1;
	}
	int ready = open_in(argv[1], "ready", O_TRUNC);
	if (ready < 0)
		return 1;
	close(ready);

	uint64_t window = 0, max_gap = 0, iterations = 0;
	uint64_t prev = now_ns();
	for (;;) {
		uint64_t t = now_ns();
		uint64_t gap = t - prev;

		prev = t;
		if (gap > max_gap)
			max_gap = gap;
		iterations++;
		if (close_requested) {
			char line[96];
			int n;

			close_requested = 0;
			n = snprintf(line, sizeof line, "%llu %llu %llu\n", (unsigned long long)window,
				     (unsigned long long)max_gap, (unsigned long long)iterations);
			if (write(windows, line, (size_t)n) != n) {
				perror("ticker: write windows");
				return 1;
			}
			window++;
			max_gap = 0;
			iterations = 0;
			prev = now_ns();
		}
	}
}
