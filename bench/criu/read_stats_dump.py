#!/usr/bin/env python3
"""Prints CRIU's dump statistics (a `stats-dump` image) as one JSON object.

`crit` is not installed with CRIU here, and the format is small: an optional
service magic, the stats magic, a u32 LE entry length, then one protobuf
stats_entry whose field 1 is a dump_stats_entry (images/stats.proto). Times
are converted from microseconds to milliseconds.

Usage: read_stats_dump.py DIR_OR_FILE...   (the first stats-dump found wins)
"""

import json
import os
import struct
import sys

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
DUMP_FIELDS = {
    1: "freezing_ms",
    2: "frozen_ms",
    3: "memdump_ms",
    4: "memwrite_ms",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
}


def varint(buf, at):
    value, shift = 0, 0
    while True:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def fields(buf):
    """(field number, wire type, value) of each field; value is an int or bytes."""
    at = 0
    while at < len(buf):
        key, at = varint(buf, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(buf, at)
        elif wire == 2:
            size, at = varint(buf, at)
            value, at = buf[at : at + size], at + size
        elif wire == 5:
            value, at = struct.unpack_from("<I", buf, at)[0], at + 4
        elif wire == 1:
            value, at = struct.unpack_from("<Q", buf, at)[0], at + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def parse(data):
    (first,) = struct.unpack_from("<I", data, 0)
    at = 4 if first in (IMG_SERVICE_MAGIC, IMG_COMMON_MAGIC) else 0
    (magic, size) = struct.unpack_from("<II", data, at)
    if magic != STATS_MAGIC:
        raise ValueError(f"not a CRIU statistics image (magic {magic:#x})")
    entry = data[at + 8 : at + 8 + size]
    dump = next((v for n, w, v in fields(entry) if n == 1 and w == 2), None)
    if dump is None:
        raise ValueError("no dump statistics in the entry")
    out = {}
    for number, _, value in fields(dump):
        name = DUMP_FIELDS.get(number)
        if name:
            out[name] = value / 1000 if name.endswith("_ms") else value
    return out


def main(paths):
    for path in paths:
        candidate = os.path.join(path, "stats-dump") if os.path.isdir(path) else path
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                print(json.dumps(parse(f.read())))
            return 0
    print(f"no stats-dump in {' or '.join(paths)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
