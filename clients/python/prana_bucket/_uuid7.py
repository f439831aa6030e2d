"""UUIDv7 packet ids (RFC 9562): a millisecond timestamp first, so ids made
close in time sort close together and land on the same pages of the
bucket's packet index, unlike random v4 ids. Python has uuid.uuid7 only
from 3.14."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_last_seq = 0


def uuid7() -> uuid.UUID:
    """A new UUIDv7; within one process, each is greater than the one before."""
    global _last_ms, _last_seq  # noqa: PLW0603 - one process-wide sequence
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            # A random start leaves room to count up within the millisecond.
            _last_seq = int.from_bytes(os.urandom(2), "big") & 0x7FF
        else:
            # Same millisecond (or the clock went back): count on from the
            # last id; when the 12 bits run out, borrow the next millisecond.
            _last_seq += 1
            if _last_seq > 0xFFF:
                _last_ms += 1
                _last_seq = 0
        ms, seq = _last_ms, _last_seq
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


def new_packet_id() -> str:
    return str(uuid7())
