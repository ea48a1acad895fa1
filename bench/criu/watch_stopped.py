#!/usr/bin/env python3
"""Measures how long a container's main process is kept from running by a
checkpoint, seen from the host the same way for every tool.

The process does not run application code while either
  - its cgroup v1 freezer is not THAWED: `ctr containers checkpoint` pauses
    the task through the freezer around the whole command, and CRIU freezes
    the cgroup to seize the tasks; or
  - it is traced (TracerPid in /proc/PID/status): CRIU thaws the freezer
    once it has seized the tasks with ptrace and keeps them stopped, or
    running only its parasite code, until it detaches after the dump.
Neither file can be waited on for changes under cgroup v1, hence a 0.5 ms
poll: stops shorter than that may be missed or rounded, far below the ones
measured here.

Polls until SIGTERM (or the process or cgroup disappears), then prints one
JSON object: stopped_ms (the sum), longest_ms, and stops (how many).

Usage: watch_stopped.py FREEZER_STATE PID READY_FILE
  FREEZER_STATE  /sys/fs/cgroup/freezer/<ns>/<id>/freezer.state
  READY_FILE     created once the first sample is taken, so the caller starts
                 what it times only when the poll runs
"""

import json
import signal
import sys
import time

POLL_SECS = 0.0005


def traced(status_path):
    with open(status_path) as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return line.split()[1] != "0"
    return False


def main(freezer_state, pid, ready):
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    status_path = f"/proc/{pid}/status"
    total = longest = 0.0
    stops = 0
    since = None
    while not stopping:
        try:
            with open(freezer_state) as f:
                frozen = f.read().strip() != "THAWED"
            held = frozen or traced(status_path)
        except OSError:
            break
        now = time.monotonic()
        if ready:
            open(ready, "w").close()
            ready = None
        if held and since is None:
            since = now
        elif not held and since is not None:
            span = now - since
            total, longest, stops, since = total + span, max(longest, span), stops + 1, None
        time.sleep(POLL_SECS)
    if since is not None:
        span = time.monotonic() - since
        total, longest, stops = total + span, max(longest, span), stops + 1
    print(json.dumps({"stopped_ms": total * 1000, "longest_ms": longest * 1000, "stops": stops}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
