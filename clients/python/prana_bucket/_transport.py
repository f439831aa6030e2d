"""How the clients reach the bucket: one place that makes blocking and
grpc.aio channels from a target, a token and TLS settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

# Keepalive pings find a connection whose peer vanished (a bucket host that
# died without closing it) in seconds instead of waiting for TCP to give up;
# the bucket allows pings every 30 s and answers within its keepalive timeout.
_DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # A reconnect after the bucket restarts should not wait out gRPC's
    # default 1 s..120 s connection backoff; the consumer has its own.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


@dataclass(frozen=True)
class Connection:
    """Where the bucket is and how to talk to it.

    ``target`` is ``host:port``; ``https://host:port`` turns TLS on and
    ``http://host:port`` is plaintext. ``token`` is sent as ``authorization:
    Bearer <token>`` on every call. With ``tls`` the server's certificate is
    checked against ``root_certificates`` (PEM), or the system's roots when
    none are given; ``server_name`` overrides the name checked.
    """

    target: str
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    server_name: str | None = None
    options: Sequence[tuple[str, Any]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        target = self.target
        if target.startswith("https://"):
            object.__setattr__(self, "tls", True)
            target = target.removeprefix("https://")
        elif target.startswith("http://"):
            target = target.removeprefix("http://")
        object.__setattr__(self, "target", target.rstrip("/"))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    def _options(self) -> list[tuple[str, Any]]:
        options = dict(_DEFAULT_OPTIONS)
        options.update(dict(self.options))
        if self.server_name:
            options["grpc.ssl_target_name_override"] = self.server_name
        return list(options.items())

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def channel(self) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(self.target, self._credentials(), options=self._options())
        return grpc.insecure_channel(self.target, options=self._options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(
                self.target, self._credentials(), options=self._options()
            )
        return grpc.aio.insecure_channel(self.target, options=self._options())
