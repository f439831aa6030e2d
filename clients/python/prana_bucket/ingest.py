"""Sending packets: one at a time or in batches, each with a packet_id made
here (UUIDv7) before the first try, so a retry after UNAVAILABLE (the bucket
restarting, a dropped connection, an answer lost on the way back) stores the
packet once: the bucket answers a known id with the stored packet."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from prana_bucket import _convert, pb
from prana_bucket._core import Backoff
from prana_bucket._transport import Connection
from prana_bucket._uuid7 import new_packet_id
from prana_bucket.errors import BucketError, from_item_error, from_rpc_error

if TYPE_CHECKING:
    from prana_bucket._gen.bucket.v1.bucket_pb2_grpc import BucketServiceAsyncStub

#: A packet: the contract's PacketInput, or the JSON the REST bucket takes.
PacketLike = pb.PacketInput | Mapping[str, Any]


@dataclass(frozen=True)
class Receipt:
    """A stored packet: its id, when the bucket committed it, and whether
    this call stored it (False: the id was already stored)."""

    packet_id: str
    received_at: dt.datetime
    created: bool

    @classmethod
    def from_response(cls, response: pb.IngestResponse) -> Receipt:
        return cls(response.packet_id, _convert.to_datetime(response.received_at), response.created)


@dataclass(frozen=True)
class Retry:
    """How UNAVAILABLE (and a rate limit's RESOURCE_EXHAUSTED with a
    RetryInfo) is retried: ``attempts`` in all, backoff with jitter from
    ``initial`` to ``maximum`` seconds, each call with ``timeout`` seconds."""

    attempts: int = 6
    initial: float = 0.1
    maximum: float = 5.0
    timeout: float = 10.0


def _prepare(packet: PacketLike) -> pb.PacketInput:
    message = _convert.packet_input(packet)
    if not message.packet_id:
        message.packet_id = new_packet_id()
    return message


def _delay(error: BucketError, backoff: Backoff) -> float:
    wait = backoff.next()
    return max(wait, error.retry_after) if error.retry_after is not None else wait


class IngestClient:
    """Ingest with the blocking API. ``token`` is an ingest token (or an
    admin one) when the bucket requires one.

    Raises :class:`~prana_bucket.errors.BucketError` subclasses: an
    ``InvalidArgumentError`` carries every violated field."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
        retry: Retry | None = None,
    ) -> None:
        self.connection = Connection(
            target,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            server_name=server_name,
            options=tuple(options),
        )
        self.retry = retry or Retry()
        self._channel = self.connection.channel()
        self.stub = pb.BucketServiceStub(self._channel)

    def ingest(self, packet: PacketLike) -> Receipt:
        """Store one packet; its packet_id is made here when it has none."""
        request = pb.IngestRequest(packet=_prepare(packet))
        backoff = Backoff(self.retry.initial, self.retry.maximum)
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = self.stub.Ingest(
                    request, metadata=self.connection.metadata, timeout=self.retry.timeout
                )
                return Receipt.from_response(response)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if not error.retryable or attempt == self.retry.attempts:
                    raise error from None
                time.sleep(_delay(error, backoff))
        raise AssertionError("unreachable")

    def ingest_batch(self, packets: Sequence[PacketLike]) -> list[Receipt | BucketError]:
        """Store packets in one call (at most the bucket's batch limit, 500
        by default): one result per packet, in order, a Receipt or the
        item's error (returned, not raised; ``index`` set). Items refused
        with UNAVAILABLE are retried, with their ids."""
        messages = [_prepare(p) for p in packets]
        results: list[Receipt | BucketError | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        backoff = Backoff(self.retry.initial, self.retry.maximum)
        for attempt in range(1, self.retry.attempts + 1):
            request = pb.IngestBatchRequest(packets=[messages[i] for i in todo])
            last = attempt == self.retry.attempts
            try:
                response = self.stub.IngestBatch(
                    request, metadata=self.connection.metadata, timeout=self.retry.timeout
                )
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if not error.retryable or last:
                    raise error from None
                time.sleep(_delay(error, backoff))
                continue
            todo = _collect(response, todo, results, last)
            if not todo:
                break
            time.sleep(backoff.next())
        return [r for r in results if r is not None]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IngestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _collect(
    response: pb.IngestBatchResponse,
    todo: list[int],
    results: list[Receipt | BucketError | None],
    last: bool,
) -> list[int]:
    """Files a batch's answers; returns the indexes to send again."""
    again = []
    for result in response.results:
        index = todo[result.index]
        if result.HasField("ingested"):
            results[index] = Receipt.from_response(result.ingested)
            continue
        error = from_item_error(result.error, index)
        if error.retryable and not last:
            again.append(index)
        else:
            results[index] = error
    return again


class AsyncIngestClient:
    """:class:`IngestClient` on grpc.aio; the channel is made on first use."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
        retry: Retry | None = None,
    ) -> None:
        self.connection = Connection(
            target,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            server_name=server_name,
            options=tuple(options),
        )
        self.retry = retry or Retry()
        self._channel: grpc.aio.Channel | None = None
        self._stub: BucketServiceAsyncStub | None = None

    @property
    def stub(self) -> BucketServiceAsyncStub:
        if self._stub is None:
            self._channel = self.connection.aio_channel()
            self._stub = pb.BucketServiceStub(self._channel)
        return self._stub

    async def ingest(self, packet: PacketLike) -> Receipt:
        request = pb.IngestRequest(packet=_prepare(packet))
        backoff = Backoff(self.retry.initial, self.retry.maximum)
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = await self.stub.Ingest(
                    request, metadata=self.connection.metadata, timeout=self.retry.timeout
                )
                return Receipt.from_response(response)
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e)
                if not error.retryable or attempt == self.retry.attempts:
                    raise error from None
                await asyncio.sleep(_delay(error, backoff))
        raise AssertionError("unreachable")

    async def ingest_batch(self, packets: Sequence[PacketLike]) -> list[Receipt | BucketError]:
        messages = [_prepare(p) for p in packets]
        results: list[Receipt | BucketError | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        backoff = Backoff(self.retry.initial, self.retry.maximum)
        for attempt in range(1, self.retry.attempts + 1):
            request = pb.IngestBatchRequest(packets=[messages[i] for i in todo])
            last = attempt == self.retry.attempts
            try:
                response = await self.stub.IngestBatch(
                    request, metadata=self.connection.metadata, timeout=self.retry.timeout
                )
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e)
                if not error.retryable or last:
                    raise error from None
                await asyncio.sleep(_delay(error, backoff))
                continue
            todo = _collect(response, todo, results, last)
            if not todo:
                break
            await asyncio.sleep(backoff.next())
        return [r for r in results if r is not None]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncIngestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
