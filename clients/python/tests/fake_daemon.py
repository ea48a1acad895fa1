"""A fake of the daemon's REST API for the offline tests: records each request, answers from a script.

Not a test module itself (unittest discovers test*.py only).
"""

from __future__ import annotations

import json
import os
import socketserver
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

# An answer: (status, body) where a dict/list body is sent as JSON and a str as text/plain.
Answer = Tuple[int, Union[Dict[str, Any], List[Any], str]]


@dataclass
class Request:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Script:
    """What the fake answers: for (method, path) a fixed answer or a queue consumed one per request."""

    answers: Dict[Tuple[str, str], Union[Answer, List[Answer], Callable[[Request], Answer]]] = field(
        default_factory=dict
    )
    requests: List[Request] = field(default_factory=list)
    # Answers what `answers` does not name, when set.
    fallback: Optional[Callable[[Request], Answer]] = None

    def answer(self, request: Request) -> Answer:
        self.requests.append(request)
        scripted = self.answers.get((request.method, request.path))
        if scripted is None:
            if self.fallback is not None:
                return self.fallback(request)
            return 599, "no scripted answer"
        if callable(scripted):
            return scripted(request)
        if isinstance(scripted, list):
            return scripted.pop(0) if len(scripted) > 1 else scripted[0]
        return scripted


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        status, body = self.server.script.answer(request)
        if isinstance(body, str):
            payload, content_type = body.encode("utf-8"), "text/plain; version=0.0.4"
        else:
            payload, content_type = json.dumps(body).encode("utf-8"), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet; and the default one indexes client_address, which is "" on a unix socket.
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeDaemon:
    """Serves a Script on a unix socket (unix=True) or on 127.0.0.1 at a free port."""

    def __init__(self, unix: bool) -> None:
        self.script = Script()
        self._directory: Optional[tempfile.TemporaryDirectory] = None
        if unix:
            self._directory = tempfile.TemporaryDirectory(prefix="fake-seamless-")
            self.socket_path: Optional[str] = os.path.join(self._directory.name, "rest.sock")
            self._server = _UnixHTTPServer(self.socket_path, _Handler)
            self.base_url = f"unix://{self.socket_path}"
        else:
            self.socket_path = None
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            self._server.daemon_threads = True
            self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._server.script = self.script
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        if self._directory is not None:
            self._directory.cleanup()

    def on(self, method: str, path: str, *answers: Answer) -> None:
        """Answer method+path with `answers` in turn, the last one repeating."""
        self.script.answers[(method, path)] = list(answers)

    def on_call(self, method: str, path: str, answer: Callable[[Request], Answer]) -> None:
        self.script.answers[(method, path)] = answer

    def on_any(self, answer: Callable[[Request], Answer]) -> None:
        """Answer every request no `on` names with `answer(request)`."""
        self.script.fallback = answer

    @property
    def requests(self) -> List[Request]:
        return self.script.requests
