"""What the blocking and the asyncio consumers share: the delivery handed to
user code, the outcomes it produces, the book of leases in hand, and the
reconnect backoff. No I/O here."""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from prana_bucket import _convert, pb
from prana_bucket._convert import KarmaAction

log = logging.getLogger("prana_bucket")

# The most items the bucket takes in one MarkProcessedBatch or ExtendLease
# by default (BUCKET_MAX_BATCH).
MAX_BATCH = 500
# The bucket keeps at most 4096 bytes of an error message.
MAX_ERROR_BYTES = 4096

# Stream errors worth reconnecting after: the bucket went away, restarted,
# shed load, or a proxy in between gave up. Anything else (a bad token, a
# bad request) would fail the same way again.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class FlowControl:
    """How much a subscription holds and for how long (cf. Pub/Sub's FlowControl).

    - ``max_in_flight``: deliveries the bucket may hand this subscription
      before it has marked them (StreamPending's max_in_flight, at most
      10000): the bucket stops sending until outcomes are recorded.
    - ``lease_seconds``: each lease, and each extension of it (1..3600).
    - ``max_lease_duration``: how long a delivery's lease is extended while
      it is still in hand; after that it runs out and the packet goes to
      another consumer (a handler that hangs does not hold it forever).
    """

    max_in_flight: int = 256
    lease_seconds: int = 30
    max_lease_duration: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_in_flight <= 10_000:
            raise ValueError("max_in_flight must be within 1..10000")
        if not 1 <= self.lease_seconds <= 3600:
            raise ValueError("lease_seconds must be within 1..3600")
        if self.max_lease_duration <= 0:
            raise ValueError("max_lease_duration must be positive")


@dataclass
class Outcome:
    """What becomes of one delivery: a mark (success or failure) or a nack."""

    packet_id: str
    lease_token: str
    mark: pb.MarkProcessedRequest | None  # None: a nack


def error_text(error: BaseException) -> str:
    """The failure message recorded for an exception: its message, else its
    type's name, cut to what the bucket keeps."""
    text = str(error) or type(error).__name__
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_ERROR_BYTES:
        text = encoded[: MAX_ERROR_BYTES - 3].decode("utf-8", "ignore") + "..."
    return text


class Delivery:
    """One packet delivered to this consumer, leased to it until marked.

    The handler may settle it itself with :meth:`ack`, :meth:`fail` or
    :meth:`nack`; a handler that returns without doing so acks it with what
    it returned as the karma actions, and one that raises fails it with the
    exception's message. Only the first settlement counts.
    """

    __slots__ = (
        "_lease_expires_at",
        "_lock",
        "_raw_signals",
        "_settle",
        "_settled",
        "delivery_attempt",
        "generation",
        "lease_token",
        "packet",
        "received",
    )

    def __init__(
        self,
        response: pb.StreamPendingResponse,
        settle: Callable[[Outcome], None],
        generation: int,
    ) -> None:
        #: The packet, as the contract's message.
        self.packet: pb.Packet = response.packet
        #: 1 for the first delivery, 2 after one lease ended unmarked, ...
        self.delivery_attempt: int = response.delivery_attempt
        self._lease_expires_at = response.lease_expires_at
        #: Names this delivery's lease (ExtendLease).
        self.lease_token: str = response.lease_token
        #: time.monotonic() when it arrived.
        self.received: float = time.monotonic()
        #: Which connection of the subscription delivered it.
        self.generation = generation
        self._settle = settle
        self._settled = False
        self._lock = threading.Lock()
        self._raw_signals: dict[str, Any] | None = None

    # --- the packet's fields most handlers want ---------------------------
    @property
    def packet_id(self) -> str:
        return self.packet.packet_id

    @property
    def user_id(self) -> str:
        return self.packet.user_id

    @property
    def cognitive_state(self) -> str:
        return self.packet.cognitive_state

    @property
    def focus_score(self) -> float | None:
        return self.packet.focus_score if self.packet.HasField("focus_score") else None

    @property
    def lease_expires_at(self) -> dt.datetime:
        """When the lease given with this delivery ends (the server's clock);
        extensions move it on, unseen here."""
        return _convert.to_datetime(self._lease_expires_at)

    @property
    def raw_signals(self) -> dict[str, Any]:
        """The raw browser signals as a dict (decoded once, on first use)."""
        if self._raw_signals is None:
            self._raw_signals = _convert.to_dict(self.packet.raw_signals)
        return self._raw_signals

    @property
    def settled(self) -> bool:
        return self._settled

    # --- outcomes -------------------------------------------------------------
    def ack(self, karma_actions: Iterable[KarmaAction] | None = None) -> bool:
        """Mark the packet processed, with the karma actions taken for it.
        Recorded in the background, batched with others. False if it was
        already settled."""
        mark = pb.MarkProcessedRequest(
            packet_id=self.packet_id,
            success=True,
            karma_actions=_convert.karma_structs(karma_actions),
        )
        return self._finish(mark)

    def fail(self, error_message: str) -> bool:
        """Mark the packet failed with ``error_message``: it is kept, with
        its error, and not delivered again (an operator may Redrive it)."""
        mark = pb.MarkProcessedRequest(
            packet_id=self.packet_id, success=False, error_message=error_message or "failed"
        )
        return self._finish(mark)

    def nack(self) -> bool:
        """Hand the packet back at once, to be delivered again (to any
        consumer); the delivery counts as one that ended unmarked."""
        return self._finish(None)

    def _take(self) -> bool:
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            return True

    def _finish(self, mark: pb.MarkProcessedRequest | None) -> bool:
        if not self._take():
            return False
        self._settle(Outcome(self.packet_id, self.lease_token, mark))
        return True

    def __repr__(self) -> str:
        return (
            f"Delivery(packet_id={self.packet_id!r}, user_id={self.user_id!r}, "
            f"attempt={self.delivery_attempt})"
        )


def settle_after_handler(delivery: Delivery, result: object, error: BaseException | None) -> None:
    """What a handler's return (or exception) means for a delivery it did
    not settle itself."""
    if delivery.settled:
        return
    if error is not None:
        delivery.fail(error_text(error))
        return
    if result is None:
        delivery.ack()
        return
    try:
        delivery.ack(result)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        # The handler returned something that is not a list of karma actions
        # (ack builds the mark before it settles, so fail still can).
        delivery.fail(f"handler returned {type(result).__name__}, not karma actions: {e}")


@dataclass
class _Held:
    delivery: Delivery
    # When the lease we last asked for ends, by time.monotonic().
    expires: float
    # After this (monotonic) the lease is no longer extended.
    give_up: float


@dataclass
class LeaseBook:
    """The deliveries in hand, for lease extension. Thread-safe."""

    lease_seconds: int
    max_lease_duration: float
    _held: dict[str, _Held] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, delivery: Delivery) -> None:
        held = _Held(
            delivery,
            delivery.received + self.lease_seconds,
            delivery.received + self.max_lease_duration,
        )
        with self._lock:
            self._held[delivery.lease_token] = held

    def remove(self, lease_token: str) -> None:
        with self._lock:
            self._held.pop(lease_token, None)

    def remove_generation_before(self, generation: int) -> None:
        with self._lock:
            for token in [t for t, h in self._held.items() if h.delivery.generation < generation]:
                del self._held[token]

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def _margin(self) -> float:
        # Extend when a third of the lease is left: room for a slow
        # ExtendLease call and a missed tick.
        return max(self.lease_seconds / 3.0, 0.3)

    def next_due(self, now: float) -> float:
        """Seconds until the first lease should be extended."""
        with self._lock:
            if not self._held:
                return self.lease_seconds / 3.0
            first = min(h.expires for h in self._held.values())
        return max(first - self._margin() - now, 0.0)

    def due(self, now: float) -> list[str]:
        """The lease tokens to extend now. Deliveries held longer than
        max_lease_duration are dropped (their leases will run out)."""
        # Extend those due within the next half-margin too: fewer calls.
        horizon = now + self._margin() * 1.5
        tokens = []
        with self._lock:
            for token, held in list(self._held.items()):
                if held.expires > horizon:
                    continue
                if now + self.lease_seconds > held.give_up:
                    log.warning(
                        "packet %s held past max_lease_duration (%.0f s): its lease "
                        "is no longer extended",
                        held.delivery.packet_id,
                        self.max_lease_duration,
                    )
                    del self._held[token]
                    continue
                tokens.append(token)
        return tokens

    def extended(self, tokens: Iterable[str], asked_at: float) -> None:
        with self._lock:
            for token in tokens:
                held = self._held.get(token)
                if held is not None:
                    held.expires = asked_at + self.lease_seconds


class Backoff:
    """Exponential backoff with jitter: each wait is random between half the
    cap and the cap, the cap doubling from ``initial`` up to ``maximum``, so
    consumers that lost the same bucket do not all come back in the same
    instant."""

    def __init__(self, initial: float = 0.1, maximum: float = 10.0, multiplier: float = 2.0):
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._cap = initial

    def next(self) -> float:
        delay = random.uniform(self._cap / 2.0, self._cap)
        self._cap = min(self._cap * self.multiplier, self.maximum)
        return delay

    def reset(self) -> None:
        self._cap = self.initial


def stream_request(consumer: str, flow_control: FlowControl) -> pb.StreamPendingRequest:
    return pb.StreamPendingRequest(
        consumer=consumer,
        max_in_flight=flow_control.max_in_flight,
        lease_seconds=flow_control.lease_seconds,
    )


def split_outcomes(
    outcomes: Iterable[Outcome],
) -> tuple[list[Outcome], list[Outcome]]:
    marks: list[Outcome] = []
    nacks: list[Outcome] = []
    for outcome in outcomes:
        (marks if outcome.mark is not None else nacks).append(outcome)
    return marks, nacks
