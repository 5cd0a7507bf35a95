"""Hand events to Kafka without ever waiting on it, and without losing one when it is away.

Every event is first appended to a write-ahead spool segment under the data dir (a buffered
write, no fsync: it survives the web process being killed, not the machine losing power)
and then handed to the request path's Kafka producer (acks=all, idempotent). A segment is
deleted once Kafka acknowledged every event in it. A segment with a failed or unknown
delivery - the broker was down, the producer was replaced, the process died - is sent
again, whole, by a background thread once the broker answers; events keep their
``event_id``, so the stream processors drop any copy that had already arrived. Per-email
order does not matter downstream: the dedup is computed on event time, whatever the order.

Several web processes share one spool directory, so who may deliver and delete a segment
is decided by one thing only, an exclusive ``flock`` on the segment's open file, held by
the process that writes it for as long as the segment lives (never by the pid in the name:
pids are reused, and a process has several readers of its own):

- a segment enters the spool (``*.jsonl``) already locked: it is created under a name that
  nobody scans (``*.jsonl.new``), locked, then renamed. Without this, another process's
  spool thread could lock a new segment before its writer did, deliver its 0 events and
  delete it, and the writer then spooled into a deleted file;
- the owner removes a segment's name before it lets go of the lock, so a reader that takes
  the lock of a file whose name is gone (or names another file) knows it was delivered;
- any ``*.jsonl`` whose lock can be taken therefore has no live writer (it died, or shut
  down before Kafka answered): the process that takes the lock delivers and deletes it.

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

from kafka.errors import KafkaError, KafkaTimeoutError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

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
SUFFIX = ".jsonl"  # a segment others may deliver once its lock is free
STAGING_SUFFIX = ".jsonl.new"  # a segment being created: not yet locked, nobody looks at it
CORRUPT_SUFFIX = ".jsonl.corrupt"  # kept for an operator: lines that could not be read
ORPHAN_SECONDS = 60.0  # a staging file this old and unlocked was left by a killed process
TICK_SECONDS = 0.5
CONNECT_TIMEOUT_MS = 5000  # a connect attempt during an outage holds the spool thread this long
DELIVERY_TIMEOUT_MS = 30_000
RESEND_WAIT_SECONDS = 10.0
# A closed segment still waiting for acknowledgements this long after Kafka's own deadline
# lost a callback somewhere: send it again rather than keep it for ever.
STUCK_SECONDS = DELIVERY_TIMEOUT_MS / 1000 + 30.0

WARM_TOPICS = (TOPIC_OPENS_RAW, TOPIC_SENDS, TOPIC_ENGAGEMENT, TOPIC_PROFILES)

Record = tuple[str, bytes, bytes | None]


@dataclass(eq=False)
class Segment:
    """A spool file this process writes; its open ``file`` holds the lock that says so."""

    path: Path
    file: IO[str]
    events: int = 0
    acked: int = 0
    failed: bool = False
    closed: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.closed and not self.failed and self.acked >= self.events


def _warm_metadata(producer: Any, topics: tuple[str, ...], timeout: float = 10.0) -> None:
    """Fetch the topics' metadata before the request path uses the producer: with its short
    max_block_ms, a cold producer would fail (and spool) the first sends."""
    try:
        for attempt in Retrying(
            stop=stop_after_delay(timeout), wait=wait_fixed(0.05),
            retry=retry_if_exception_type(KafkaError), reraise=True,
        ):
            with attempt:  # a timeout means the metadata request is on its way: ask again
                for topic in topics:
                    producer.partitions_for(topic)
    except KafkaError as exc:
        log.info("topic metadata not ready after %.0fs, the first sends may spool: %s",
                 timeout, exc)


def _line(topic: str, key: str, value: bytes | None) -> str:
    return json.dumps({"t": topic, "k": key, "v": value.decode() if value is not None else None})


def _records(lines: list[str]) -> tuple[list[Record], int]:
    """The records of a segment's lines, and how many complete lines could not be read."""
    records: list[Record] = []
    unreadable = 0
    for line in lines:
        if not line.endswith("\n"):
            break  # torn last write of a killed process: its request never got an answer
        try:
            rec = json.loads(line)
            value = rec["v"].encode() if rec["v"] is not None else None
            records.append((rec["t"], rec["k"].encode(), value))
        except (ValueError, KeyError, TypeError, AttributeError):
            unreadable += 1
    return records, unreadable


def _names_this_file(path: Path, file: IO[str]) -> bool:
    """Whether ``path`` still names the file we hold open (else it was delivered and removed,
    or removed and replaced, after we opened it)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(file.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _try_lock(file: IO[str]) -> bool:
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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
        self._lock = threading.Lock()  # segments, the request producer, the retired list
        self._deliver_lock = threading.RLock()  # one spool pass (and resender) at a time
        self._producer: Any = None  # the request path's: never blocks past max_block_ms
        self._resender: Any = None  # the spool thread's: may wait for metadata and acks
        # Set when a delivery of the current request producer failed: kafka-python's
        # idempotent producer does not recover its sequence numbers after expired batches,
        # so the spool thread replaces it.
        self._producer_broken = False
        # Replaced producers, closed once their pending records are done: kafka-python's
        # close() flushes first and gives up, without closing, while records are pending.
        self._retired: list[Any] = []
        self._segment: Segment | None = None
        self._open_segments: list[Segment] = []
        self._closed = False
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
        line = _line(topic, key, value) + "\n"
        with self._lock:
            segment = self._writable_segment()
            if segment is not None:
                try:
                    segment.file.write(line)
                    segment.file.flush()
                except OSError as exc:  # disk full: a torn tail; no event goes after it
                    log.error("spool write failed, the event goes without a spool copy: %s", exc)
                    segment.failed = True  # its complete lines still need delivering
                    self._close_segment(segment)
                    segment = None
                else:
                    segment.events += 1
            producer = self._producer
        try:
            self._hand_over(producer, segment, topic, key.encode(), value)
        finally:
            PUBLISH_SECONDS.observe(time.perf_counter() - started)

    def _hand_over(
        self, producer: Any, segment: Segment | None, topic: str, key: bytes, value: bytes | None
    ) -> None:
        if producer is None:  # not connected (yet): the spool thread delivers it
            self._mark_failed(segment, None, None)
            return
        try:
            future = producer.send(topic, key=key, value=value)
        except Exception as exc:  # broker unreachable, buffer full: the spool has it
            PUBLISH_ERRORS.labels(stage="send").inc()
            log.debug("producer.send failed, event stays spooled: %s", exc)
            self._mark_failed(segment, None, exc)
            return
        if segment is not None:
            future.add_callback(self._acked, segment)
        future.add_errback(self._failed, segment, producer)

    def _writable_segment(self) -> Segment | None:
        """The segment to append to (lock held); None when the spool is full."""
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
            try:
                seg = self._segment = self._new_segment()
            except OSError as exc:
                log.error("no spool segment, the event goes without a spool copy: %s", exc)
                return None
            self._open_segments.append(seg)
        return seg

    def _new_segment(self) -> Segment:
        """Create a segment file, lock it, and only then give it the name readers scan."""
        for _ in range(10):
            stem = f"{self._pid}-{time.time_ns()}"
            staging = self.spool_dir / (stem + STAGING_SUFFIX)
            try:
                fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            except FileExistsError:
                continue
            file = open(fd, "a+", encoding="utf-8")  # noqa: SIM115 - kept open: the lock
            try:
                if _try_lock(file):
                    path = self.spool_dir / (stem + SUFFIX)
                    os.rename(staging, path)
                    return Segment(path, file)
            except FileNotFoundError:
                pass  # swept as an orphan before we locked it (a stall of over a minute)
            file.close()
        raise OSError(f"could not create a spool segment in {self.spool_dir}")

    def _close_segment(self, seg: Segment) -> None:
        """No event is appended after this (lock held)."""
        seg.closed = True
        seg.closed_at = time.monotonic()
        if self._segment is seg:
            self._segment = None
        self._maybe_delete(seg)

    def _acked(self, segment: Segment, _metadata: Any) -> None:
        with self._lock:
            segment.acked += 1
            self._maybe_delete(segment)

    def _failed(self, segment: Segment | None, producer: Any, exc: Exception) -> None:
        PUBLISH_ERRORS.labels(stage="delivery").inc()
        log.warning("delivery to Kafka failed, the spool keeps the event: %s", exc)
        self._mark_failed(segment, producer, exc)

    def _mark_failed(self, segment: Segment | None, producer: Any, exc: Exception | None) -> None:
        """The segment is sent again whole; a failure of the current producer replaces it."""
        with self._lock:
            if segment is not None:
                segment.failed = True
            else:
                PUBLISH_ERRORS.labels(stage="lost").inc()
                log.error("an event without a spool copy (spool full or not writable) could "
                          "not be handed to Kafka and is lost: %s", exc)
            if producer is not None and producer is self._producer:
                self._producer_broken = True

    def _maybe_delete(self, seg: Segment) -> None:
        if seg.delivered and not self._closed:
            self._remove(seg)

    def _remove(self, seg: Segment) -> None:
        """Delete a delivered segment (lock held): the name goes first, then our lock, so a
        reader that takes the lock sees the name gone and leaves it."""
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
        seg.file.close()
        if seg in self._open_segments:
            self._open_segments.remove(seg)

    # -- the background thread ------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            try:
                self._tick()
            except Exception:  # keep the thread alive whatever happens
                log.exception("spool thread error")

    def _tick(self) -> None:
        self._close_retired()
        if self._producer_broken:
            self._replace_request_producer()
        self._rotate()
        if self._ensure_resender():  # Kafka answered (one attempt a tick while it is away)
            if self._producer is None:
                producer = self._connect(max_block_ms=self.max_block_ms)
                if producer is not None:
                    _warm_metadata(producer, WARM_TOPICS)
                with self._lock:
                    self._producer = producer
            self.deliver_spool()
        self._update_gauges()

    def _replace_request_producer(self) -> None:
        """Stop using a producer that lost a delivery; whatever it has not acknowledged is
        sent again from the spool."""
        with self._lock:
            old, self._producer = self._producer, None
            self._producer_broken = False
            for seg in self._open_segments:
                if seg.acked < seg.events:
                    seg.failed = True
            if self._segment is not None:
                self._close_segment(self._segment)
            if old is not None:
                self._retired.append(old)

    def _ensure_resender(self) -> bool:
        with self._deliver_lock:
            if self._resender is None:
                self._resender = self._connect(max_block_ms=10_000)
            return self._resender is not None

    def _retire_resender(self) -> None:
        with self._lock:
            if self._resender is not None:
                self._retired.append(self._resender)
            self._resender = None

    def _close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        pending = []
        for producer in retired:
            try:
                producer.flush(timeout=0)
            except KafkaTimeoutError:  # records pending: done within delivery_timeout_ms
                pending.append(producer)
                continue
            except Exception as exc:
                log.debug("flushing a replaced producer: %s", exc)
            with contextlib.suppress(Exception):
                producer.close(timeout=0)
        with self._lock:
            self._retired.extend(pending)

    def _rotate(self) -> None:
        """Close a segment nobody wrote to for a while, so that it can be deleted; send again
        a segment whose acknowledgements never came."""
        now = time.monotonic()
        with self._lock:
            seg = self._segment
            if seg is not None and now - seg.opened_at > SEGMENT_SECONDS:
                self._close_segment(seg)
            for seg in self._open_segments:
                waiting = seg.closed and not seg.failed and seg.acked < seg.events
                if waiting and now - seg.closed_at > STUCK_SECONDS:
                    log.warning("%s: %d acknowledgements missing after %.0fs, sending it again",
                                seg.path.name, seg.events - seg.acked, STUCK_SECONDS)
                    seg.failed = True

    def _connect(self, max_block_ms: int) -> Any:
        from kafka import KafkaProducer

        try:
            return KafkaProducer(
                bootstrap_servers=self._bootstrap(),
                acks="all",
                enable_idempotence=True,
                max_block_ms=max_block_ms,
                bootstrap_timeout_ms=CONNECT_TIMEOUT_MS,
                linger_ms=2,
                compression_type=None,
                delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
                request_timeout_ms=10000,
                reconnect_backoff_max_ms=2000,
            )
        except Exception as exc:
            PUBLISH_ERRORS.labels(stage="connect").inc()
            log.warning("Kafka is not reachable yet, spooling: %s", exc)
            return None

    # -- delivering the spool -------------------------------------------------------------
    def deliver_spool(self) -> bool:
        """One pass over the spool: send again this process's failed segments, and the
        segments no live process holds (a killed or stopped predecessor's, or a sibling's),
        then delete them. False when Kafka is not reachable: the next pass tries again."""
        with self._deliver_lock:
            if not self._ensure_resender():
                return False
            with self._lock:
                ours = [s for s in self._open_segments if s.failed and s.closed]
                our_names = {s.path.name for s in self._open_segments}
            for seg in ours:
                if not self._deliver_ours(seg):
                    return False
            for path in sorted(self.spool_dir.glob("*" + SUFFIX)):
                # Our names are skipped to save a look; our segments made after that list
                # was taken are safe anyway: our own lock refuses us too.
                if path.name not in our_names and not self._deliver_unowned(path):
                    return False
            for path in self.spool_dir.glob("*" + STAGING_SUFFIX):
                self._sweep_orphan(path)
            return True

    def _deliver_ours(self, seg: Segment) -> bool:
        """A closed failed segment of ours, read back through the file we hold locked."""
        seg.file.seek(0)
        records, unreadable = _records(seg.file.readlines())
        if not self._send(records, seg.path.name):
            return False
        with self._lock:
            if self._closed:  # shut down meanwhile: the lock is gone, others may deliver it
                return False
            if unreadable:
                self._keep_corrupt(seg.path, unreadable)
            self._remove(seg)
        log.info("delivered %d spooled events from %s", len(records), seg.path.name)
        return True

    def _deliver_unowned(self, path: Path) -> bool:
        """A segment of another process: delivered only if its lock is free (no live writer)
        and its name still names the file we locked (nobody delivered it meanwhile)."""
        try:
            file = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, lock with it
        except FileNotFoundError:
            return True
        with file:
            if not _try_lock(file) or not _names_this_file(path, file):
                return True  # a live process writes or delivers it, or it is gone
            records, unreadable = _records(file.readlines())
            if not self._send(records, path.name):
                return False
            if unreadable:
                self._keep_corrupt(path, unreadable)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # before the lock goes, with the file's close
        log.info("delivered %d spooled events from %s", len(records), path.name)
        return True

    def _send(self, records: list[Record], name: str) -> bool:
        """Send and wait for every acknowledgement; on any failure the segment stays."""
        resender = self._resender
        try:
            futures = [resender.send(t, key=k, value=v) for t, k, v in records]
            resender.flush(timeout=RESEND_WAIT_SECONDS)
            for future in futures:
                future.get(timeout=0)
        except Exception as exc:
            PUBLISH_ERRORS.labels(stage="resend").inc()
            log.info("spool delivery of %s paused, Kafka not available: %s", name, exc)
            self._retire_resender()  # idempotent producer after a failure: a new one
            return False
        return True

    def _keep_corrupt(self, path: Path, unreadable: int) -> None:
        """Keep a segment with unreadable lines aside for an operator instead of deleting it
        or retrying it for ever; its readable lines were delivered."""
        target = path.with_name(path.name[: -len(SUFFIX)] + CORRUPT_SUFFIX)
        log.error("%s: %d unreadable lines, kept as %s", path.name, unreadable, target.name)
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.link(path, target)

    def _sweep_orphan(self, path: Path) -> None:
        """Delete a staging file left by a process killed between creating and naming a
        segment (it never holds events: they are written after the rename)."""
        try:
            if time.time() - path.stat().st_mtime < ORPHAN_SECONDS:
                return
            file = open(path, encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:
            return
        with file:
            if _try_lock(file) and _names_this_file(path, file):
                path.unlink()

    def spool_bytes(self) -> int:
        total = 0
        for path in self.spool_dir.glob("*" + SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def _update_gauges(self) -> None:
        SPOOL_BYTES.set(self.spool_bytes())
        SPOOL_SEGMENTS.set(len(list(self.spool_dir.glob("*" + SUFFIX))))

    def close(self, timeout: float = 10.0) -> None:
        """Flush the producers so that a clean shutdown leaves an empty spool where possible;
        what Kafka has not acknowledged stays spooled, unlocked, for the next process."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            if self._segment is not None:
                self._close_segment(self._segment)
            producers = [self._producer, self._resender, *self._retired]
        for producer in producers:
            if producer is None:
                continue
            with contextlib.suppress(Exception):
                producer.flush(timeout=timeout)
            with contextlib.suppress(Exception):
                producer.close(timeout=timeout)
        with self._lock:
            for seg in list(self._open_segments):
                if seg.delivered:
                    self._remove(seg)
                else:
                    seg.file.close()  # the lock goes: whoever takes it next delivers it
            self._open_segments.clear()
            self._closed = True  # late callbacks must not delete what others may deliver
