"""The errors the client raises: one base class, one subclass per code of the REST contract."""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = [
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
    "error_from_answer",
]


class SeamlessSnapshotError(Exception):
    """A failure of a call: an error answer of the daemon, or no usable answer at all.

    status  -- the HTTP status (None when there was no answer)
    code    -- the contract's code ("CONTAINER_NOT_FOUND", ...) or one of the
               client's own: CONNECTION_ERROR, INVALID_RESPONSE, WAIT_TIMEOUT
    message -- the daemon's message
    details -- the daemon's details object (a dict, possibly empty)
    """

    def __init__(
        self,
        status: Optional[int],
        code: str,
        message: str,
        details: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(f"{code} ({status}): {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})


class InvalidParameterError(SeamlessSnapshotError):
    """INVALID_PARAMETER (400)."""


class ContainerNotFoundError(SeamlessSnapshotError):
    """CONTAINER_NOT_FOUND (404)."""


class SnapshotNotFoundError(SeamlessSnapshotError):
    """SNAPSHOT_NOT_FOUND (404)."""


class PermissionDeniedError(SeamlessSnapshotError):
    """PERMISSION_DENIED (403; 429 when locked out after wrong tokens)."""


class InternalError(SeamlessSnapshotError):
    """INTERNAL_ERROR (500)."""


class ContainerNotRunningError(SeamlessSnapshotError):
    """CONTAINER_NOT_RUNNING (400)."""


class SnapshotInProgressError(SeamlessSnapshotError):
    """SNAPSHOT_IN_PROGRESS (409)."""


class PauseTimeoutError(SeamlessSnapshotError):
    """PAUSE_TIMEOUT (500)."""


class AtomicSwitchFailedError(SeamlessSnapshotError):
    """ATOMIC_SWITCH_FAILED (500)."""


class BackgroundProcessingFailedError(SeamlessSnapshotError):
    """BACKGROUND_PROCESSING_FAILED (500)."""


class SeamlessConnectionError(SeamlessSnapshotError):
    """The daemon could not be reached, or the connection broke or timed out (code CONNECTION_ERROR)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, "CONNECTION_ERROR", message)


class InvalidResponseError(SeamlessSnapshotError):
    """An answer that does not follow the contract (code INVALID_RESPONSE)."""

    def __init__(self, status: Optional[int], message: str) -> None:
        super().__init__(status, "INVALID_RESPONSE", message)


class WaitTimeoutError(SeamlessSnapshotError):
    """wait_for gave up before the snapshot ended (code WAIT_TIMEOUT)."""

    def __init__(self, snapshot_id: str, timeout: float, last_state: str) -> None:
        super().__init__(
            None,
            "WAIT_TIMEOUT",
            f"snapshot {snapshot_id} still {last_state} after {timeout}s",
            {"snapshot_id": snapshot_id, "state": last_state},
        )


_CLASS_OF_CODE = {
    "INVALID_PARAMETER": InvalidParameterError,
    "CONTAINER_NOT_FOUND": ContainerNotFoundError,
    "SNAPSHOT_NOT_FOUND": SnapshotNotFoundError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "INTERNAL_ERROR": InternalError,
    "CONTAINER_NOT_RUNNING": ContainerNotRunningError,
    "SNAPSHOT_IN_PROGRESS": SnapshotInProgressError,
    "PAUSE_TIMEOUT": PauseTimeoutError,
    "ATOMIC_SWITCH_FAILED": AtomicSwitchFailedError,
    "BACKGROUND_PROCESSING_FAILED": BackgroundProcessingFailedError,
}


def error_from_answer(status: int, body: Any, text: str) -> SeamlessSnapshotError:
    """Build the error of a non-2xx answer from its decoded JSON body (or its text when not JSON).

    An answer without the contract's {"error": {...}} envelope (a proxy's page,
    say) still raises, with code HTTP_<status> and the body text as message.
    """
    envelope = body.get("error") if isinstance(body, dict) else None
    if isinstance(envelope, dict) and isinstance(envelope.get("code"), str):
        code = envelope["code"]
        message = envelope.get("message")
        details = envelope.get("details")
        cls = _CLASS_OF_CODE.get(code, SeamlessSnapshotError)
        return cls(
            status,
            code,
            message if isinstance(message, str) else "",
            details if isinstance(details, dict) else {},
        )
    return SeamlessSnapshotError(status, f"HTTP_{status}", text.strip() or f"http status {status}")
