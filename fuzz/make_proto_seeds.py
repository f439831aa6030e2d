#!/usr/bin/env python3
"""Writes the proto_packet seed corpus (seeds/proto_packet/*.pb): protobuf
IngestRequest / IngestBatchRequest bodies, encoded by hand (no protobuf
package needed). Field numbers: proto/bucket/v1/bucket.proto and
google/protobuf/{struct,timestamp}.proto. Run from fuzz/: python3 make_proto_seeds.py
"""
import os
import struct


def varint(n):
    n &= (1 << 64) - 1  # negative int32/int64: ten bytes, two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wire):
    return varint(field << 3 | wire)


def vint(field, n):
    return key(field, 0) + varint(n)


def double(field, x):
    return key(field, 1) + struct.pack("<d", x)


def msg(field, body):
    if isinstance(body, str):
        body = body.encode()
    return key(field, 2) + varint(len(body)) + body


def timestamp(seconds, nanos=0):
    return vint(1, seconds) + (vint(2, nanos) if nanos else b"")


def value(v):
    """google.protobuf.Value from a Python value."""
    if v is None:
        return vint(1, 0)
    if isinstance(v, bool):
        return vint(4, int(v))
    if isinstance(v, (int, float)):
        return double(2, float(v))
    if isinstance(v, str):
        return msg(3, v)
    if isinstance(v, dict):
        return msg(5, struct_(v))
    if isinstance(v, list):
        return msg(6, b"".join(msg(1, value(x)) for x in v))
    raise TypeError(v)


def struct_(d):
    return b"".join(msg(1, msg(1, k) + msg(2, value(v))) for k, v in d.items())


def packet(**f):
    """PacketInput; strings and enums as numbers, seconds as doubles."""
    numbers = {"packet_id": 1, "user_id": 2, "employee_id": 3, "session_id": 4,
               "lesson_id": 5, "cognitive_state": 9, "state": 10}
    out = b""
    for name, n in numbers.items():
        if name in f:
            out += msg(n, f[name])
    if "system_type" in f:
        out += vint(6, f["system_type"])
    if "role" in f:
        out += vint(7, f["role"])
    if "timestamp" in f:
        out += msg(8, timestamp(*f["timestamp"]))
    for name, n in (("active_seconds", 11), ("idle_seconds", 12), ("away_seconds", 13),
                    ("focus_score", 14), ("integrity_score", 15)):
        if name in f:
            out += double(n, f[name])
    if "raw_signals" in f:
        out += msg(16, struct_(f["raw_signals"]))
    return out


SEED = dict(user_id="user_123", session_id="session_456", lesson_id="lesson_789",
            system_type=1, role=1, timestamp=(1705746600,), cognitive_state="ON_TASK",
            active_seconds=4.5, idle_seconds=0.3, away_seconds=0.2, focus_score=85.0,
            raw_signals={"dwell_time_ms": 1200, "mouse_velocity": 0.5})
LEGACY = dict(packet_id="0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", employee_id="emp_42",
              system_type=2, role=2, timestamp=(1705746600, 250000000), state="WORKING",
              active_seconds=4.6, away_seconds=0.5, integrity_score=0.9,
              raw_signals={"keys": [1, 2.5, None, True, "x"], "nested": {"a": {"b": {}}}})
MINIMAL = dict(user_id="u1", timestamp=(1705746600,), cognitive_state="DEEP_FOCUS",
               active_seconds=5.0, raw_signals={})
BROKEN = dict(packet_id="not-a-uuid", system_type=7, role=-1, timestamp=(0, -1),
              state="SLEEPING", active_seconds=float("nan"), idle_seconds=-1.0,
              away_seconds=float("inf"), focus_score=101.0, integrity_score=1.5)
FUTURE = dict(SEED, timestamp=(253402300799, 999999999),
              raw_signals={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}})

SEEDS = {
    "seed_packet.pb": msg(1, packet(**SEED)),
    "legacy_employee.pb": msg(1, packet(**LEGACY)),
    "minimal.pb": msg(1, packet(**MINIMAL)),
    "broken_rules.pb": msg(1, packet(**BROKEN)),
    "future_deep.pb": msg(1, packet(**FUTURE)),
    "batch_mixed.pb": b"".join(msg(1, packet(**p)) for p in (SEED, BROKEN, MINIMAL)),
    "no_packet.pb": b"",
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "proto_packet")
    os.makedirs(out, exist_ok=True)
    for name, body in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(body)
        print(f"{name}: {len(body)} bytes")
