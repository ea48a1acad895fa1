"""A client of the seamless-snapshotter REST API (seamless commits of running containers).

    from nydus_client import SeamlessSnapshotClient
    client = SeamlessSnapshotClient(socket_path="/run/containerd-seamless/rest.sock")
    result = client.create_snapshot("mycontainer", "registry.example.com/myimage:snapshot", wait=True)
    print(result.snapshot_id, result.pause_time)

The standard library only.
"""

from .client import DEFAULT_SOCKET_PATH, DEFAULT_TIMEOUT, SeamlessSnapshotClient
from .durations import parse_go_duration, parse_rfc3339
from .errors import (
    AtomicSwitchFailedError,
    BackgroundProcessingFailedError,
    ContainerNotFoundError,
    ContainerNotRunningError,
    InternalError,
    InvalidParameterError,
    InvalidResponseError,
    PauseTimeoutError,
    PermissionDeniedError,
    SeamlessConnectionError,
    SeamlessSnapshotError,
    SnapshotInProgressError,
    SnapshotNotFoundError,
    WaitTimeoutError,
)
from .models import Metrics, SnapshotPage, SnapshotResult, SnapshotState, SnapshotStatus

__version__ = "0.1.0"

__all__ = [
    "SeamlessSnapshotClient",
    "DEFAULT_SOCKET_PATH",
    "DEFAULT_TIMEOUT",
    "parse_go_duration",
    "parse_rfc3339",
    "SnapshotState",
    "SnapshotResult",
    "SnapshotStatus",
    "SnapshotPage",
    "Metrics",
    "SeamlessSnapshotError",
    "InvalidParameterError",
    "ContainerNotFoundError",
    "SnapshotNotFoundError",
    "PermissionDeniedError",
    "InternalError",
    "ContainerNotRunningError",
    "SnapshotInProgressError",
    "PauseTimeoutError",
    "AtomicSwitchFailedError",
    "BackgroundProcessingFailedError",
    "SeamlessConnectionError",
    "InvalidResponseError",
    "WaitTimeoutError",
]
