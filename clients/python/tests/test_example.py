"""examples/python/karma_consumer.py as a real process, against the bucket
and a stand-in Karma Tracker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import REPO, Bucket, KarmaTracker, packet, wait_for

from prana_bucket import IngestClient, Receipt, pb

EXAMPLE = REPO / "examples" / "python" / "karma_consumer.py"


@pytest.fixture
def consumer(bucket: Bucket, karma: KarmaTracker) -> Iterator[subprocess.Popen[str]]:
    env = {
        **os.environ,
        "BUCKET_TARGET": bucket.target,
        "KARMA_TRACKER_URL": karma.url,
    }
    env.pop("BUCKET_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_the_seeds_consumer_on_the_package(
    bucket: Bucket, karma: KarmaTracker, consumer: subprocess.Popen[str]
) -> None:
    karma.failing.add("karma-down")
    sent = {
        "focused": packet("focused", "DEEP_FOCUS"),
        "working": packet("working", "ON_TASK"),
        "thinking": packet("thinking", "THINKING", focus_score=60.0),
        "distracted": packet("distracted", "DISTRACTED"),
        "karma-down": packet("karma-down", "ON_TASK"),
    }
    with IngestClient(bucket.target) as client:
        receipts = {user: client.ingest(p) for user, p in sent.items()}
    assert all(isinstance(r, Receipt) for r in receipts.values())
    wait_for(
        lambda: bucket.status().processed_packets == 4 and bucket.status().failed_packets == 1,
        20.0,
        "the example to mark every packet",
    )
    # The seed's Karma Tracker call and body, once per action.
    assert sorted(karma.actions, key=lambda a: a["user_id"]) == [
        {"user_id": "focused", "action": "deep_focus", "intensity": 1.0},
        {"user_id": "thinking", "action": "reflection", "intensity": 1.0},
        {"user_id": "working", "action": "completing_lessons", "intensity": 1.0},
    ]
    recorded = {user: bucket.user_packets(user)[0] for user in sent}
    assert [dict(a) for a in recorded["working"].karma_actions] == [
        {"action": "completing_lessons", "reward": 5.0, "token": "DharmaPoints"}
    ]
    assert [dict(a)["action"] for a in recorded["focused"].karma_actions] == ["deep_focus"]
    assert recorded["distracted"].processed_by_karma
    assert list(recorded["distracted"].karma_actions) == []
    # A failed Karma Tracker call is a failure mark, with the error.
    down = recorded["karma-down"]
    assert down.status == pb.PacketStatus.PACKET_STATUS_FAILED
    assert "503" in down.error_message

    # SIGTERM: a clean stop.
    consumer.send_signal(signal.SIGTERM)
    output, _ = consumer.communicate(timeout=30)
    assert consumer.returncode == 0, output
    assert "stopped" in output
    assert bucket.status().leased_packets == 0
