#!/usr/bin/env python3
"""The Python client against the real daemon's REST API: one line per check, exit 1 on any failure.

Run: python3 clients/python/tests/live_daemon.py
Needs (fails, never skips, when one is missing):
  SEAMLESS_REST_SOCKET         unix socket of the daemon's REST API (e.g. /run/containerd-seamless/rest.sock)
  SEAMLESS_TEST_CONTAINER      a running container in the daemon's REST namespace
  SEAMLESS_TEST_TARGET_PREFIX  an image name without tag the commits are pushed to (e.g. 127.0.0.1:5000/clients/py)
Optional:
  SEAMLESS_TEST_NAMESPACE      containerd namespace of the container (default: the daemon's [rest] namespace)
  SEAMLESS_TEST_INSECURE       "0" to push over TLS; by default the target registry is plain HTTP (target_insecure)
  SEAMLESS_TEST_TIMEOUT        seconds to wait for each commit (default 600)

Not a unittest module (its name does not start with "test"), so the offline
`python3 -m unittest discover -s clients/python/tests` never runs it.
"""

import os
import sys
import traceback
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nydus_client import (  # noqa: E402
    ContainerNotFoundError,
    SeamlessSnapshotClient,
    SeamlessSnapshotError,
    SnapshotNotFoundError,
    SnapshotState,
    parse_go_duration,
    parse_rfc3339,
)

REQUIRED = ("SEAMLESS_REST_SOCKET", "SEAMLESS_TEST_CONTAINER", "SEAMLESS_TEST_TARGET_PREFIX")


class CheckFailed(Exception):
    pass


def expect(condition, what):
    if not condition:
        raise CheckFailed(what)


def expect_duration(value, what):
    expect(isinstance(value, str), f"{what} is a string, got {value!r}")
    seconds = parse_go_duration(value)
    expect(seconds >= 0, f"{what} {value!r} is not negative")
    return seconds


def expect_rfc3339(value, what):
    expect(isinstance(value, str), f"{what} is a string, got {value!r}")
    return parse_rfc3339(value)


def expect_error(call, cls, status, code):
    try:
        call()
    except SeamlessSnapshotError as error:
        expect(isinstance(error, cls), f"raised {type(error).__name__}, wanted {cls.__name__}: {error}")
        expect(error.status == status, f"status {error.status}, wanted {status}: {error}")
        expect(error.code == code, f"code {error.code}, wanted {code}: {error}")
        expect(isinstance(error.message, str) and error.message, f"a message: {error!r}")
        return error
    raise CheckFailed(f"no error, wanted {code} {status}")


def expect_ended_status(status, snapshot_id, what):
    expect(status.snapshot_id == snapshot_id, f"{what}: snapshot_id {status.snapshot_id!r}")
    expect(
        status.state is SnapshotState.COMPLETED,
        f"{what}: state {status.state.value}, error {status.error!r}",
    )
    expect(isinstance(status.progress, float) and 0.0 <= status.progress <= 1.0, f"{what}: progress {status.progress!r}")
    expect(isinstance(status.start_time, datetime) and status.start_time.tzinfo, f"{what}: start_time")
    expect(isinstance(status.end_time, datetime), f"{what}: end_time {status.end_time!r} once completed")
    expect(status.end_time >= status.start_time, f"{what}: end_time before start_time")
    expect(status.error is None, f"{what}: error {status.error!r} on a completed job")
    expect_rfc3339(status.raw["start_time"], f"{what}: raw start_time")
    expect_rfc3339(status.raw["end_time"], f"{what}: raw end_time")


def all_snapshot_ids(client, **filters):
    """Every id of list_snapshots, page by page."""
    ids, offset = [], 0
    while True:
        page = client.list_snapshots(offset=offset, **filters)
        expect(isinstance(page.total, int) and page.total >= 0, f"list: total {page.total!r}")
        expect(page.offset == offset, f"list: offset {page.offset}, asked {offset}")
        ids.extend(status.snapshot_id for status in page.snapshots)
        offset += len(page.snapshots)
        if not page.snapshots or offset >= page.total:
            return ids


def main():
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        print(f"FAIL environment: missing {', '.join(missing)} (see the docstring of {__file__})")
        return 1
    socket_path = os.environ["SEAMLESS_REST_SOCKET"]
    container = os.environ["SEAMLESS_TEST_CONTAINER"]
    prefix = os.environ["SEAMLESS_TEST_TARGET_PREFIX"]
    namespace = os.environ.get("SEAMLESS_TEST_NAMESPACE") or None
    insecure = os.environ.get("SEAMLESS_TEST_INSECURE", "1") != "0"
    timeout = float(os.environ.get("SEAMLESS_TEST_TIMEOUT", "600"))
    client = SeamlessSnapshotClient(socket_path=socket_path, timeout=timeout)
    state = {}
    failures = 0

    def create_and_wait():
        result = client.create_snapshot(
            container, f"{prefix}:wait", wait=True, namespace=namespace, target_insecure=insecure
        )
        expect(isinstance(result.snapshot_id, str) and result.snapshot_id, f"snapshot_id {result.snapshot_id!r}")
        expect_duration(result.pause_time, "pause_time")
        expect_duration(result.total_time, "total_time")
        expect(result.pause_seconds <= result.total_seconds, f"pause {result.pause_time} <= total {result.total_time}")
        for field in ("old_upper_dir", "new_upper_dir"):
            value = getattr(result, field)
            expect(isinstance(value, str) and value.startswith("/"), f"{field} {value!r} is an absolute path")
        if "state" in result.raw:
            expect(result.state is SnapshotState.COMPLETED, f"state {result.raw['state']!r} after wait")
        for extra in ("start_time", "end_time"):
            if result.raw.get(extra) is not None:
                expect_rfc3339(result.raw[extra], extra)
        state["waited"] = result.snapshot_id
        expect_ended_status(client.get_snapshot(result.snapshot_id), result.snapshot_id, "get after wait")
        return f"{result.snapshot_id} pause {result.pause_time} total {result.total_time}"

    def create_then_poll():
        result = client.create_snapshot(
            container, f"{prefix}:poll", wait=False, namespace=namespace, target_insecure=insecure
        )
        expect(isinstance(result.snapshot_id, str) and result.snapshot_id, f"snapshot_id {result.snapshot_id!r}")
        expect(result.snapshot_id != state.get("waited"), "a new snapshot id")
        if result.pause_time is not None:
            expect_duration(result.pause_time, "pause_time")
        state["polled"] = result.snapshot_id
        status = client.wait_for(result.snapshot_id, timeout=timeout, interval=0.5)
        expect(status.state is SnapshotState.COMPLETED, f"state {status.state.value}, error {status.error!r}")
        return f"{result.snapshot_id} {status.state.value}"

    def get_polled():
        snapshot_id = state["polled"]
        status = client.get_snapshot(snapshot_id)
        expect_ended_status(status, snapshot_id, "get")
        return f"{status.state.value} progress {status.progress} {status.start_time.isoformat()} .. {status.end_time.isoformat()}"

    def list_both():
        ids = all_snapshot_ids(client)
        for key in ("waited", "polled"):
            expect(state[key] in ids, f"{state[key]} in list_snapshots")
        completed = all_snapshot_ids(client, state=SnapshotState.COMPLETED)
        for key in ("waited", "polled"):
            expect(state[key] in completed, f"{state[key]} in list_snapshots(state=completed)")
        failed = all_snapshot_ids(client, state="failed")
        expect(state["polled"] not in failed, "the completed job is not listed as failed")
        return f"{len(ids)} listed, both ids present"

    def get_unknown():
        error = expect_error(
            lambda: client.get_snapshot("snapshot-does-not-exist-0"),
            SnapshotNotFoundError,
            404,
            "SNAPSHOT_NOT_FOUND",
        )
        return error.message

    def create_unknown_container():
        error = expect_error(
            lambda: client.create_snapshot(
                "no-such-container-xyz", f"{prefix}:none", namespace=namespace, target_insecure=insecure
            ),
            ContainerNotFoundError,
            404,
            "CONTAINER_NOT_FOUND",
        )
        return error.message

    def metrics():
        metrics = client.metrics()
        expect(metrics.total_snapshots >= 2, f"total_snapshots {metrics.total_snapshots} >= 2")
        expect(metrics.successful_snapshots >= 2, f"successful_snapshots {metrics.successful_snapshots} >= 2")
        expect(metrics.failed_snapshots >= 0, f"failed_snapshots {metrics.failed_snapshots}")
        for field in ("average_pause_time", "average_total_time", "average_background_time"):
            expect_duration(getattr(metrics, field), field)
        expect(metrics.timestamp.tzinfo is not None, "timestamp has an offset")
        return (
            f"total {metrics.total_snapshots} ok {metrics.successful_snapshots} failed {metrics.failed_snapshots}"
            f" pause {metrics.average_pause_time} total {metrics.average_total_time}"
            f" background {metrics.average_background_time}"
        )

    def prometheus():
        text = client.prometheus_metrics()
        expect('nydus_seamless_snapshots_total{status="success"}' in text, "the success counter is exported")
        return f"{len(text.splitlines())} lines"

    checks = [
        ("create_snapshot(wait=True) -> completed, every field typed", create_and_wait),
        ("create_snapshot(wait=False) then wait_for -> completed", create_then_poll),
        ("get_snapshot of the polled id", get_polled),
        ("list_snapshots contains both ids", list_both),
        ("get_snapshot of an unknown id -> SNAPSHOT_NOT_FOUND 404", get_unknown),
        ("create_snapshot of no-such-container-xyz -> CONTAINER_NOT_FOUND 404", create_unknown_container),
        ("metrics(): total >= 2, Go-duration averages", metrics),
        ("prometheus_metrics(): success counter", prometheus),
    ]
    for name, check in checks:
        try:
            note = check()
            print(f"ok   {name}: {note}")
        except KeyError as error:
            failures += 1
            print(f"FAIL {name}: needs an earlier check that failed ({error})")
        except (CheckFailed, SeamlessSnapshotError, ValueError) as error:
            failures += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}")
        except Exception:  # a bug of the client or of this script: show all of it
            failures += 1
            print(f"FAIL {name}: unexpected error")
            traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
    print(f"{len(checks) - failures} of {len(checks)} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
