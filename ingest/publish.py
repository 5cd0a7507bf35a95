"""Hand events to Kafka without ever waiting on it, and without losing one when it is away.

Every event is first appended to a write-ahead spool file under the data dir (a buffered
write, no fsync: it survives the web process being killed, not the machine losing power)
and then handed to the Kafka producer. A spool segment is deleted once Kafka acknowledged
every event in it (acks=all, idempotent producer). A segment with a failed or unknown
delivery - the broker was down, the process died - is sent again, whole, by a background
thread once the broker answers; events keep their ``event_id``, so the stream processors
drop any copy that had already arrived. Per-email order does not matter downstream: the
dedup is computed on event time, whatever the arrival order.

One ``Publisher`` per process (``opentrack.per_process``), created after the server forks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ingest.metrics import PUBLISH_ERRORS, PUBLISH_SECONDS, SPOOL_BYTES, SPOOL_FULL, SPOOL_SEGMENTS
from opentrack.events import (
    TOPIC_ENGAGEMENT,
    TOPIC_OPENS_RAW,
    TOPIC_PROFILES,
    TOPIC_SENDS,
    Event,
)

log = logging.getLogger(__name__)

SEGMENT_EVENTS = 5000
SEGMENT_SECONDS = 2.0


@dataclass
class Segment:
    path: Path
    file: IO[str]
    events: int = 0
    acked: int = 0
    failed: bool = False
    closed: bool = False
    opened_at: float = field(default_factory=time.monotonic)


WARM_TOPICS = (TOPIC_OPENS_RAW, TOPIC_SENDS, TOPIC_ENGAGEMENT, TOPIC_PROFILES)


def _warm_metadata(producer: Any, topics: tuple[str, ...], timeout: float = 10.0) -> None:
    """Fetch the topics' metadata before the request path uses the producer: with its short
    max_block_ms, a cold producer would fail (and spool) the first sends."""
    deadline = time.monotonic() + timeout
    for topic in topics:
        while time.monotonic() < deadline:
            try:
                producer.partitions_for(topic)
                break
            except Exception:  # KafkaTimeoutError: the request is on its way, ask again
                time.sleep(0.05)


class Publisher:
    def __init__(
        self,
        bootstrap: Callable[[], str],
        spool_dir: Path,
        max_spool_bytes: int = 1 << 30,
        max_block_ms: int = 5,
    ) -> None:
        self._bootstrap = bootstrap
        self.spool_dir = Path(spool_dir)
        self.max_spool_bytes = max_spool_bytes
        self.max_block_ms = max_block_ms
        self._lock = threading.Lock()
        self._producer: Any = None  # the request path's: never blocks past max_block_ms
        self._resender: Any = None  # the spool thread's: may wait for metadata and acks
        # Set when a delivery failed: kafka-python's idempotent producer does not recover its
        # sequence numbers after expired batches, so the spool thread replaces it.
        self._producer_broken = False
        self._segment: Segment | None = None
        self._open_segments: list[Segment] = []
        self._stop = threading.Event()
        self._pid = os.getpid()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="opentrack-spool", daemon=True)
        self._thread.start()

    # -- the request path ---------------------------------------------------------------
    def publish(self, event: Event) -> None:
        """Spool the event and hand it to the producer; never blocks longer than a file write
        and ``max_block_ms``."""
        self.publish_record(event.topic, event.key, event.to_bytes())

    def publish_tombstone(self, topic: str, key: str) -> None:
        """A null value: on a compacted topic, compaction then removes the key for good."""
        self.publish_record(topic, key, None)

    def publish_record(self, topic: str, key: str, value: bytes | None) -> None:
        started = time.perf_counter()
        line = json.dumps({"t": topic, "k": key, "v": value.decode() if value else None})
        with self._lock:
            segment = self._writable_segment()
            if segment is not None:
                segment.file.write(line + "\n")
                segment.file.flush()
                segment.events += 1
            producer = self._producer
        try:
            self._hand_over(producer, segment, topic, key.encode(), value)
        finally:
            PUBLISH_SECONDS.observe(time.perf_counter() - started)

    def _hand_over(
        self, producer: Any, segment: Segment | None, topic: str, key: bytes, value: bytes | None
    ) -> None:
        if producer is None:  # not connected yet: the spool thread delivers it
            if segment is not None:
                segment.failed = True
            return
        try:
            future = producer.send(topic, key=key, value=value)
        except Exception as exc:  # broker unreachable, buffer full: the spool has it
            PUBLISH_ERRORS.labels(stage="send").inc()
            log.debug("producer.send failed, event stays spooled: %s", exc)
            if segment is not None:
                segment.failed = True
            return
        if segment is not None:
            future.add_callback(self._acked, segment)
            future.add_errback(self._failed, segment)

    def _writable_segment(self) -> Segment | None:
        seg = self._segment
        if seg is not None and (
            seg.events >= SEGMENT_EVENTS or time.monotonic() - seg.opened_at > SEGMENT_SECONDS
        ):
            self._close_segment(seg)
            seg = None
        if seg is None:
            if self.spool_bytes() > self.max_spool_bytes:
                SPOOL_FULL.inc()
                log.error(
                    "spool is full (%d bytes > OPENTRACK_SPOOL_MAX_BYTES): events are sent "
                    "without a spool copy until Kafka drains it", self.spool_bytes(),
                )
                return None
            path = self.spool_dir / f"{self._pid}-{time.time_ns()}.jsonl"
            file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while this process lives
            seg = self._segment = Segment(path, file)
            self._open_segments.append(seg)
        return seg

    def _close_segment(self, seg: Segment) -> None:
        seg.closed = True
        if self._segment is seg:
            self._segment = None
        self._maybe_delete(seg)

    def _acked(self, segment: Segment, _metadata: Any) -> None:
        with self._lock:
            segment.acked += 1
            self._maybe_delete(segment)

    def _failed(self, segment: Segment, exc: Exception) -> None:
        PUBLISH_ERRORS.labels(stage="delivery").inc()
        log.warning("delivery to Kafka failed, the spool keeps the event: %s", exc)
        segment.failed = True
        self._producer_broken = True

    def _maybe_delete(self, seg: Segment) -> None:
        if seg.closed and not seg.failed and seg.acked >= seg.events:
            seg.file.close()
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
            if seg in self._open_segments:
                self._open_segments.remove(seg)

    # -- the background thread ------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._tick()
            except Exception:  # keep the thread alive whatever happens
                log.exception("spool thread error")

    def _tick(self) -> None:
        if self._producer_broken:
            self._producer_broken = False
            old_producers = (self._producer, self._resender)
            with self._lock:
                self._producer = None
                # what the old producer had not acknowledged will never be: send it again
                for seg in self._open_segments:
                    if seg.acked < seg.events:
                        seg.failed = True
                if self._segment is not None:
                    self._close_segment(self._segment)
            for old in old_producers:
                if old is not None:
                    with contextlib.suppress(Exception):
                        old.close(timeout=0)
            self._resender = None
        if self._resender is None:
            self._resender = self._connect(max_block_ms=10_000)
            if self._resender is None:
                return
            producer = self._connect(max_block_ms=self.max_block_ms)
            if producer is not None:
                _warm_metadata(producer, WARM_TOPICS)
            self._producer = producer
        with self._lock:
            seg = self._segment
            if seg is not None and time.monotonic() - seg.opened_at > SEGMENT_SECONDS:
                self._close_segment(seg)
        self._resend_failed()
        self._update_gauges()

    def _connect(self, max_block_ms: int) -> Any:
        from kafka import KafkaProducer

        try:
            return KafkaProducer(
                bootstrap_servers=self._bootstrap(),
                acks="all",
                enable_idempotence=True,
                max_block_ms=max_block_ms,
                linger_ms=2,
                compression_type=None,
                delivery_timeout_ms=30000,
                request_timeout_ms=10000,
                reconnect_backoff_max_ms=2000,
            )
        except Exception as exc:
            PUBLISH_ERRORS.labels(stage="connect").inc()
            log.warning("Kafka is not reachable yet, spooling: %s", exc)
            return None

    def _resend_failed(self) -> None:
        """Deliver failed segments of ours and segments left by dead processes, then delete."""
        with self._lock:
            mine = {seg.path for seg in self._open_segments}
            ours_failed = [s for s in self._open_segments if s.failed and s.closed]
        candidates = [s.path for s in ours_failed]
        for path in sorted(self.spool_dir.glob("*.jsonl")):
            if path not in mine:
                candidates.append(path)
        for path in candidates:
            if not self._deliver_file(path):
                return
            with self._lock:
                for seg in ours_failed:
                    if seg.path == path:
                        seg.file.close()
                        self._open_segments.remove(seg)

    def _deliver_file(self, path: Path) -> bool:
        try:
            file = open(path, encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:
            return True
        with file:
            if path.name.split("-", 1)[0] != str(self._pid):
                try:  # a live process still owns it
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
            futures = []
            try:
                for line in file:
                    if not line.endswith("\n"):
                        break  # torn last write of a killed process: never acknowledged
                    rec = json.loads(line)
                    futures.append(self._resender.send(
                        rec["t"], key=rec["k"].encode(),
                        value=rec["v"].encode() if rec["v"] is not None else None,
                    ))
                self._resender.flush(timeout=10)
                for f in futures:
                    f.get(timeout=0)
            except Exception as exc:
                log.info("spool delivery of %s paused, Kafka not available: %s", path.name, exc)
                self._producer_broken = True
                return False
            path.unlink()
            log.info("delivered %d spooled events from %s", len(futures), path.name)
            return True

    def spool_bytes(self) -> int:
        total = 0
        for path in self.spool_dir.glob("*.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def _update_gauges(self) -> None:
        SPOOL_BYTES.set(self.spool_bytes())
        SPOOL_SEGMENTS.set(len(list(self.spool_dir.glob("*.jsonl"))))

    def close(self, timeout: float = 10.0) -> None:
        """Flush the producer so that a clean shutdown leaves an empty spool where possible."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            if self._segment is not None:
                self._close_segment(self._segment)
        for producer in (self._producer, self._resender):
            if producer is None:
                continue
            with contextlib.suppress(Exception):
                producer.flush(timeout=timeout)
            with contextlib.suppress(Exception):
                producer.close(timeout=timeout)
        with self._lock:
            for seg in list(self._open_segments):
                self._maybe_delete(seg)
                with contextlib.suppress(Exception):
                    seg.file.close()
