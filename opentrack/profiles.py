"""Tracking switches per sender profile, followed from the compacted ``profiles.settings``.

Both the web (is tracking on now, for a new send?) and the stream workers (was it on when
this load arrived?) need them; each process follows the small topic from the beginning in
a background thread and keeps every switch it saw, so that decisions on a load use the load's
own time and come out the same when the stream is processed again.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable

from opentrack.events import TOPIC_PROFILES, ProfileTracking

log = logging.getLogger(__name__)


class ProfileSwitches:
    def __init__(self) -> None:
        self._history: dict[str, list[tuple[int, bool]]] = {}
        self._lock = threading.Lock()
        # Wall-clock ms of the last poll that found nothing new: every switch published
        # before then is known. A load newer than that waits for the follower (worker).
        self.known_until = 0

    def apply(self, event: ProfileTracking) -> None:
        with self._lock:
            history = self._history.setdefault(event.profile_id, [])
            entry = (event.at, event.enabled)
            if entry not in history:
                bisect.insort(history, entry)

    def enabled_at(self, profile_id: str | None, at_ms: int) -> bool:
        """Tracking as it was at ``at_ms``: the last switch at or before then; on by default."""
        if profile_id is None:
            return True
        with self._lock:
            history = self._history.get(profile_id)
            if not history:
                return True
            i = bisect.bisect_right(history, (at_ms, True))
            return history[i - 1][1] if i else True

    def enabled_now(self, profile_id: str) -> bool:
        with self._lock:
            history = self._history.get(profile_id)
            return history[-1][1] if history else True


class ProfileFollower:
    """Follows the topic in a daemon thread; ``wait_caught_up`` blocks until the switches
    that existed at start are all known (a worker must not decide before that)."""

    def __init__(self, bootstrap: Callable[[], str], switches: ProfileSwitches | None = None):
        self.switches = switches or ProfileSwitches()
        self._bootstrap = bootstrap
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profile-follower", daemon=True)
        self._thread.start()

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        return self._caught_up.wait(timeout)

    def _run(self) -> None:
        while True:
            try:
                self._follow()
            except Exception as exc:  # broker away: keep the switches, try again
                log.warning("following %s failed, retrying: %s", TOPIC_PROFILES, exc)
                time.sleep(2)

    def _follow(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self._bootstrap(), enable_auto_commit=False,
                                 group_id=None)
        try:
            partitions = consumer.partitions_for_topic(TOPIC_PROFILES) or set()
            tps = [TopicPartition(TOPIC_PROFILES, p) for p in partitions]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps) if tps else {}
            while True:
                polled_at = time.time_ns() // 1_000_000
                batches = consumer.poll(timeout_ms=50)
                if not batches and self._caught_up.is_set():
                    self.switches.known_until = polled_at - 50  # produce-to-broker margin
                for records in batches.values():
                    for record in records:
                        try:
                            self.switches.apply(ProfileTracking.from_bytes(record.value))
                        except (ValueError, TypeError, KeyError):
                            log.warning("skipping malformed profile setting at %s", record.offset)
                if not self._caught_up.is_set() and all(
                    consumer.position(tp) >= offset for tp, offset in end.items()
                ):
                    self._caught_up.set()
        finally:
            consumer.close()
