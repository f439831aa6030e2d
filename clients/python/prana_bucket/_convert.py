"""JSON-shaped values (the REST bucket's field names and values) to and from
the contract's messages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from prana_bucket import pb

#: A karma action as the seed records it: ``{"action": ..., "reward": ..., "token": ...}``.
KarmaAction = Mapping[str, Any]

_SYSTEM_TYPES = {
    "": pb.SystemType.SYSTEM_TYPE_UNSPECIFIED,
    "gurukul": pb.SystemType.SYSTEM_TYPE_GURUKUL,
    "ems": pb.SystemType.SYSTEM_TYPE_EMS,
}
_ROLES = {
    "": pb.Role.ROLE_UNSPECIFIED,
    "student": pb.Role.ROLE_STUDENT,
    "employee": pb.Role.ROLE_EMPLOYEE,
}
_STRINGS = ("packet_id", "user_id", "employee_id", "session_id", "lesson_id")
_STATES = ("cognitive_state", "state")
_NUMBERS = ("active_seconds", "idle_seconds", "away_seconds", "focus_score", "integrity_score")


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


def timestamp(value: dt.datetime | str) -> timestamp_pb2.Timestamp:
    """A Timestamp from an aware datetime (naive means UTC) or an RFC 3339
    string (``2024-01-20T10:30:00Z``)."""
    message = timestamp_pb2.Timestamp()
    if isinstance(value, str):
        fraction = value.partition(".")[2]
        digits = len(fraction) - len(fraction.lstrip("0123456789"))
        try:
            if digits > 6:
                raise ValueError("nanoseconds: datetime would drop them")
            # fromisoformat is C and some 20 times faster than
            # FromJsonString's strptime; it lacks 'Z' before 3.11.
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            message.FromJsonString(value)  # RFC 3339 forms fromisoformat refuses
            return message
        if parsed.tzinfo is None:
            # RFC 3339 requires an offset: let the protobuf parser refuse it.
            message.FromJsonString(value)
            return message
        value = parsed
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    message.FromDatetime(value)
    return message


def to_datetime(message: timestamp_pb2.Timestamp) -> dt.datetime:
    return message.ToDatetime(tzinfo=dt.timezone.utc)


def _enum(value: Any, names: Mapping[str, int], prefix: str, field: str) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.lower() in names:
        return names[text.lower()]
    # The contract's own names (SYSTEM_TYPE_GURUKUL) are accepted too.
    for name, number in names.items():
        if name and text == f"{prefix}{name.upper()}":
            return number
    raise ValueError(f"{field}: unknown value {value!r}")


def packet_input(packet: pb.PacketInput | Mapping[str, Any]) -> pb.PacketInput:
    """A PacketInput from the JSON the REST bucket takes (``system_type``
    ``"gurukul"``, ``timestamp`` a string or a datetime, ``raw_signals`` a
    dict), or the message itself (copied)."""
    if isinstance(packet, pb.PacketInput):
        copy = pb.PacketInput()
        copy.CopyFrom(packet)
        return copy
    unknown = set(packet) - {
        *_STRINGS,
        *_STATES,
        *_NUMBERS,
        "system_type",
        "role",
        "timestamp",
        "raw_signals",
    }
    if unknown:
        raise ValueError(f"unknown packet fields: {', '.join(sorted(unknown))}")
    message = pb.PacketInput()
    for name in (*_STRINGS, *_STATES):
        if packet.get(name) is not None:
            setattr(message, name, str(packet[name]))
    for name in _NUMBERS:
        if packet.get(name) is not None:
            setattr(message, name, float(packet[name]))
    if packet.get("system_type") is not None:
        system_type = _enum(packet["system_type"], _SYSTEM_TYPES, "SYSTEM_TYPE_", "system_type")
        message.system_type = pb.SystemType.ValueType(system_type)
    if packet.get("role") is not None:
        message.role = pb.Role.ValueType(_enum(packet["role"], _ROLES, "ROLE_", "role"))
    if packet.get("timestamp") is not None:
        message.timestamp.CopyFrom(timestamp(packet["timestamp"]))
    if packet.get("raw_signals") is not None:
        # SetInParent first: copying an empty Struct ({} is common) would
        # not mark the field present, and the bucket requires it.
        message.raw_signals.SetInParent()
        message.raw_signals.CopyFrom(struct(packet["raw_signals"]))
    return message


def karma_structs(actions: Iterable[KarmaAction] | None) -> list[struct_pb2.Struct]:
    if actions is None:
        return []
    structs = []
    for action in actions:
        if not isinstance(action, Mapping):
            raise TypeError(f"a karma action is a mapping (a JSON object), not {action!r}")
        structs.append(struct(action))
    return structs
