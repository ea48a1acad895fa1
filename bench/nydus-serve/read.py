#!/usr/bin/env python3
"""Reads the files of a container's image from the host, through the
container's root (/proc/<pid>/root), and prints what the bench needs.

  read.py pass ROOT DIR            one pass over every file under ROOT/DIR:
                                   bytes, seconds, and the median and max time
                                   to the first byte of a file (open + 1-byte
                                   read), as JSON
  read.py loop ROOT DIR OUT STOP   reads every file again and again (its page
                                   cache dropped after each, so each read asks
                                   the filesystem) until the file STOP exists;
                                   writes "<start> <seconds>" per file read to
                                   OUT; exits 1 on the first error
"""

import json
import os
import sys
import time


def files_under(root):
    found = []
    for base, _, names in os.walk(root):
        for name in names:
            found.append(os.path.join(base, name))
    found.sort()
    return found


def one_pass(root):
    total, first_bytes = 0, []
    started = time.perf_counter()
    for path in files_under(root):
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            head = f.read(1)
            first_bytes.append(time.perf_counter() - t0)
            total += len(head)
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
    seconds = time.perf_counter() - started
    first_bytes.sort()
    return {
        "bytes": total,
        "seconds": seconds,
        "files": len(first_bytes),
        "first_byte_median_ms": first_bytes[(len(first_bytes) - 1) // 2] * 1000,
        "first_byte_max_ms": first_bytes[-1] * 1000,
    }


def loop(root, out, stop):
    paths = files_under(root)
    with open(out, "w") as log:
        while not os.path.exists(stop):
            for path in paths:
                t0 = time.perf_counter()
                try:
                    with open(path, "rb", buffering=0) as f:
                        while f.read(1 << 20):
                            pass
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError as e:
                    log.write(f"error {path}: {e}\n")
                    log.flush()
                    sys.exit(1)
                log.write(f"{time.time():.6f} {time.perf_counter() - t0:.6f}\n")
            log.flush()


def main():
    if sys.argv[1] == "pass":
        print(json.dumps(one_pass(os.path.join(sys.argv[2], sys.argv[3].lstrip("/")))))
    elif sys.argv[1] == "loop":
        loop(os.path.join(sys.argv[2], sys.argv[3].lstrip("/")), sys.argv[4], sys.argv[5])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")


if __name__ == "__main__":
    main()
