"""live_daemon.py itself, run against a simulated daemon: its checks pass on answers that follow the
contract, fail on ones that do not, and the script fails when its environment is missing."""

import contextlib
import io
import os
import sys
import unittest
from datetime import datetime, timezone
from unittest import mock
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import live_daemon  # noqa: E402
from fake_daemon import FakeDaemon  # noqa: E402


class SimulatedDaemon:
    """Just enough state for the live script's flow: jobs that take two polls to complete."""

    def __init__(self, daemon, container="c1"):
        self.container = container
        self.jobs = {}
        self.polls = {}
        self.break_metrics = False
        daemon.on_any(self.answer)

    def status(self, job_id):
        job = self.jobs[job_id]
        ended = job["state"] == "completed"
        return {
            "snapshot_id": job_id,
            "state": job["state"],
            "progress": 1.0 if ended else 0.5,
            "start_time": "2026-12-07T17:00:00.123456789Z",
            "end_time": "2026-12-07T17:00:01Z" if ended else None,
            "stage": "done" if ended else "pushing",
        }

    def answer(self, request):
        url = urlsplit(request.path)
        if request.method == "POST" and url.path == "/api/v1/snapshots":
            body = request.json()
            if body["container_id"] != self.container:
                return 404, {"error": {"code": "CONTAINER_NOT_FOUND", "message": "no container",
                                       "details": {"container_id": body["container_id"]}}}
            job_id = f"snapshot-{len(self.jobs) + 1}"
            wait = body["options"]["wait"]
            self.jobs[job_id] = {"state": "completed" if wait else "processing"}
            self.polls[job_id] = 0
            answer = dict(self.status(job_id), pause_time="512.3\u00b5s", total_time="1.5s",
                          old_upper_dir="/var/lib/s/1/fs", new_upper_dir="/var/lib/s/2/fs")
            return 201, answer
        if request.method == "GET" and url.path.startswith("/api/v1/snapshots/"):
            job_id = url.path.rsplit("/", 1)[1]
            if job_id not in self.jobs:
                return 404, {"error": {"code": "SNAPSHOT_NOT_FOUND", "message": "no snapshot", "details": {}}}
            self.polls[job_id] += 1
            if self.polls[job_id] >= 2:
                self.jobs[job_id]["state"] = "completed"
            return 200, self.status(job_id)
        if request.method == "GET" and url.path == "/api/v1/snapshots":
            query = parse_qs(url.query)
            ids = [i for i in self.jobs if self.jobs[i]["state"] in query.get("state", [self.jobs[i]["state"]])]
            offset = int(query.get("offset", ["0"])[0])
            # Pages of one, to exercise the script's paging.
            page = ids[offset:offset + 1]
            return 200, {"snapshots": [self.status(i) for i in page], "total": len(ids), "limit": 1, "offset": offset}
        if url.path == "/api/v1/metrics":
            done = sum(1 for j in self.jobs.values() if j["state"] == "completed")
            average = "1.5 s" if self.break_metrics else "1.5s"
            return 200, {"metrics": {"total_snapshots": len(self.jobs), "successful_snapshots": done,
                                     "failed_snapshots": 0, "average_pause_time": "512.3\u00b5s",
                                     "average_total_time": average, "average_background_time": "1s"},
                         "timestamp": datetime.now(timezone.utc).isoformat()}
        if url.path == "/metrics":
            return 200, f'nydus_seamless_snapshots_total{{status="success"}} {len(self.jobs)}\n'
        return 404, {"error": {"code": "INVALID_PARAMETER", "message": url.path, "details": {}}}


class LiveScriptTest(unittest.TestCase):
    def run_script(self, environment):
        output = io.StringIO()
        with mock.patch.dict(os.environ, environment, clear=False), contextlib.redirect_stdout(output):
            for name in live_daemon.REQUIRED:
                if name not in environment:
                    os.environ.pop(name, None)
            code = live_daemon.main()
        return code, output.getvalue()

    def setUp(self):
        self.daemon = FakeDaemon(unix=True)
        self.addCleanup(self.daemon.close)
        self.simulated = SimulatedDaemon(self.daemon)
        self.environment = {
            "SEAMLESS_REST_SOCKET": self.daemon.socket_path,
            "SEAMLESS_TEST_CONTAINER": "c1",
            "SEAMLESS_TEST_TARGET_PREFIX": "127.0.0.1:5000/clients/py",
            "SEAMLESS_TEST_NAMESPACE": "seamless-test",
        }

    def test_every_check_passes_on_a_daemon_that_follows_the_contract(self):
        code, output = self.run_script(self.environment)
        self.assertEqual(code, 0, output)
        lines = output.splitlines()
        self.assertEqual(len([line for line in lines if line.startswith("ok   ")]), 8, output)
        self.assertEqual(lines[-1], "8 of 8 checks passed")
        creates = [r.json() for r in self.daemon.requests if r.method == "POST"]
        self.assertEqual(
            [(c["container_id"], c["target_ref"], c["options"]["wait"], c["namespace"]) for c in creates],
            [
                ("c1", "127.0.0.1:5000/clients/py:wait", True, "seamless-test"),
                ("c1", "127.0.0.1:5000/clients/py:poll", False, "seamless-test"),
                ("no-such-container-xyz", "127.0.0.1:5000/clients/py:none", False, "seamless-test"),
            ],
        )
        self.assertTrue(all(c["options"]["target_insecure"] for c in creates))

    def test_a_check_fails_on_an_answer_that_breaks_the_contract(self):
        self.simulated.break_metrics = True
        code, output = self.run_script(self.environment)
        self.assertEqual(code, 1, output)
        self.assertIn("FAIL metrics()", output)
        self.assertIn("7 of 8 checks passed", output)

    def test_a_missing_variable_fails_and_is_named(self):
        environment = dict(self.environment)
        del environment["SEAMLESS_TEST_CONTAINER"]
        code, output = self.run_script(environment)
        self.assertEqual(code, 1)
        self.assertIn("missing SEAMLESS_TEST_CONTAINER", output)
        self.assertEqual(self.daemon.requests, [])


if __name__ == "__main__":
    unittest.main()
