"""`opentrack replay`: re-process a range of the raw stream while the stack runs.

Everything goes through Kafka and the running processes, never around them: raw opens in
the range are sent to ``opens.replay`` for the worker that owns each email (the embedded
warehouse stays owned by the loader). There the worker applies a load it does not know (a
rebuild), re-applies the current rules with ``--reclassify`` (only verdicts that change
change the state), and with ``--into warehouse`` emits every load and state again, which the
warehouse's ReplacingMergeTrees absorb. Sends and engagement in the range are re-published
to their own topics for the warehouse. So replaying any range any number of times changes
no count, unless the rules changed.

A range that Kafka no longer holds (its log start moved past it) is refused with exit code
3: a replay is never silently partial.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentrack.events import (
    TOPIC_EMAIL_STATE,
    TOPIC_ENGAGEMENT,
    TOPIC_OPENS_PROCESSED,
    TOPIC_OPENS_RAW,
    TOPIC_OPENS_REPLAY,
    TOPIC_SENDS,
    RawOpen,
    ReplayedOpen,
    new_event_id,
)
from opentrack.settings import Settings

STREAMS_GROUP = "opentrack-streams"
LOADER_GROUP = "opentrack-warehouse"
EXIT_NOT_RETAINED = 3


class NotRetained(RuntimeError):
    """The requested range starts before what Kafka still holds."""


@dataclass(frozen=True)
class Range:
    topic: str
    partition: int
    start: int
    end: int  # exclusive

    @property
    def count(self) -> int:
        return max(0, self.end - self.start)


@dataclass
class Summary:
    ranges: list[Range]
    read: int = 0
    published: int = 0
    changed_states: int = 0
    changed_rows: int = 0
    reclassified: int = 0
    seconds: float = 0.0
    caught_up: bool = True
    emails: set[str] = field(default_factory=set)


def topics_for(into: str) -> list[str]:
    if into == "state":
        return [TOPIC_OPENS_RAW]
    return [TOPIC_OPENS_RAW, TOPIC_SENDS, TOPIC_ENGAGEMENT]


def parse_offsets(text: str) -> dict[int, int]:
    """``P:O,P:O`` → {partition: offset}."""
    offsets = {}
    for part in text.split(","):
        p, sep, o = part.strip().partition(":")
        if not sep or not p.isdigit() or not o.isdigit():
            raise ValueError(f"{part!r}: expected PARTITION:OFFSET, for example 0:1200")
        offsets[int(p)] = int(o)
    return offsets


def plan(
    consumer: Any,
    topics: list[str],
    *,
    from_time: int | None = None,
    from_offsets: dict[int, int] | None = None,
    to_time: int | None = None,
) -> list[Range]:
    """The offset ranges to re-process; raises NotRetained for a range Kafka lost."""
    from kafka import TopicPartition

    ranges = []
    for topic in topics:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        first = consumer.beginning_offsets(tps)
        last = consumer.end_offsets(tps)
        if from_time is not None:
            found = consumer.offsets_for_times({tp: from_time for tp in tps})
            starts = {tp: found[tp].offset if found[tp] else last[tp] for tp in tps}
        elif from_offsets is not None and topic == TOPIC_OPENS_RAW:
            starts = {tp: from_offsets.get(tp.partition, last[tp]) for tp in tps}
        elif from_offsets is not None:
            continue  # offsets name positions in opens.raw only
        else:
            starts = {tp: 0 for tp in tps}
        ends = dict(last)
        if to_time is not None:
            found = consumer.offsets_for_times({tp: to_time for tp in tps})
            ends = {tp: found[tp].offset if found[tp] else last[tp] for tp in tps}
        for tp in tps:
            if starts[tp] < first[tp] and starts[tp] < ends[tp]:
                raise NotRetained(
                    f"{topic}[{tp.partition}] starts at offset {first[tp]} now; offsets from "
                    f"{starts[tp]} are no longer retained. Replay from offset {first[tp]} "
                    "or later (see the retention settings in the README)."
                )
            if from_time is not None and first[tp] > 0 and starts[tp] == first[tp]:
                earliest = _timestamp_at(consumer, tp, first[tp])
                if earliest is not None and earliest > from_time:
                    raise NotRetained(
                        f"{topic}[{tp.partition}]: the oldest record kept is from "
                        f"{earliest} ms, after the requested --from-time {from_time} ms"
                    )
            ranges.append(Range(topic, tp.partition, starts[tp], max(starts[tp], ends[tp])))
    return ranges


def _timestamp_at(consumer: Any, tp: Any, offset: int) -> int | None:
    consumer.assign([tp])
    consumer.seek(tp, offset)
    for records in consumer.poll(timeout_ms=5000, max_records=1).values():
        for record in records:
            return record.timestamp
    return None


def read_range(consumer: Any, r: Range) -> Iterator[Any]:
    from kafka import TopicPartition

    tp = TopicPartition(r.topic, r.partition)
    consumer.assign([tp])
    consumer.seek(tp, r.start)
    position = r.start
    while position < r.end:
        batches = consumer.poll(timeout_ms=1000, max_records=5000)
        for record in batches.get(tp, []):
            if record.offset >= r.end:
                return
            position = record.offset + 1
            yield record
        if not batches and consumer.position(tp) >= r.end:
            return


class Progress:
    """A bar with events/s and ETA on a terminal; plain lines every 10% otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self._next = total, label, 0, 0.1
        self.started = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="ev", unit_scale=True, desc=label)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.total and self.done / self.total >= self._next:
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} events, {rate:.0f} events/s",
                  file=sys.stderr, flush=True)
            self._next += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def group_lag(admin: Any, consumer: Any, group: str, topics: list[str]) -> int:
    """Messages of ``topics`` the consumer group has not committed yet."""
    from kafka import TopicPartition

    committed = admin.list_group_offsets(group).get(group, {})
    tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
    ends = consumer.end_offsets(tps)
    lag = 0
    for tp in tps:
        meta = committed.get(tp)
        lag += ends[tp] - (meta.offset if meta is not None and meta.offset >= 0 else 0)
    return lag


def wait_caught_up(settings: Settings, into: str, timeout: float) -> bool:
    """Until the worker has read every replay request and the loader every output."""
    from kafka import KafkaAdminClient, KafkaConsumer

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            lag = group_lag(admin, consumer, STREAMS_GROUP, [TOPIC_OPENS_REPLAY])
            lag += group_lag(admin, consumer, LOADER_GROUP, [
                TOPIC_OPENS_PROCESSED, TOPIC_EMAIL_STATE, TOPIC_SENDS, TOPIC_ENGAGEMENT])
            if lag == 0:
                return True
            time.sleep(0.5)
        return False
    finally:
        admin.close()
        consumer.close()


def snapshot(engine: Any, email_ids: set[str]) -> tuple[dict, dict]:
    """(email → state revision, event → (class, counted)) of the warehouse, for a diff."""
    ids = sorted(email_ids)
    states: dict[str, int] = {}
    opens: dict[str, tuple[str, int]] = {}
    for i in range(0, len(ids), 2000):
        chunk = {"ids": tuple(ids[i:i + 2000])}
        for r in engine.query("SELECT email_id, revision FROM email_state FINAL "
                              "WHERE email_id IN %(ids)s", chunk):
            states[r["email_id"]] = r["revision"]
        for r in engine.query("SELECT event_id, load_class, counted FROM opens FINAL "
                              "WHERE email_id IN %(ids)s", chunk):
            opens[r["event_id"]] = (r["load_class"], r["counted"])
    return states, opens


def replay(
    settings: Settings,
    ranges: list[Range],
    *,
    into: str,
    reclassify: bool,
    engine: Any = None,
    wait_timeout: float = 600.0,
) -> Summary:
    from kafka import KafkaConsumer, KafkaProducer

    started = time.monotonic()
    summary = Summary(ranges)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=20,
                             batch_size=512 * 1024, enable_idempotence=True)
    replay_id = new_event_id()
    emit = into in ("warehouse", "all")
    raw_ranges = [r for r in ranges if r.topic == TOPIC_OPENS_RAW]
    for r in raw_ranges:  # which emails the replay touches, for the before/after diff
        summary.emails.update(rec.key.decode() for rec in read_range(consumer, r) if rec.key)
    before = snapshot(engine, summary.emails) if engine is not None else None
    progress = Progress(sum(r.count for r in ranges), "replay")
    try:
        for r in ranges:
            for record in read_range(consumer, r):
                summary.read += 1
                progress.update()
                if record.value is None:
                    continue
                if r.topic == TOPIC_OPENS_RAW:
                    raw = RawOpen.from_bytes(record.value)
                    request = ReplayedOpen(replay_id, raw.email_id, raw.to_dict(),
                                           reclassify=reclassify, emit=emit)
                    producer.send(TOPIC_OPENS_REPLAY, key=record.key, value=request.to_bytes())
                else:  # sends and engagement: again on their own topic, for the warehouse
                    producer.send(r.topic, key=record.key, value=record.value)
                summary.published += 1
        producer.flush()
    finally:
        progress.close()
        producer.close()
        consumer.close()
    summary.caught_up = wait_caught_up(settings, into, wait_timeout)
    if before is not None:
        time.sleep(1.0)  # the loader's last commit follows its last write
        after = snapshot(engine, summary.emails)
        summary.changed_states = sum(
            1 for e, rev in after[0].items() if before[0].get(e) != rev)
        summary.changed_rows = sum(1 for k, v in after[1].items() if before[1].get(k) != v)
        summary.reclassified = sum(
            1 for k, v in after[1].items() if k in before[1] and before[1][k][0] != v[0])
    summary.seconds = time.monotonic() - started
    return summary


def describe(ranges: list[Range]) -> str:
    lines = [f"{'topic':<16}{'partition':>10}{'from':>12}{'to':>12}{'events':>10}"]
    for r in ranges:
        lines.append(f"{r.topic:<16}{r.partition:>10}{r.start:>12}{r.end:>12}{r.count:>10}")
    lines.append(f"{'total':<50}{sum(r.count for r in ranges):>10}")
    return "\n".join(lines)
