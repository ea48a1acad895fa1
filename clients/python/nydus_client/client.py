"""SeamlessSnapshotClient: the REST API of seamless-snapshotter over TCP or the daemon's unix socket."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote, urlencode, urlsplit

from .errors import (
    InvalidResponseError,
    SeamlessConnectionError,
    SeamlessSnapshotError,
    WaitTimeoutError,
    error_from_answer,
)
from .models import Metrics, SnapshotPage, SnapshotResult, SnapshotState, SnapshotStatus

__all__ = ["SeamlessSnapshotClient", "DEFAULT_SOCKET_PATH", "DEFAULT_TIMEOUT"]

DEFAULT_SOCKET_PATH = "/run/containerd-seamless/rest.sock"
# Seconds one request may take; a create with wait=True answers only when the
# commit (push included) has ended, so this is generous.
DEFAULT_TIMEOUT = 600.0

# The create options the contract names; anything else is a caller's typo.
_OPTION_NAMES = (
    "work_dir",
    "fs_version",
    "compressor",
    "target_insecure",
    "source_insecure",
    "with_paths",
    "without_paths",
    "maximum_times",
    "background_workers",
    "format",
    "target_creds",
    "source_creds",
)

Credentials = Union[Mapping[str, str], Tuple[str, str]]


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class SeamlessSnapshotClient:
    """A client of the seamless-commit REST API.

    Exactly one transport:
      base_url="http://127.0.0.1:8089"          TCP (give token=, the daemon requires it there)
      base_url="unix:///run/.../rest.sock"      the daemon's unix socket
      socket_path="/run/.../rest.sock"          the same
    With neither, the default socket DEFAULT_SOCKET_PATH is used.
    timeout is in seconds, per request.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        socket_path: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if base_url is not None and socket_path is not None:
            raise ValueError("give base_url or socket_path, not both")
        self._token = token
        self._timeout = timeout
        self._socket_path: Optional[str] = None
        self._scheme = "http"
        self._netloc = ""
        self._prefix = ""
        if base_url is None:
            self._socket_path = socket_path or DEFAULT_SOCKET_PATH
        else:
            parts = urlsplit(base_url)
            if parts.scheme == "unix":
                if not parts.path:
                    raise ValueError(f"unix url without a socket path: {base_url!r}")
                self._socket_path = parts.path
            elif parts.scheme in ("http", "https"):
                if not parts.netloc:
                    raise ValueError(f"url without a host: {base_url!r}")
                self._scheme = parts.scheme
                self._netloc = parts.netloc
                self._prefix = parts.path.rstrip("/")
            else:
                raise ValueError(f"base_url must be http://, https:// or unix://, not {base_url!r}")

    def __repr__(self) -> str:
        where = (
            f"unix://{self._socket_path}"
            if self._socket_path
            else f"{self._scheme}://{self._netloc}{self._prefix}"
        )
        return f"SeamlessSnapshotClient({where!r})"

    # ---- the API -------------------------------------------------------------

    def create_snapshot(
        self,
        container_id: str,
        target_ref: str,
        wait: bool = False,
        namespace: Optional[str] = None,
        **options: Any,
    ) -> SnapshotResult:
        """Commit the running container `container_id` and push it as `target_ref`.

        wait=True answers when the job has ended (an error if it failed);
        wait=False answers once the container is running again, the push
        going on in the background (follow it with wait_for / get_snapshot).
        options: work_dir, fs_version ("5"/"6" or 5/6), compressor,
        target_insecure, source_insecure, with_paths, without_paths,
        maximum_times, background_workers, format ("nydus" | "oci"),
        target_creds / source_creds ({"username", "password"} or a pair).
        Options left out (or None) take the daemon's defaults.
        """
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown create_snapshot option(s): {', '.join(unknown)}")
        body_options: Dict[str, Any] = {"wait": bool(wait)}
        for name in _OPTION_NAMES:
            value = options.get(name)
            if value is None:
                continue
            if name in ("target_creds", "source_creds"):
                value = _credentials(name, value)
            elif name in ("with_paths", "without_paths"):
                value = _paths(name, value)
            body_options[name] = value
        body: Dict[str, Any] = {
            "container_id": container_id,
            "target_ref": target_ref,
            "options": body_options,
        }
        if namespace is not None:
            body["namespace"] = namespace
        status, answer = self._json("POST", "/api/v1/snapshots", body)
        return _typed(SnapshotResult, status, answer)

    def get_snapshot(self, snapshot_id: str) -> SnapshotStatus:
        """The state of one snapshot job; SnapshotNotFoundError (404) when the daemon has none of that id."""
        status, answer = self._json("GET", f"/api/v1/snapshots/{quote(snapshot_id, safe='')}")
        return _typed(SnapshotStatus, status, answer)

    def list_snapshots(
        self,
        state: Union[SnapshotState, str, None] = None,
        limit: Optional[int] = None,
        offset: Optional[int] = None,
    ) -> SnapshotPage:
        """One page of snapshot jobs, optionally only those in `state`."""
        query = {}
        if state is not None:
            query["state"] = SnapshotState(state).value
        if limit is not None:
            query["limit"] = str(int(limit))
        if offset is not None:
            query["offset"] = str(int(offset))
        path = "/api/v1/snapshots" + (f"?{urlencode(query)}" if query else "")
        status, answer = self._json("GET", path)
        return _typed(SnapshotPage, status, answer)

    def metrics(self) -> Metrics:
        """Counters and average durations of the daemon's snapshots."""
        status, answer = self._json("GET", "/api/v1/metrics")
        return _typed(Metrics, status, answer)

    def prometheus_metrics(self) -> str:
        """The Prometheus text exposition of GET /metrics."""
        _, text = self._request("GET", "/metrics", None, accept="text/plain")
        return text

    def wait_for(
        self, snapshot_id: str, timeout: float = 600.0, interval: float = 0.5
    ) -> SnapshotStatus:
        """Poll get_snapshot every `interval` seconds until the job is completed or failed.

        Returns the last status (check .state: a failed job is returned, not
        raised); raises WaitTimeoutError when `timeout` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.get_snapshot(snapshot_id)
            if status.ended:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(snapshot_id, timeout, status.state.value)
            time.sleep(min(interval, remaining))

    # ---- the transport -------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return _UnixHTTPConnection(self._socket_path, self._timeout)
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._netloc, timeout=self._timeout)
        return http.client.HTTPConnection(self._netloc, timeout=self._timeout)

    def _json(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        status, text = self._request(method, path, body, accept="application/json")
        try:
            return status, json.loads(text)
        except ValueError:
            raise InvalidResponseError(status, f"{method} {path}: answer is not json: {text[:200]!r}") from None

    def _request(
        self, method: str, path: str, body: Any, accept: str
    ) -> Tuple[int, str]:
        """Send one request; return (status, body text) of a 2xx answer, raise for anything else."""
        headers = {"Accept": accept}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        connection = self._connection()
        try:
            connection.request(method, self._prefix + path, body=payload, headers=headers)
            response = connection.getresponse()
            status = response.status
            text = response.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException) as error:
            raise SeamlessConnectionError(
                f"{method} {path} to {self!r} failed: {type(error).__name__}: {error}"
            ) from error
        finally:
            connection.close()
        if not 200 <= status < 300:
            try:
                decoded = json.loads(text)
            except ValueError:
                decoded = None
            raise error_from_answer(status, decoded, text)
        return status, text


def _typed(cls, status: int, answer: Any):
    try:
        return cls.from_json(answer)
    except InvalidResponseError as error:
        error.status = status
        raise


def _credentials(name: str, value: Credentials) -> Dict[str, str]:
    if isinstance(value, Mapping):
        if set(value) != {"username", "password"}:
            raise ValueError(f"{name} needs exactly 'username' and 'password', got {sorted(value)}")
        return {"username": value["username"], "password": value["password"]}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"username": value[0], "password": value[1]}
    raise ValueError(f"{name} must be {{'username', 'password'}} or a (username, password) pair")


def _paths(name: str, value: Sequence[str]) -> list:
    if isinstance(value, str):
        raise ValueError(f"{name} must be a list of paths, not one string")
    return list(value)
