#!/usr/bin/env python3
"""Writes seeds/record_log/: commit-group records as the SQLite store's
record log holds them (src/store/sqlite/record.rs, log/block.rs), alone and
as a segment of blocks, so the fuzzer starts from valid checksums."""
import struct
import uuid
import zlib
from pathlib import Path


def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(tag, wire, value):
    key = varint(tag << 3 | wire)
    if wire == 0:
        return key + varint(value)
    if wire == 1:
        return key + struct.pack("<d", value)
    data = value.encode() if isinstance(value, str) else value
    return key + varint(len(data)) + data


def insert(seq, user, raw='{"k":[1.5,{"b":null}]}'):
    return b"".join([
        field(1, 0, seq), field(2, 2, uuid.uuid4().bytes), field(3, 2, user),
        field(7, 2, "gurukul"), field(8, 2, "student"),
        field(9, 0, 1_700_000_000), field(10, 0, 123_456_789),
        field(11, 2, "FOCUSED"), field(13, 1, 4.5), field(14, 1, 0.5),
        field(15, 1, 0.0), field(16, 1, 54.78), field(17, 1, 0.9),
        field(18, 2, raw), field(19, 0, 1_700_000_001_654_321),
    ])


def change(seq, status):
    return b"".join([
        field(1, 0, seq), field(2, 2, uuid.uuid4().bytes), field(3, 2, status),
        field(4, 0, 2), field(5, 0, 1_700_000_002_000_000), field(6, 0, 1),
        field(7, 2, '[{"action":"focus"}]'), field(8, 2, "karma tracker down"),
    ])


def group(inserts, changes):
    return b"".join([field(1, 2, i) for i in inserts] + [field(2, 2, c) for c in changes])


def block(lsn, payload):
    header = struct.pack("<QI", lsn, len(payload))
    crc = zlib.crc32(header + payload)
    raw = b"PRLB" + header + struct.pack("<I", crc) + payload
    return raw + b"\0" * (-len(raw) % 512)


out = Path(__file__).parent / "seeds" / "record_log"
g1 = group([insert(1, "u1"), insert(2, "u2")], [])
g2 = group([], [change(1, "processed"), change(2, "failed")])
g3 = group([insert(3, "u3", "{}")], [change(3, "dead_letter")])
(out / "group_inserts").write_bytes(g1)
(out / "group_changes").write_bytes(g2)
segment = block(0, g1)
segment += block(len(segment), g2)
segment += block(len(segment), g3)
(out / "segment_three_blocks").write_bytes(segment)
torn = bytearray(segment)
torn[-600] ^= 1
(out / "segment_torn_tail").write_bytes(bytes(torn))
