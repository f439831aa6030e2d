"""The Karma Tracker's consumer (the seed's ``Karma Tracker/utils/bucket_consumer.py``)
on the prana-bucket package.

The seed polled ``packets/pending?limit=10`` every 5 s and marked packets
one by one; this subscribes to the bucket's pending stream instead, so a
packet arrives as soon as it is stored, and its outcome is recorded in the
background with others. What it does per packet is the seed's: decide the
karma action, POST ``{"user_id", "action", "intensity": 1.0}`` to the Karma
Tracker's ``/api/v1/karma/log-action/``, and record the action as the
packet's ``karma_actions``. A Karma Tracker call that fails records the
packet as failed with the error (visible, and kept for a redrive), instead
of crashing the consumer.

Configuration (environment):
  BUCKET_TARGET      the bucket, host:port (https://host:port for TLS); default localhost:3000
  BUCKET_TOKEN       a consumer token, if the bucket wants one
  KARMA_TRACKER_URL  the Karma Tracker; default http://localhost:8000

Stops cleanly on SIGTERM or Ctrl-C: takes nothing new, finishes the packets
in hand and records their outcomes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from types import FrameType
from typing import Any

from prana_bucket import Delivery, FlowControl, Subscriber

BUCKET_TARGET = os.environ.get("BUCKET_TARGET", "localhost:3000")
BUCKET_TOKEN = os.environ.get("BUCKET_TOKEN") or None
KARMA_TRACKER_URL = os.environ.get("KARMA_TRACKER_URL", "http://localhost:8000").rstrip("/")


def determine_karma_actions(delivery: Delivery) -> list[dict[str, Any]]:
    """The seed's mapping idea: focused work earns karma, distraction none
    (the same table as examples/karma_consumer.rs)."""
    state = delivery.cognitive_state
    if state == "DEEP_FOCUS":
        return [{"action": "deep_focus", "reward": 10, "token": "DharmaPoints"}]
    if state in ("ON_TASK", "WORKING"):
        return [{"action": "completing_lessons", "reward": 5, "token": "DharmaPoints"}]
    if state == "THINKING" and (delivery.focus_score or 0.0) >= 50.0:
        return [{"action": "reflection", "reward": 2, "token": "DharmaPoints"}]
    return []  # DISTRACTED, AWAY, OFF_TASK, IDLE, FAKING, anything else


def log_action(user_id: str, action: str) -> None:
    """The seed's Karma Tracker call. Raises on anything but a 2xx answer."""
    body = json.dumps({"user_id": user_id, "action": action, "intensity": 1.0}).encode()
    request = urllib.request.Request(
        f"{KARMA_TRACKER_URL}/api/v1/karma/log-action/",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"karma tracker answered {e.code} for {action}") from e


def handle(delivery: Delivery) -> list[dict[str, Any]]:
    actions = determine_karma_actions(delivery)
    for action in actions:
        log_action(delivery.user_id, action["action"])
    logging.info(
        "processed %s user=%s state=%s attempt=%d actions=%s",
        delivery.packet_id,
        delivery.user_id,
        delivery.cognitive_state,
        delivery.delivery_attempt,
        [a["action"] for a in actions],
    )
    # Returned actions are recorded as the packet's karma_actions; an
    # exception above records a failure with its message instead.
    return actions


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    subscriber = Subscriber(BUCKET_TARGET, token=BUCKET_TOKEN)
    future = subscriber.subscribe(
        handle,
        consumer="karma-tracker",
        flow_control=FlowControl(max_in_flight=64),
        max_workers=8,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logging.info("signal %d: stopping", signum)
        future.cancel()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.info("consuming from %s for %s", BUCKET_TARGET, KARMA_TRACKER_URL)
    try:
        future.result()
    except Exception as e:
        logging.error("stopped: %s", e)
        return 1
    finally:
        subscriber.close()
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
