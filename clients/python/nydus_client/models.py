"""Typed answers of the REST API, each built from the decoded JSON by its `from_json` constructor.

A constructor checks every field it names and raises InvalidResponseError when
one is missing or of the wrong type; fields the contract calls extras stay in
`raw`, the whole decoded object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional

from .durations import parse_go_duration, parse_rfc3339
from .errors import InvalidResponseError

__all__ = ["SnapshotState", "SnapshotResult", "SnapshotStatus", "SnapshotPage", "Metrics"]


class SnapshotState(str, enum.Enum):
    """The state of a snapshot job."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        """True once the job is completed or failed."""
        return self in (SnapshotState.COMPLETED, SnapshotState.FAILED)

    def __str__(self) -> str:
        return self.value


def _object(body: Any, what: str) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidResponseError(None, f"{what} is not a json object: {body!r}")
    return body


def _string(body: Dict[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise InvalidResponseError(None, f"{what} has no string {key!r}: {value!r}")
    return value


def _optional_string(body: Dict[str, Any], key: str, what: str) -> Optional[str]:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidResponseError(None, f"{what} has a non-string {key!r}: {value!r}")
    return value


def _integer(body: Dict[str, Any], key: str, what: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidResponseError(None, f"{what} has no integer {key!r}: {value!r}")
    return value


def _number(body: Dict[str, Any], key: str, what: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidResponseError(None, f"{what} has no number {key!r}: {value!r}")
    return float(value)


def _duration(body: Dict[str, Any], key: str, what: str, required: bool) -> Optional[str]:
    value = _string(body, key, what) if required else _optional_string(body, key, what)
    if value is not None:
        try:
            parse_go_duration(value)
        except ValueError as error:
            raise InvalidResponseError(None, f"{what} {key!r}: {error}") from None
    return value


def _time(value: Any, key: str, what: str) -> datetime:
    try:
        return parse_rfc3339(value)
    except ValueError as error:
        raise InvalidResponseError(None, f"{what} {key!r}: {error}") from None


def _seconds(duration: Optional[str]) -> Optional[float]:
    return None if duration is None else parse_go_duration(duration)


@dataclass(frozen=True)
class SnapshotResult:
    """The answer of create_snapshot.

    Durations are the Go duration strings the daemon sent ("8.72416ms"); the
    *_seconds properties give them as float seconds. A field the daemon left
    out is None.
    """

    snapshot_id: str
    pause_time: Optional[str]
    total_time: Optional[str]
    old_upper_dir: Optional[str]
    new_upper_dir: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> "SnapshotResult":
        what = "snapshot result"
        body = _object(body, what)
        return cls(
            snapshot_id=_string(body, "snapshot_id", what),
            pause_time=_duration(body, "pause_time", what, required=False),
            total_time=_duration(body, "total_time", what, required=False),
            old_upper_dir=_optional_string(body, "old_upper_dir", what),
            new_upper_dir=_optional_string(body, "new_upper_dir", what),
            raw=body,
        )

    @property
    def pause_seconds(self) -> Optional[float]:
        """How long the container was paused, in seconds."""
        return _seconds(self.pause_time)

    @property
    def total_seconds(self) -> Optional[float]:
        """How long the whole commit took, in seconds."""
        return _seconds(self.total_time)

    @property
    def state(self) -> Optional[SnapshotState]:
        """The state the daemon reported with the result, if it did (an extra of the contract)."""
        value = self.raw.get("state")
        try:
            return SnapshotState(value) if value is not None else None
        except ValueError:
            return None


@dataclass(frozen=True)
class SnapshotStatus:
    """The answer of get_snapshot, and each element of list_snapshots."""

    snapshot_id: str
    state: SnapshotState
    progress: float
    start_time: datetime
    end_time: Optional[datetime]
    error: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> "SnapshotStatus":
        what = "snapshot status"
        body = _object(body, what)
        state = _string(body, "state", what)
        try:
            typed_state = SnapshotState(state)
        except ValueError:
            raise InvalidResponseError(None, f"{what} has an unknown state {state!r}") from None
        end_time = body.get("end_time")
        return cls(
            snapshot_id=_string(body, "snapshot_id", what),
            state=typed_state,
            progress=_number(body, "progress", what),
            start_time=_time(_string(body, "start_time", what), "start_time", what),
            end_time=None if end_time is None else _time(end_time, "end_time", what),
            error=_optional_string(body, "error", what),
            raw=body,
        )

    @property
    def ended(self) -> bool:
        """True once the job is completed or failed."""
        return self.state.ended


@dataclass(frozen=True)
class SnapshotPage:
    """The answer of list_snapshots: one page of statuses and where it sits in the whole list."""

    snapshots: List[SnapshotStatus]
    total: int
    limit: int
    offset: int
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> "SnapshotPage":
        what = "snapshot list"
        body = _object(body, what)
        snapshots = body.get("snapshots")
        if not isinstance(snapshots, list):
            raise InvalidResponseError(None, f"{what} has no list 'snapshots': {snapshots!r}")
        return cls(
            snapshots=[SnapshotStatus.from_json(item) for item in snapshots],
            total=_integer(body, "total", what),
            limit=_integer(body, "limit", what),
            offset=_integer(body, "offset", what),
            raw=body,
        )

    def __iter__(self):
        return iter(self.snapshots)

    def __len__(self) -> int:
        return len(self.snapshots)


@dataclass(frozen=True)
class Metrics:
    """The answer of metrics(): counters and Go-duration averages of the daemon's snapshots."""

    total_snapshots: int
    successful_snapshots: int
    failed_snapshots: int
    average_pause_time: str
    average_total_time: str
    average_background_time: str
    timestamp: datetime
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> "Metrics":
        what = "metrics"
        body = _object(body, what)
        metrics = _object(body.get("metrics"), "metrics.metrics")
        return cls(
            total_snapshots=_integer(metrics, "total_snapshots", what),
            successful_snapshots=_integer(metrics, "successful_snapshots", what),
            failed_snapshots=_integer(metrics, "failed_snapshots", what),
            average_pause_time=_duration(metrics, "average_pause_time", what, required=True),
            average_total_time=_duration(metrics, "average_total_time", what, required=True),
            average_background_time=_duration(
                metrics, "average_background_time", what, required=True
            ),
            timestamp=_time(_string(body, "timestamp", what), "timestamp", what),
            raw=body,
        )

    @property
    def average_pause_seconds(self) -> float:
        return parse_go_duration(self.average_pause_time)

    @property
    def average_total_seconds(self) -> float:
        return parse_go_duration(self.average_total_time)

    @property
    def average_background_seconds(self) -> float:
        return parse_go_duration(self.average_background_time)
