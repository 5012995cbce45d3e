"""Server-assigned resource ids: UUIDv7 (RFC 9562) as 32 lowercase hex digits.

A random id (UUIDv4) lands each new resource at a random place in every b-tree keyed by
id (the resource and version keys, the owner index of each index table, the targets of
references to it): each write touches a different leaf page, and after a checkpoint each
page's first change writes a full page image to the WAL. Ids that grow with time append
next to the previous write instead. The 74 random bits keep ids unguessable; the first 48
bits are the creation time in milliseconds, which ``meta.lastUpdated`` of version 1 shows
anyway.
"""

from __future__ import annotations

import os
import threading
import time

_VERSION = 0x7 << 76  # bits 48-51 of the 128
_VARIANT = 0b10 << 62  # bits 64-65
_RAND_A = 0xFFF << 64  # the 12 bits after the version
_RAND_B = (1 << 62) - 1  # the 62 bits after the variant


def new_id() -> str:
    """A fresh UUIDv7 as 32 hex digits (a valid FHIR id, the same shape as ``uuid4().hex``)."""
    millis = time.time_ns() // 1_000_000
    random = int.from_bytes(_random_bytes(10), "big")
    value = (millis << 80) | _VERSION | (random & _RAND_A) | _VARIANT | (random & _RAND_B)
    return f"{value:032x}"


#: Bytes from the operating system's CSPRNG, read 4 KiB at a time per thread.
_CHUNK = 4096
_local = threading.local()


def _random_bytes(n: int) -> bytes:
    """``os.urandom(n)`` without a system call each time: ``os.urandom`` lets go of the
    interpreter lock for its system call, and under load a request thread then waited for the
    lock to come back (py-spy: 5 % of a create's samples in a 2 µs call)."""
    buffer: bytes = getattr(_local, "buffer", b"")
    if len(buffer) < n:
        buffer = os.urandom(_CHUNK)
    _local.buffer = buffer[n:]
    return buffer[:n]


def _forget_in_child() -> None:  # a forked process must not hand out its parent's next ids
    _local.__dict__.clear()


os.register_at_fork(after_in_child=_forget_in_child)
