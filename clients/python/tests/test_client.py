"""SeamlessSnapshotClient against a fake daemon on a unix socket and on TCP: the requests it sends
and how it reads every answer of the REST contract (/work/rest-contract.md of issue 16)."""

import os
import sys
import tempfile
import unittest
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nydus_client  # noqa: E402
from fake_daemon import FakeDaemon  # noqa: E402
from nydus_client import (  # noqa: E402
    ContainerNotFoundError,
    InvalidResponseError,
    Metrics,
    SeamlessConnectionError,
    SeamlessSnapshotClient,
    SeamlessSnapshotError,
    SnapshotNotFoundError,
    SnapshotPage,
    SnapshotResult,
    SnapshotState,
    SnapshotStatus,
    WaitTimeoutError,
)

CREATED = {
    "snapshot_id": "snapshot-1752857512540089368",
    "pause_time": "8.72416ms",
    "total_time": "22.802283ms",
    "old_upper_dir": "/var/lib/seamless/snapshots/12/fs",
    "new_upper_dir": "/var/lib/seamless/snapshots/13/fs",
    "state": "completed",
    "progress": 1.0,
    "start_time": "2025-07-18T16:51:52Z",
    "end_time": "2025-07-18T16:51:53Z",
    "namespace": "default",
    "container_id": "mycontainer",
    "target_ref": "registry.example.com/myimage:snapshot",
}

RUNNING = {
    "snapshot_id": "snapshot-2",
    "state": "processing",
    "progress": 0.75,
    "start_time": "2025-07-18T16:51:52.123456789Z",
    "end_time": None,
    "stage": "pushing",
    "pause_time": "512.3\u00b5s",
}

COMPLETED = dict(RUNNING, state="completed", progress=1, end_time="2025-07-18T16:52:57Z")

FAILED = {
    "snapshot_id": "snapshot-3",
    "state": "failed",
    "progress": 0.5,
    "start_time": "2025-07-18T16:51:52Z",
    "end_time": "2025-07-18T16:52:57Z",
    "error": "push to 127.0.0.1:5000/x:y: connection refused",
}

METRICS = {
    "metrics": {
        "total_snapshots": 100,
        "successful_snapshots": 98,
        "failed_snapshots": 2,
        "average_pause_time": "22.5\u00b5s",
        "average_total_time": "25.3ms",
        "average_background_time": "58.7s",
        "in_flight": 0,
    },
    "timestamp": "2025-07-18T16:51:52Z",
    "version": "1",
}

PROMETHEUS = (
    'nydus_seamless_snapshots_total{status="success"} 98\n'
    'nydus_seamless_snapshots_total{status="failed"} 2\n'
    'nydus_seamless_pause_time_seconds{quantile="0.5"} 0.0000225\n'
)


def error_answer(status, code, message="m", **details):
    return status, {"error": {"code": code, "message": message, "details": details}}


class UnixSocketClientTest(unittest.TestCase):
    """Most of the contract, over the unix socket (no token needed there)."""

    def setUp(self):
        self.daemon = FakeDaemon(unix=True)
        self.addCleanup(self.daemon.close)
        self.client = SeamlessSnapshotClient(base_url=self.daemon.base_url)

    def test_create_sends_the_reference_body_and_reads_every_field(self):
        self.daemon.on("POST", "/api/v1/snapshots", (201, CREATED))
        result = self.client.create_snapshot(
            container_id="mycontainer",
            target_ref="registry.example.com/myimage:snapshot",
            wait=True,
        )
        (request,) = self.daemon.requests
        self.assertEqual(request.method, "POST")
        self.assertEqual(request.path, "/api/v1/snapshots")
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertNotIn("authorization", request.headers)
        self.assertEqual(
            request.json(),
            {
                "container_id": "mycontainer",
                "target_ref": "registry.example.com/myimage:snapshot",
                "options": {"wait": True},
            },
        )
        self.assertIsInstance(result, SnapshotResult)
        self.assertEqual(result.snapshot_id, "snapshot-1752857512540089368")
        self.assertEqual(result.pause_time, "8.72416ms")
        self.assertEqual(result.total_time, "22.802283ms")
        self.assertEqual(result.old_upper_dir, "/var/lib/seamless/snapshots/12/fs")
        self.assertEqual(result.new_upper_dir, "/var/lib/seamless/snapshots/13/fs")
        self.assertEqual(result.pause_seconds, 0.00872416)
        self.assertEqual(result.total_seconds, 0.022802283)
        self.assertIs(result.state, SnapshotState.COMPLETED)
        self.assertEqual(result.raw["namespace"], "default")
        self.assertEqual(result.raw, CREATED)

    def test_create_sends_namespace_and_every_option(self):
        self.daemon.on("POST", "/api/v1/snapshots", (201, CREATED))
        self.client.create_snapshot(
            "c1",
            "127.0.0.1:5000/a:b",
            namespace="k8s.io",
            work_dir="/tmp",
            fs_version="6",
            compressor="lz4_block",
            target_insecure=True,
            source_insecure=False,
            with_paths=["/data"],
            without_paths=("/tmp", "/var/cache"),
            maximum_times=10,
            background_workers=4,
            format="oci",
            target_creds={"username": "u", "password": "p"},
            source_creds=("su", "sp"),
        )
        self.assertEqual(
            self.daemon.requests[0].json(),
            {
                "container_id": "c1",
                "target_ref": "127.0.0.1:5000/a:b",
                "namespace": "k8s.io",
                "options": {
                    "wait": False,
                    "work_dir": "/tmp",
                    "fs_version": "6",
                    "compressor": "lz4_block",
                    "target_insecure": True,
                    "source_insecure": False,
                    "with_paths": ["/data"],
                    "without_paths": ["/tmp", "/var/cache"],
                    "maximum_times": 10,
                    "background_workers": 4,
                    "format": "oci",
                    "target_creds": {"username": "u", "password": "p"},
                    "source_creds": {"username": "su", "password": "sp"},
                },
            },
        )

    def test_create_leaves_out_options_given_as_none_and_refuses_unknown_ones(self):
        self.daemon.on("POST", "/api/v1/snapshots", (201, CREATED))
        self.client.create_snapshot("c1", "r:t", fs_version=None, compressor=None)
        self.assertEqual(self.daemon.requests[0].json()["options"], {"wait": False})
        with self.assertRaises(TypeError):
            self.client.create_snapshot("c1", "r:t", compresor="zstd")
        with self.assertRaises(ValueError):
            self.client.create_snapshot("c1", "r:t", with_paths="/data")
        with self.assertRaises(ValueError):
            self.client.create_snapshot("c1", "r:t", target_creds={"user": "u"})
        self.assertEqual(len(self.daemon.requests), 1)

    def test_create_without_wait_reads_an_answer_without_total_time(self):
        answer = {"snapshot_id": "snapshot-9", "pause_time": "1.5s", "state": "processing"}
        self.daemon.on("POST", "/api/v1/snapshots", (201, answer))
        result = self.client.create_snapshot("c1", "r:t")
        self.assertEqual(result.snapshot_id, "snapshot-9")
        self.assertEqual(result.pause_seconds, 1.5)
        self.assertIsNone(result.total_time)
        self.assertIsNone(result.total_seconds)
        self.assertIsNone(result.old_upper_dir)
        self.assertIs(result.state, SnapshotState.PROCESSING)

    def test_create_with_wait_of_a_failed_job_raises_its_code(self):
        self.daemon.on(
            "POST",
            "/api/v1/snapshots",
            error_answer(
                500,
                "BACKGROUND_PROCESSING_FAILED",
                "push failed",
                snapshot_id="snapshot-3",
                timestamp="2025-07-18T16:51:52Z",
            ),
        )
        with self.assertRaises(nydus_client.BackgroundProcessingFailedError) as caught:
            self.client.create_snapshot("c1", "r:t", wait=True)
        self.assertEqual(caught.exception.status, 500)
        self.assertEqual(caught.exception.code, "BACKGROUND_PROCESSING_FAILED")
        self.assertEqual(caught.exception.message, "push failed")
        self.assertEqual(caught.exception.details["snapshot_id"], "snapshot-3")

    def test_get_of_a_running_job(self):
        self.daemon.on("GET", "/api/v1/snapshots/snapshot-2", (200, RUNNING))
        status = self.client.get_snapshot("snapshot-2")
        self.assertEqual(self.daemon.requests[0].method, "GET")
        self.assertIsInstance(status, SnapshotStatus)
        self.assertEqual(status.snapshot_id, "snapshot-2")
        self.assertIs(status.state, SnapshotState.PROCESSING)
        self.assertEqual(status.state, "processing")  # a str Enum
        self.assertEqual(status.progress, 0.75)
        self.assertEqual(
            status.start_time, datetime(2025, 7, 18, 16, 51, 52, 123456, tzinfo=timezone.utc)
        )
        self.assertIsNone(status.end_time)
        self.assertIsNone(status.error)
        self.assertFalse(status.ended)
        self.assertEqual(status.raw["stage"], "pushing")

    def test_get_of_a_failed_job_and_of_an_id_that_needs_quoting(self):
        self.daemon.on("GET", "/api/v1/snapshots/snap%2Fshot%20x", (200, FAILED))
        status = self.client.get_snapshot("snap/shot x")
        self.assertIs(status.state, SnapshotState.FAILED)
        self.assertEqual(status.error, "push to 127.0.0.1:5000/x:y: connection refused")
        self.assertEqual(status.end_time, datetime(2025, 7, 18, 16, 52, 57, tzinfo=timezone.utc))
        self.assertIsInstance(status.progress, float)
        self.assertTrue(status.ended)

    def test_get_of_an_unknown_id_raises_snapshot_not_found(self):
        self.daemon.on(
            "GET",
            "/api/v1/snapshots/nope",
            error_answer(404, "SNAPSHOT_NOT_FOUND", "snapshot nope not found", snapshot_id="nope"),
        )
        with self.assertRaises(SnapshotNotFoundError) as caught:
            self.client.get_snapshot("nope")
        self.assertEqual((caught.exception.status, caught.exception.code), (404, "SNAPSHOT_NOT_FOUND"))
        self.assertEqual(caught.exception.details, {"snapshot_id": "nope"})
        self.assertIn("SNAPSHOT_NOT_FOUND", str(caught.exception))

    def test_list_sends_its_query_and_reads_the_page(self):
        page = {"snapshots": [RUNNING, FAILED], "total": 7, "limit": 2, "offset": 4}
        self.daemon.on("GET", "/api/v1/snapshots?state=failed&limit=2&offset=4", (200, page))
        self.daemon.on("GET", "/api/v1/snapshots", (200, dict(page, snapshots=[], limit=100, offset=0)))
        listed = self.client.list_snapshots(state=SnapshotState.FAILED, limit=2, offset=4)
        self.assertIsInstance(listed, SnapshotPage)
        self.assertEqual([s.snapshot_id for s in listed.snapshots], ["snapshot-2", "snapshot-3"])
        self.assertEqual([s.state for s in listed], [SnapshotState.PROCESSING, SnapshotState.FAILED])
        self.assertEqual((listed.total, listed.limit, listed.offset, len(listed)), (7, 2, 4, 2))
        everything = self.client.list_snapshots()
        self.assertEqual(self.daemon.requests[1].path, "/api/v1/snapshots")
        self.assertEqual((everything.snapshots, everything.limit), ([], 100))
        with self.assertRaises(ValueError):
            self.client.list_snapshots(state="sleeping")

    def test_metrics_reads_counters_averages_and_timestamp(self):
        self.daemon.on("GET", "/api/v1/metrics", (200, METRICS))
        metrics = self.client.metrics()
        self.assertIsInstance(metrics, Metrics)
        self.assertEqual(
            (metrics.total_snapshots, metrics.successful_snapshots, metrics.failed_snapshots),
            (100, 98, 2),
        )
        self.assertEqual(metrics.average_pause_time, "22.5\u00b5s")
        self.assertEqual(metrics.average_total_time, "25.3ms")
        self.assertEqual(metrics.average_background_time, "58.7s")
        self.assertAlmostEqual(metrics.average_pause_seconds, 22.5e-6)
        self.assertAlmostEqual(metrics.average_total_seconds, 0.0253)
        self.assertAlmostEqual(metrics.average_background_seconds, 58.7)
        self.assertEqual(metrics.timestamp, datetime(2025, 7, 18, 16, 51, 52, tzinfo=timezone.utc))
        self.assertEqual(metrics.raw["metrics"]["in_flight"], 0)

    def test_prometheus_metrics_returns_the_text(self):
        self.daemon.on("GET", "/metrics", (200, PROMETHEUS))
        text = self.client.prometheus_metrics()
        self.assertEqual(text, PROMETHEUS)
        self.assertIn('nydus_seamless_snapshots_total{status="success"} 98', text)

    def test_wait_for_polls_until_the_job_ends(self):
        self.daemon.on(
            "GET",
            "/api/v1/snapshots/snapshot-2",
            (200, dict(RUNNING, state="pending", progress=0)),
            (200, RUNNING),
            (200, COMPLETED),
        )
        status = self.client.wait_for("snapshot-2", timeout=10, interval=0.01)
        self.assertIs(status.state, SnapshotState.COMPLETED)
        self.assertEqual(status.progress, 1.0)
        self.assertEqual(len(self.daemon.requests), 3)

    def test_wait_for_returns_a_failed_job(self):
        self.daemon.on("GET", "/api/v1/snapshots/snapshot-3", (200, RUNNING), (200, FAILED))
        status = self.client.wait_for("snapshot-3", timeout=10, interval=0.01)
        self.assertIs(status.state, SnapshotState.FAILED)
        self.assertIsNotNone(status.error)

    def test_wait_for_gives_up_after_its_timeout(self):
        self.daemon.on("GET", "/api/v1/snapshots/snapshot-2", (200, RUNNING))
        with self.assertRaises(WaitTimeoutError) as caught:
            self.client.wait_for("snapshot-2", timeout=0.2, interval=0.05)
        self.assertEqual(caught.exception.code, "WAIT_TIMEOUT")
        self.assertIsNone(caught.exception.status)
        self.assertGreaterEqual(len(self.daemon.requests), 2)

    def test_wait_for_passes_on_a_not_found(self):
        self.daemon.on("GET", "/api/v1/snapshots/gone", error_answer(404, "SNAPSHOT_NOT_FOUND"))
        with self.assertRaises(SnapshotNotFoundError):
            self.client.wait_for("gone", timeout=1, interval=0.01)

    def test_every_code_of_the_contract_raises_its_class(self):
        cases = [
            (400, "INVALID_PARAMETER", nydus_client.InvalidParameterError),
            (404, "CONTAINER_NOT_FOUND", nydus_client.ContainerNotFoundError),
            (404, "SNAPSHOT_NOT_FOUND", nydus_client.SnapshotNotFoundError),
            (403, "PERMISSION_DENIED", nydus_client.PermissionDeniedError),
            (429, "PERMISSION_DENIED", nydus_client.PermissionDeniedError),
            (500, "INTERNAL_ERROR", nydus_client.InternalError),
            (400, "CONTAINER_NOT_RUNNING", nydus_client.ContainerNotRunningError),
            (409, "SNAPSHOT_IN_PROGRESS", nydus_client.SnapshotInProgressError),
            (500, "PAUSE_TIMEOUT", nydus_client.PauseTimeoutError),
            (500, "ATOMIC_SWITCH_FAILED", nydus_client.AtomicSwitchFailedError),
            (500, "BACKGROUND_PROCESSING_FAILED", nydus_client.BackgroundProcessingFailedError),
            (418, "SOMETHING_NEW", SeamlessSnapshotError),
        ]
        for status, code, cls in cases:
            with self.subTest(code=code, status=status):
                self.daemon.on(
                    "POST",
                    "/api/v1/snapshots",
                    error_answer(status, code, f"{code} happened", container_id="c1",
                                 timestamp="2025-07-18T16:51:52Z"),
                )
                with self.assertRaises(cls) as caught:
                    self.client.create_snapshot("c1", "r:t")
                error = caught.exception
                self.assertIsInstance(error, SeamlessSnapshotError)
                self.assertEqual(error.status, status)
                self.assertEqual(error.code, code)
                self.assertEqual(error.message, f"{code} happened")
                self.assertEqual(
                    error.details, {"container_id": "c1", "timestamp": "2025-07-18T16:51:52Z"}
                )

    def test_a_container_not_found_names_the_container(self):
        self.daemon.on(
            "POST",
            "/api/v1/snapshots",
            error_answer(404, "CONTAINER_NOT_FOUND", "container no-such not found", container_id="no-such"),
        )
        with self.assertRaises(ContainerNotFoundError) as caught:
            self.client.create_snapshot("no-such", "r:t")
        self.assertEqual(caught.exception.details["container_id"], "no-such")

    def test_an_error_without_the_envelope_still_raises(self):
        self.daemon.on("GET", "/api/v1/metrics", (502, "bad gateway"))
        with self.assertRaises(SeamlessSnapshotError) as caught:
            self.client.metrics()
        self.assertEqual((caught.exception.status, caught.exception.code), (502, "HTTP_502"))
        self.assertEqual(caught.exception.message, "bad gateway")
        self.daemon.on("GET", "/api/v1/metrics", (500, {"error": "just a string"}))
        with self.assertRaises(SeamlessSnapshotError) as caught:
            self.client.metrics()
        self.assertEqual(caught.exception.code, "HTTP_500")

    def test_answers_that_break_the_contract_raise_invalid_response(self):
        broken = [
            ("GET", "/api/v1/snapshots/x", (200, "not json"), lambda: self.client.get_snapshot("x")),
            ("GET", "/api/v1/snapshots/x", (200, [1, 2]), lambda: self.client.get_snapshot("x")),
            ("GET", "/api/v1/snapshots/x", (200, dict(RUNNING, state="sleeping")),
             lambda: self.client.get_snapshot("x")),
            ("GET", "/api/v1/snapshots/x", (200, dict(RUNNING, start_time="yesterday")),
             lambda: self.client.get_snapshot("x")),
            ("GET", "/api/v1/snapshots/x", (200, dict(RUNNING, progress="75%")),
             lambda: self.client.get_snapshot("x")),
            ("POST", "/api/v1/snapshots", (201, dict(CREATED, pause_time="8.7 ms")),
             lambda: self.client.create_snapshot("c", "r:t")),
            ("POST", "/api/v1/snapshots", (201, {"pause_time": "1s"}),
             lambda: self.client.create_snapshot("c", "r:t")),
            ("GET", "/api/v1/metrics", (200, {"metrics": {}, "timestamp": "2025-07-18T16:51:52Z"}),
             lambda: self.client.metrics()),
            ("GET", "/api/v1/snapshots", (200, {"snapshots": {}, "total": 0, "limit": 1, "offset": 0}),
             lambda: self.client.list_snapshots()),
        ]
        for method, path, answer, call in broken:
            with self.subTest(answer=answer):
                self.daemon.on(method, path, answer)
                with self.assertRaises(InvalidResponseError) as caught:
                    call()
                self.assertEqual(caught.exception.code, "INVALID_RESPONSE")
                self.assertEqual(caught.exception.status, answer[0])

    def test_socket_path_argument_is_the_same_transport(self):
        client = SeamlessSnapshotClient(socket_path=self.daemon.socket_path, token="t0")
        self.daemon.on("GET", "/api/v1/metrics", (200, METRICS))
        self.assertEqual(client.metrics().total_snapshots, 100)
        self.assertEqual(self.daemon.requests[0].headers["authorization"], "Bearer t0")


class TcpClientTest(unittest.TestCase):
    """TCP with a bearer token, as the daemon's loopback listener requires."""

    def setUp(self):
        self.daemon = FakeDaemon(unix=False)
        self.addCleanup(self.daemon.close)

    def test_every_request_carries_the_bearer_token(self):
        client = SeamlessSnapshotClient(base_url=self.daemon.base_url, token="s3cret")
        self.daemon.on("POST", "/api/v1/snapshots", (201, CREATED))
        self.daemon.on("GET", "/api/v1/snapshots/snapshot-2", (200, RUNNING))
        self.daemon.on("GET", "/api/v1/snapshots", (200, {"snapshots": [], "total": 0, "limit": 100, "offset": 0}))
        self.daemon.on("GET", "/api/v1/metrics", (200, METRICS))
        self.daemon.on("GET", "/metrics", (200, PROMETHEUS))
        client.create_snapshot("mycontainer", "registry.example.com/myimage:snapshot", wait=True)
        client.get_snapshot("snapshot-2")
        client.list_snapshots()
        client.metrics()
        client.prometheus_metrics()
        self.assertEqual(
            [(r.method, r.path) for r in self.daemon.requests],
            [
                ("POST", "/api/v1/snapshots"),
                ("GET", "/api/v1/snapshots/snapshot-2"),
                ("GET", "/api/v1/snapshots"),
                ("GET", "/api/v1/metrics"),
                ("GET", "/metrics"),
            ],
        )
        for request in self.daemon.requests:
            self.assertEqual(request.headers["authorization"], "Bearer s3cret")
        self.assertEqual(self.daemon.requests[0].json()["options"], {"wait": True})

    def test_a_refused_token_raises_permission_denied(self):
        client = SeamlessSnapshotClient(base_url=self.daemon.base_url, token="wrong")
        self.daemon.on("GET", "/api/v1/metrics", error_answer(403, "PERMISSION_DENIED", "bad token"))
        with self.assertRaises(nydus_client.PermissionDeniedError) as caught:
            client.metrics()
        self.assertEqual(caught.exception.status, 403)

    def test_a_path_prefix_of_the_base_url_is_kept(self):
        client = SeamlessSnapshotClient(base_url=self.daemon.base_url + "/seamless/")
        self.daemon.on("GET", "/seamless/api/v1/metrics", (200, METRICS))
        client.metrics()
        self.assertEqual(self.daemon.requests[0].path, "/seamless/api/v1/metrics")


class ConnectionFailureTest(unittest.TestCase):
    def test_a_missing_socket_raises_a_connection_error(self):
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "rest.sock")
            client = SeamlessSnapshotClient(socket_path=path)
            with self.assertRaises(SeamlessConnectionError) as caught:
                client.metrics()
        self.assertEqual(caught.exception.code, "CONNECTION_ERROR")
        self.assertIsNone(caught.exception.status)
        self.assertIn(path, str(caught.exception))

    def test_a_closed_port_raises_a_connection_error(self):
        daemon = FakeDaemon(unix=False)
        url = daemon.base_url
        daemon.close()
        with self.assertRaises(SeamlessConnectionError):
            SeamlessSnapshotClient(base_url=url).get_snapshot("x")

    def test_bad_arguments_are_refused_up_front(self):
        with self.assertRaises(ValueError):
            SeamlessSnapshotClient(base_url="http://h:1", socket_path="/x")
        with self.assertRaises(ValueError):
            SeamlessSnapshotClient(base_url="ftp://h")
        with self.assertRaises(ValueError):
            SeamlessSnapshotClient(base_url="unix://")

    def test_default_transport_is_the_daemon_socket(self):
        self.assertEqual(
            repr(SeamlessSnapshotClient()), "SeamlessSnapshotClient('unix:///run/containerd-seamless/rest.sock')"
        )


if __name__ == "__main__":
    unittest.main()
