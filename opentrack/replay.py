"""`opentrack replay`: re-process a range of the raw stream while the stack runs.

Everything goes through Kafka and the running processes, never around them (the embedded
warehouse stays owned by the loader). Two paths:

- Through the worker (``--into state|all``, and any ``--reclassify``): raw opens in the range
  are sent to ``opens.replay`` for the worker that owns each email. There the worker applies
  a load it does not know (a rebuild), re-applies the current rules with ``--reclassify``
  (only verdicts that change change the state), and with ``--into all`` emits every load
  and state again, which the warehouse's ReplacingMergeTrees absorb. Sends and engagement in
  the range are re-published to their own topics for the warehouse. Bounded by the worker.
- A warehouse reload (``--into warehouse`` without ``--reclassify``): what the worker made
  from the range is already in Kafka (``opens.processed``, ``email_state``), beside the sends
  and the engagement, so the loader process reads those again and writes them its own way
  (``warehouse.reload``), asked over the warehouse socket. No worker, no re-publishing:
  bounded by Kafka and ClickHouse. Raw loads older than what ``opens.processed`` still keeps
  (7 days) go through the worker as above; ``email_state`` and ``emails.sent`` are compacted
  and ``engagement.raw`` and ``erasures`` are kept for ever, so they are always complete.

Either way, replaying any range any number of times changes no count, unless the rules
changed. A range that Kafka no longer holds (its log start moved past it) is refused with
exit code 3: a replay is never silently partial.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
# The worker's outputs a warehouse reload reads, besides sends and engagement.
WORKER_OUTPUTS = (TOPIC_OPENS_PROCESSED, TOPIC_EMAIL_STATE)
# Outputs are stamped when the worker made them, after the raw load, by another host's clock:
# a reload from a time starts this much earlier (re-writing a few rows more is harmless).
CLOCK_MARGIN_MS = 5 * 60 * 1000


class ReplayFailed(RuntimeError):
    """The replay could not be completed (the message says why)."""


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
    reload: dict[str, Any] | None = None  # the warehouse reload's result, when there was one


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
        if n <= 0:
            return
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


def uses_reload(into: str, reclassify: bool) -> bool:
    """A warehouse-only replay needs the worker's outputs, not the worker."""
    return into == "warehouse" and not reclassify


def replay(
    settings: Settings,
    ranges: list[Range],
    *,
    into: str,
    reclassify: bool,
    engine: Any = None,
    wait_timeout: float = 600.0,
) -> Summary:
    """Re-process ``ranges`` (from ``plan``) the fastest way that gives the same warehouse."""
    if uses_reload(into, reclassify):
        return reload_warehouse(settings, ranges, engine=engine, wait_timeout=wait_timeout)
    return through_worker(settings, ranges, into=into, reclassify=reclassify, engine=engine,
                          wait_timeout=wait_timeout)


def through_worker(
    settings: Settings,
    ranges: list[Range],
    *,
    into: str,
    reclassify: bool,
    engine: Any = None,
    wait_timeout: float = 600.0,
) -> Summary:
    """Raw opens to ``opens.replay`` for the worker; sends and engagement re-published."""
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


@dataclass
class ReloadPlan:
    """What a warehouse reload reads, and the raw loads it must leave to the worker."""

    spans: list[Range]  # the loader re-reads these (outputs, sends, engagement)
    through_worker: list[Range]  # raw loads older than what opens.processed still keeps
    since_ms: int | None  # the outputs' start time; None: from their beginning


def plan_reload(consumer: Any, raw_plan: list[Range]) -> ReloadPlan:
    """The reload of the range ``raw_plan`` covers: sends and engagement as planned, the
    worker's outputs from the range's first event (less ``CLOCK_MARGIN_MS``) up to now,
    because an event's outputs may have been made any time after it. The raw loads whose
    ``opens.processed`` records retention has deleted go through the worker instead."""
    from kafka import TopicPartition

    inputs = [r for r in raw_plan if r.count]  # raw loads, sends (their states), engagement
    spans = [r for r in inputs if r.topic in (TOPIC_SENDS, TOPIC_ENGAGEMENT)]
    tps = [TopicPartition(r.topic, r.partition) for r in inputs]
    firsts = consumer.beginning_offsets(tps) if tps else {}
    since_ms: int | None = None  # from the outputs' beginning, unless the range starts later
    if any(r.start > firsts[tp] for r, tp in zip(inputs, tps, strict=True)):
        stamps = [_timestamp_at(consumer, tp, r.start) for r, tp in zip(inputs, tps, strict=True)]
        known = [t for t in stamps if t is not None]
        since_ms = min(known) - CLOCK_MARGIN_MS if known else None
    raw = [r for r in inputs if r.topic == TOPIC_OPENS_RAW]
    raw_tps = [TopicPartition(r.topic, r.partition) for r in raw]
    kept_from = None  # when the oldest opens.processed record still kept was made
    for topic in WORKER_OUTPUTS if inputs else ():
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        firsts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        starts = dict(firsts)
        if since_ms is not None:
            found = consumer.offsets_for_times({tp: since_ms for tp in tps})
            starts = {tp: found[tp].offset if found[tp] else ends[tp] for tp in tps}
        spans += [Range(topic, tp.partition, starts[tp], ends[tp]) for tp in tps]
        if topic == TOPIC_OPENS_PROCESSED:
            deleted = [tp for tp in tps if firsts[tp] > 0]
            stamps = [_timestamp_at(consumer, tp, firsts[tp]) for tp in deleted]
            kept_from = max((t for t in stamps if t is not None), default=None)
    older: list[Range] = []
    if kept_from is not None:  # loads before it may have lost their processed records
        cut = consumer.offsets_for_times({tp: kept_from + CLOCK_MARGIN_MS for tp in raw_tps})
        for r, tp in zip(raw, raw_tps, strict=True):
            end = min(r.end, cut[tp].offset if cut[tp] else r.end)
            if end > r.start:
                older.append(Range(r.topic, r.partition, r.start, end))
    return ReloadPlan(spans, older, since_ms)


def reload_warehouse(
    settings: Settings, ranges: list[Range], *, engine: Any = None, wait_timeout: float = 600.0
) -> Summary:
    """A warehouse-only replay: the loader process re-reads the outputs of the range."""
    from kafka import KafkaConsumer

    started = time.monotonic()
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    try:
        reload_plan = plan_reload(consumer, ranges)
    finally:
        consumer.close()
    summary = Summary(reload_plan.spans + reload_plan.through_worker)
    if reload_plan.through_worker:
        print(f"{sum(r.count for r in reload_plan.through_worker)} raw loads are older than "
              f"{TOPIC_OPENS_PROCESSED} keeps: they go through the worker first",
              file=sys.stderr, flush=True)
        older = through_worker(settings, reload_plan.through_worker, into="warehouse",
                               reclassify=False, engine=engine, wait_timeout=wait_timeout)
        summary.read, summary.published = older.read, older.published
        summary.emails, summary.caught_up = older.emails, older.caught_up
        summary.changed_states, summary.changed_rows = older.changed_states, older.changed_rows
        summary.reclassified = older.reclassified
    result = request_reload(settings, reload_plan.spans, reload_plan.since_ms)
    summary.reload = result
    summary.read += result["read"]
    summary.changed_states += result["changed_states"]
    summary.changed_rows += result["changed_rows"]
    summary.reclassified += result["reclassified"]
    summary.seconds = time.monotonic() - started
    return summary


def request_reload(
    settings: Settings, spans: list[Range], since_ms: int | None, *, diff: bool = True
) -> dict[str, Any]:
    """Has the process that owns the warehouse run the reload, with a progress bar; on a
    ClickHouse server that is this process."""
    progress = Progress(sum(r.count for r in spans), "reload")
    shown = 0

    def show(read: int) -> None:
        nonlocal shown
        progress.update(read - shown)
        shown = read

    try:
        if settings.clickhouse_url:
            result = _reload_here(settings, spans, since_ms, diff, show)
        else:
            result = _reload_in_loader(settings, spans, since_ms, diff, show)
    finally:
        progress.close()
    if result.get("stopped"):
        raise ReplayFailed("the reload was stopped before it read everything")
    return result


def _reload_here(settings: Settings, spans: list[Range], since_ms: int | None, diff: bool,
                 show: Callable[[int], None]) -> dict[str, Any]:
    from warehouse.engines import ServerEngine
    from warehouse.reload import Reload, Span

    engine = ServerEngine(settings.clickhouse_url or "")
    job = Reload(engine, settings.bootstrap,
                 [Span(r.topic, r.partition, r.start, r.end) for r in spans],
                 since_ms=since_ms, diff=diff)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["done"] = job.run().to_dict()
        except Exception as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run, name="reload", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            show(job.progress()["read"])
            thread.join(0.5)
    except KeyboardInterrupt:
        job.stop()
        thread.join()
        raise
    finally:
        engine.close()
    if "error" in outcome:
        raise ReplayFailed(f"the warehouse reload failed: {outcome['error']}")
    show(outcome["done"]["read"])
    return outcome["done"]


def _reload_in_loader(settings: Settings, spans: list[Range], since_ms: int | None, diff: bool,
                      show: Callable[[int], None]) -> dict[str, Any]:
    import http.client

    from warehouse.engines import _UnixConnection

    body = json.dumps({
        "spans": [{"topic": r.topic, "partition": r.partition, "start": r.start, "end": r.end}
                  for r in spans],
        "since_ms": since_ms, "diff": diff,
    }).encode()
    # progress lines come every half second, even during a long insert
    conn = _UnixConnection(settings.warehouse_socket, timeout=120.0)
    try:
        conn.request("POST", "/reload", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise ReplayFailed(f"the loader refused the reload: {response.read().decode()}")
        for line in response:
            message = json.loads(line)
            if "progress" in message:
                show(message["progress"]["read"])
            elif "error" in message:
                raise ReplayFailed(f"the warehouse reload failed: {message['error']}")
            elif "done" in message:
                show(message["done"]["read"])
                return message["done"]
    except (OSError, http.client.HTTPException) as exc:
        raise ReplayFailed(
            f"the loader does not answer at {settings.warehouse_socket} "
            f"(is `opentrack loader` running?): {exc}") from exc
    finally:
        conn.close()
    raise ReplayFailed("the loader ended the reload without a result; see its log")


def report(summary: Summary) -> str:
    """The summary the command prints."""
    if summary.reload is None:
        head = (f"replayed {summary.read} events ({summary.published} re-published) touching "
                f"{len(summary.emails)} emails in {summary.seconds:.1f}s")
    else:
        rows = ", ".join(f"{table} {n}" for table, n in sorted(summary.reload["rows"].items()))
        head = (f"reloaded the warehouse from {summary.read} events in "
                f"{summary.seconds:.1f}s ({summary.read / max(summary.seconds, 1e-9):.0f} "
                f"events/s): rows written: {rows or 'none'}; skipped (malformed or erased): "
                f"{summary.reload['skipped']}; erasures applied again: "
                f"{summary.reload['erasures_applied']}")
        if summary.published:
            head += f"; {summary.published} older raw loads went through the worker"
        phases = summary.reload.get("phases") or {}
        head += "\nin the loader: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())
    return (f"{head}\nchanged states: {summary.changed_states}, changed open rows: "
            f"{summary.changed_rows}, loads that changed class: {summary.reclassified}")


def describe_reload(settings: Settings, ranges: list[Range]) -> str:
    """What ``--dry-run`` shows for a warehouse reload of ``ranges``."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    try:
        reload_plan = plan_reload(consumer, ranges)
    finally:
        consumer.close()
    lines = ["a warehouse reload (no worker): the loader re-reads", describe(reload_plan.spans)]
    if reload_plan.through_worker:
        lines += [f"raw loads older than {TOPIC_OPENS_PROCESSED} keeps, through the worker:",
                  describe(reload_plan.through_worker)]
    return "\n".join(lines)


def describe(ranges: list[Range]) -> str:
    lines = [f"{'topic':<16}{'partition':>10}{'from':>12}{'to':>12}{'events':>10}"]
    for r in ranges:
        lines.append(f"{r.topic:<16}{r.partition:>10}{r.start:>12}{r.end:>12}{r.count:>10}")
    lines.append(f"{'total':<50}{sum(r.count for r in ranges):>10}")
    return "\n".join(lines)
