"""Fixtures: the real bucket binary on a fresh SQLite file, and a small HTTP
server standing in for the Karma Tracker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from prana_bucket import pb
from prana_bucket._transport import Connection

REPO = Path(__file__).resolve().parents[3]
BUCKET_BIN = Path(os.environ.get("BUCKET_BIN") or REPO / "target" / "debug" / "bucket")
# The bucket reads its settings from these; the tests' own must not leak in.
_SCRUBBED = ("BUCKET_", "REDIS_", "DATABASE_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def packet(user_id: str = "user_123", state: str = "ON_TASK", **fields: Any) -> dict[str, Any]:
    """The seed's example packet (README), for one user."""
    base: dict[str, Any] = {
        "user_id": user_id,
        "session_id": "session_456",
        "lesson_id": "lesson_789",
        "system_type": "gurukul",
        "role": "student",
        "timestamp": "2024-01-20T10:30:00Z",
        "cognitive_state": state,
        "active_seconds": 4.5,
        "idle_seconds": 0.3,
        "away_seconds": 0.2,
        "focus_score": 85.0,
        "raw_signals": {"dwell_time_ms": 1200, "mouse_velocity": 0.5},
    }
    base.update(fields)
    return base


class Bucket:
    """The bucket binary on a free port and its own SQLite file; restartable
    on the same port and file."""

    def __init__(
        self,
        directory: Path,
        args: Sequence[str] = (),
        *,
        admin_token: str | None = None,
        tls_cert: bytes | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.args = list(args)
        self.admin_token = admin_token
        self.tls_cert = tls_cert
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "bucket.log"
        self.starts = 0

    @property
    def target(self) -> str:
        return f"{'localhost' if self.tls_cert else '127.0.0.1'}:{self.port}"

    def connection(self, token: str | None = None) -> Connection:
        return Connection(
            self.target,
            token=token if token is not None else self.admin_token,
            tls=self.tls_cert is not None,
            root_certificates=self.tls_cert,
        )

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        env.setdefault("RUST_LOG", "warn")
        command = [
            str(BUCKET_BIN),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--database-url",
            f"sqlite://{self.directory / 'bucket.db'}",
            # Expired leases found within 50 ms: the lease tests stay short.
            "--sweep-ms",
            "50",
            "--shutdown-grace-seconds",
            "2",
            *self.args,
        ]
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        wait_for(self._ready, 30.0, f"the bucket on port {self.port} (log: {self.log_path})")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the bucket exited: {self.log_path.read_text()}")
        try:
            self.status()
            return True
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _call(self, fn: Callable[[pb.BucketServiceStub, Any], Any]) -> Any:
        connection = self.connection()
        with connection.channel() as channel:
            return fn(pb.BucketServiceStub(channel), connection.metadata)

    def status(self) -> pb.StatusResponse:
        response: pb.StatusResponse = self._call(
            lambda stub, md: stub.Status(pb.StatusRequest(), metadata=md, timeout=2)
        )
        return response

    def user_packets(self, user_id: str) -> list[pb.Packet]:
        def page(stub: pb.BucketServiceStub, md: Any) -> list[pb.Packet]:
            out: list[pb.Packet] = []
            token = ""
            while True:
                response = stub.UserPackets(
                    pb.UserPacketsRequest(user_id=user_id, limit=500, page_token=token),
                    metadata=md,
                    timeout=5,
                )
                out.extend(response.packets)
                token = response.next_page_token
                if not token:
                    return out

        result: list[pb.Packet] = self._call(page)
        return result


@pytest.fixture
def make_bucket(tmp_path: Path) -> Iterator[Callable[..., Bucket]]:
    started: list[Bucket] = []

    def make(args: Sequence[str] = (), **kwargs: Any) -> Bucket:
        directory = tmp_path / f"bucket-{len(started)}"
        directory.mkdir()
        bucket = Bucket(directory, args, **kwargs)
        started.append(bucket)
        bucket.start()
        return bucket

    yield make
    for bucket in started:
        bucket.stop(signal.SIGKILL)


@pytest.fixture
def bucket(make_bucket: Callable[..., Bucket]) -> Bucket:
    return make_bucket()


class KarmaTracker:
    """Stands in for the Karma Tracker's HTTP API: records every
    ``POST /api/v1/karma/log-action/`` body; answers 503 for users in
    ``failing``."""

    def __init__(self) -> None:
        self.actions: list[dict[str, Any]] = []
        self.failing: set[str] = set()
        self.lock = threading.Lock()
        tracker = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                if self.path != "/api/v1/karma/log-action/":
                    self.send_response(404)
                    self.end_headers()
                    return
                if body.get("user_id") in tracker.failing:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"karma tracker down")
                    return
                with tracker.lock:
                    tracker.actions.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status": "ok"}')

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def karma() -> Iterator[KarmaTracker]:
    tracker = KarmaTracker()
    yield tracker
    tracker.close()
