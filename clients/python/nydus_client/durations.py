"""Parsing of the two text forms the daemon sends: Go durations and RFC 3339 times."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal

__all__ = ["parse_go_duration", "parse_rfc3339"]

# Nanoseconds per unit of Go's time.Duration.String(); "µs" is U+00B5 (what Go
# prints), "μs" U+03BC (what Go also accepts). The sum is kept in Decimal so
# that "512.3µs" reads as 0.0005123, not 0.00051229999.
_UNIT_NANOSECONDS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

# One "<number><unit>" term; units are tried longest first so "ms" is not "m" + "s".
_TERM = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Return the seconds of a Go duration string such as "8.72416ms", "512.3µs" or "2m3.5s".

    Accepts what Go's time.ParseDuration accepts: an optional sign, then one or
    more number+unit terms (ns, us, µs, μs, ms, s, m, h), or a bare "0".
    Raises ValueError on anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"go duration must be a string, not {type(text).__name__}")
    rest = text
    sign = 1.0
    if rest[:1] in ("+", "-"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"invalid go duration {text!r}")
    nanoseconds = Decimal(0)
    position = 0
    while position < len(rest):
        term = _TERM.match(rest, position)
        if term is None:
            raise ValueError(f"invalid go duration {text!r}")
        nanoseconds += Decimal(term.group(1)) * _UNIT_NANOSECONDS[term.group(2)]
        position = term.end()
    return sign * float(nanoseconds / 1_000_000_000)


def parse_rfc3339(text: str) -> datetime:
    """Return the timezone-aware datetime of an RFC 3339 time ("2025-07-18T16:51:52Z").

    Fractions finer than microseconds (Rust sends nanoseconds) are truncated.
    Raises ValueError on anything else, including a time without an offset.
    """
    if not isinstance(text, str):
        raise ValueError(f"rfc 3339 time must be a string, not {type(text).__name__}")
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid rfc 3339 time {text!r}")
    date, clock, fraction, offset = match.groups()
    fraction = (fraction or "")[:6].ljust(6, "0")
    offset = "+00:00" if offset in ("Z", "z") else offset
    return datetime.fromisoformat(f"{date}T{clock}.{fraction}{offset}")


_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
