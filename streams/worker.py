"""The Faust worker: sends and raw opens in, processed opens and email state out.

Sends and opens share one agent so that one email's events are handled in a single
per-partition order against one table entry; the logic lives in ``streams.state``. The
agent takes events in batches: each email is read from the table once and written once per
batch, and each event's outputs wait, as bytes, for the commit of its offset.

Processing guarantee: at-least-once (Faust's default, no Kafka transactions). After a
crash, events between the last committed offset and the crash are processed again; the
table remembers every event id it has applied (its changelog is written before offsets are
committed), so a re-processed load is recognised as a replay and changes nothing. The
changelog can be ahead of the outputs (a kill between the two), so a replay emits again
what its event made, with the current revisions, which the warehouse de-duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import faust
from faust.worker import Worker

from opentrack.events import (
    TOPIC_EMAIL_STATE,
    TOPIC_OPENS_PROCESSED,
    TOPIC_OPENS_RAW,
    TOPIC_OPENS_REPLAY,
    TOPIC_SENDS,
    RawOpen,
    ReplayedOpen,
    SendRegistered,
    now_ms,
)
from opentrack.logs import logging_config
from opentrack.profiles import ProfileFollower, ProfileSwitches
from opentrack.settings import Settings
from streams import state
from streams.metrics import (
    REPLAY_RECLASSIFIED,
    WORKER_CONSUMER_LAG,
    WORKER_EVENTS,
    WORKER_LOADS,
    WORKER_PROCESSING_SECONDS,
    WORKER_SKIPPED_OFFSETS,
)

log = logging.getLogger(__name__)

# A batch of events shares one read and one write of each email, and its outputs go out
# together at the next commit. ``within`` bounds how long a batch waits to fill.
BATCH_EVENTS = 1000
BATCH_SECONDS = 0.05


def _raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    return app.topic(*names, key_serializer="raw", value_serializer="raw")


def create_worker_app(
    settings: Settings, instance: int = 0, classify: state.Classifier | None = None
) -> faust.App:
    if classify is None:
        from streams.classify_adapter import classifier_from_settings

        classify = classifier_from_settings(settings)
    window_ms = int(settings.dedup_window * 1000)
    profiles = ProfileFollower(lambda: settings.bootstrap)
    if not profiles.wait_caught_up(60):
        raise RuntimeError("could not read the profile tracking settings from Kafka in 60 s")
    tracked = profiles.switches.enabled_at
    datadir = Path(settings.data_dir) / "streams" / f"worker-{instance}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        "opentrack-streams",
        broker=[f"kafka://{hostport}" for hostport in settings.bootstrap.split(",")],
        store="rocksdb://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_acks=-1,
        # Outputs wait for this commit, so it bounds freshness (bench/freshness.py, 500
        # loads, p50 / p99): 0.25 s gave 294 / 528 and 299 / 556 ms, 0.1 s 240 / 340 ms (1 s
        # gave a p50 of 1,009 ms). The worker bench did not notice (20k loads, 3 runs:
        # median 1,111 events/s at 0.25 s, 1,341 at 0.1 s: noise).
        broker_commit_interval=0.1,
        # Outputs are published when the offsets of the events that made them are committed,
        # and Faust waits for them first. Sending them as they are made, with the producer
        # flushed before each commit, should be as safe, but a worker restarted after a
        # SIGKILL then ended an email with no loads at all in 3 runs of 3 (again on
        # 2026-12-05, after FetchWithoutLoss); the cause is not found yet.
        # Nothing is sent through Faust's attachments any more (``OutputsOnCommit`` keeps the
        # outputs), but this keeps any output Faust itself might attach on the same footing.
        stream_publish_on_commit=True,
        # a killed worker's partitions move to the others after 10 s, not Kafka's 45 s
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        # At a rebalance, finish and commit (publishing their outputs) the events already
        # taken before giving partitions up. Without it, a worker that kept a partition
        # through a rebalance was seen (2 workers, 6 partitions) never to commit it again:
        # its outputs, published at commit, stayed unsent.
        stream_wait_empty=True,
        # The agent takes events in batches and its outputs and table changes leave
        # together at each commit: let the producer gather them (bench/worker, 20k loads,
        # single runs: 2,700 events/s with Faust's 16 KiB and no linger, 3,400 with these).
        producer_max_batch_size=1024 * 1024,
        producer_linger=0.005,
    )
    ChangelogBarrier(app.producer)
    # A batch writes up to BATCH_EVENTS table changes at once; past Faust's 100 buffered
    # changes it logs a warning and holds every incoming message until the buffer drains.
    app.producer.buffer.max_messages = 2 * BATCH_EVENTS
    FetchWithoutLoss(app)
    emails = app.Table(
        "emails", key_type=str, partitions=settings.partitions, default=None,
    )
    inbound_topics = (TOPIC_SENDS, TOPIC_OPENS_RAW, TOPIC_OPENS_REPLAY)
    inbound = _raw_topic(app, *inbound_topics)

    watch = OffsetWatch(app)
    stall = StallWatch(app, watch, settings.worker_stall_seconds, inbound_topics)

    outputs = OutputsOnCommit(app)

    def handle(event: faust.types.EventT, taken: Taken, records: EmailRecords) -> None:
        """One event against its email's record; its outputs wait for its offset's commit."""
        topic = event.message.topic
        if taken is None:  # a send's tombstone: erased
            key = event.key.decode() if event.key else ""
            records.put(state.erase(key), event)
            WORKER_EVENTS.labels(topic=topic, outcome="erased").inc()
            return
        if isinstance(taken, tuple):  # a replay request and its load, keyed by the load
            request, load = taken
            record = records.get(load.email_id, event)
            outcome = state.replay_load(
                record, load, classify, window_ms, tracked,
                reclassify=request.reclassify, emit=request.emit,
            )
            REPLAY_RECLASSIFIED.inc(outcome.reclassified)
        elif isinstance(taken, SendRegistered):
            record = records.get(taken.email_id, event)
            outcome = state.apply_send(record, taken, classify, window_ms, tracked)
        else:
            record = records.get(taken.email_id, event)
            outcome = state.apply_load(record, taken, classify, window_ms, tracked)
            if not outcome.replay:
                _observe_load(taken, outcome)
        key = record.email_id
        if outcome.replay:
            WORKER_EVENTS.labels(topic=topic, outcome="replay").inc()
        elif outcome.tracking_off:
            WORKER_EVENTS.labels(topic=topic, outcome="tracking_off").inc(outcome.tracking_off)
        if not outcome.replay or outcome.reclassified:
            records.put(record, event)
        for opened in outcome.opens:
            outputs.attach(event.message, TOPIC_OPENS_PROCESSED, key, opened.to_bytes())
        if outcome.state is not None:
            outputs.attach(event.message, TOPIC_EMAIL_STATE, key, outcome.state.to_bytes())
        if outcome.parked:
            WORKER_EVENTS.labels(topic=topic, outcome="parked").inc()
        elif not outcome.tracking_off and not outcome.replay:
            WORKER_EVENTS.labels(topic=topic, outcome="applied").inc()

    @app.agent(inbound)
    async def process(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_EVENTS, within=BATCH_SECONDS):
            batch = []
            for event in events:
                watch.see(event.message)
                try:
                    batch.append((event, read_event(event.message.topic, event.value)))
                except (ValueError, TypeError, KeyError) as exc:
                    WORKER_EVENTS.labels(topic=event.message.topic, outcome="invalid").inc()
                    log.warning("skipping malformed event on %s: %s", event.message.topic, exc)
            latest = max((t.received_at for _, t in batch if isinstance(t, RawOpen)), default=0)
            await _switches_known(profiles.switches, latest)
            records = EmailRecords(emails, stream)
            try:
                for event, taken in batch:
                    handle(event, taken, records)
                records.write()
            finally:
                records.done()
            stall.see()

    @app.timer(5.0)
    async def measure_lag() -> None:
        # Both ends are unknown for a while after an assignment; a metric must never crash
        # the worker (it did: Faust stops the app when a timer raises).
        for tp in stall.partitions():
            try:
                position = await app.consumer.position(tp)
                highwater = app.consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - the consumer is between assignments
                continue
            if position is not None and highwater is not None:
                lag = max(0, highwater - position)
                WORKER_CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    @app.timer(10.0)
    async def check_stall() -> None:
        await stall.check()

    @app.task
    async def watch_loop() -> None:
        LoopWatch(asyncio.get_running_loop(), settings.worker_stall_seconds).start()

    return app


Taken = SendRegistered | RawOpen | tuple[ReplayedOpen, RawOpen] | None


def read_event(topic: str, value: bytes | None) -> Taken:
    """An inbound event as its contract defines it: a replay request with its load, parsed
    here so that a malformed one is refused before any state changes; None for a send's
    tombstone (an erasure). Raises ValueError, TypeError or KeyError for a malformed one."""
    if topic == TOPIC_SENDS:
        return None if value is None else SendRegistered.from_bytes(value)
    if topic == TOPIC_OPENS_REPLAY:
        request = ReplayedOpen.from_bytes(value or b"")
        return request, RawOpen.from_dict(request.raw)
    return RawOpen.from_bytes(value or b"")


class EmailRecords:
    """A batch's view of the emails table: each email read once and written once, so that
    an email with several events in a batch costs one changelog record.

    Faust's table reads and writes the store and changelog partition of the event being
    processed (an email's events share one partition number), which for a batch is each
    email's own event; ``done`` gives the stream back the event it had, which
    ``take_events`` reads as it fills the next batch. Reading with another event's
    partition finds nothing: the scaling test lost a quarter of its sends so."""

    def __init__(self, table: faust.types.TableT, stream: faust.StreamT) -> None:
        self.table, self.stream = table, stream
        self.own = stream.current_event
        self.records: dict[str, state.EmailRecord] = {}
        self.changed: dict[str, faust.types.EventT] = {}  # email → the last event changing it

    def get(self, key: str, event: faust.types.EventT) -> state.EmailRecord:
        record = self.records.get(key)
        if record is None:
            self.stream._set_current_event(event)  # type: ignore[attr-defined]
            record = self.records[key] = state.EmailRecord.from_dict(key, self.table.get(key))
        return record

    def put(self, record: state.EmailRecord, event: faust.types.EventT) -> None:
        self.records[record.email_id] = record
        self.changed[record.email_id] = event

    def write(self) -> None:
        for key, event in self.changed.items():
            self.stream._set_current_event(event)  # type: ignore[attr-defined]
            self.table[key] = self.records[key].to_dict()

    def done(self) -> None:
        self.stream._set_current_event(self.own)  # type: ignore[attr-defined]


class OutputsOnCommit:
    """The agent's outputs, published when the offset of the event that made them is
    committed, and before it is (Faust's ``stream_publish_on_commit``, which this extends).

    Faust's own attachments wrap every output in a channel message, a future and a heap
    entry (with the sends, about a tenth of the worker's time under py-spy); these are kept
    as bytes and handed to the producer directly.
    Until its offset's commit, an output lives only in memory: after a crash its event is
    processed again, and a replayed event says again what it made."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.pending: dict[faust.types.TP, list[tuple[int, str, bytes, bytes]]] = {}
        attachments = app._attachments  # type: ignore[attr-defined]
        faust_publish = attachments.publish_for_tp_offset

        async def publish_for_tp_offset(tp: faust.types.TP, offset: int) -> list[Any]:
            return [*await faust_publish(tp, offset), *await self.publish(tp, offset)]

        attachments.publish_for_tp_offset = publish_for_tp_offset

        @app.on_partitions_assigned.connect  # type: ignore[misc]
        async def forget_moved(app: faust.App, assigned: set[faust.types.TP], **_: Any) -> None:
            self.forget(assigned)

    def forget(self, assigned: set[faust.types.TP]) -> None:
        """Outputs of partitions now another worker's: their events' offsets were not
        committed here, so that worker processes them again and says what they made."""
        for tp in [tp for tp in self.pending if tp not in assigned]:
            del self.pending[tp]

    def attach(self, message: faust.types.Message, topic: str, key: str, value: bytes) -> None:
        self.pending.setdefault(message.tp, []).append(
            (message.offset, topic, key.encode(), value))

    async def publish(self, tp: faust.types.TP, offset: int) -> list[Any]:
        waiting = self.pending.get(tp)
        if not waiting:
            return []
        due = [entry for entry in waiting if entry[0] <= offset]
        self.pending[tp] = [entry for entry in waiting if entry[0] > offset]
        send = self.app.producer.send
        return [await send(topic, key, value, None, None, None) for _, topic, key, value in due]


def _observe_load(load: RawOpen, outcome: state.Outcome) -> None:
    for opened in outcome.opens:
        if opened.event_id == load.event_id:
            WORKER_LOADS.labels(load_class=opened.load_class,
                                counted=str(opened.counted).lower()).inc()
            WORKER_PROCESSING_SECONDS.observe(max(0.0, (now_ms() - load.received_at) / 1000))


async def _switches_known(switches: ProfileSwitches, at_ms: int, patience: float = 2.0) -> None:
    """Wait (briefly) until the tracking switches up to the load's time are known, so that a
    load that arrives just after a switch is judged by it. A load stamped in the future
    (a skewed clock) waits only for the switches up to now."""
    target = min(at_ms, now_ms())
    waited = 0.0
    while switches.known_until < target and waited < patience:
        await asyncio.sleep(0.01)
        waited += 0.01


class OffsetWatch:
    """Says when an input partition's events reach the agent with offsets missing in between.

    Within one consumer generation a partition is read in order, so a jump means events
    the worker will never see while its offsets are committed past them (or, on the
    compacted ``emails.sent``, compacted-away keys). Each generation's first offset per
    partition is logged too: with the committed offsets, it shows where reading resumed."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.last: dict[faust.types.TP, tuple[int, int]] = {}  # tp -> (generation, offset)

    def see(self, message: faust.types.Message) -> None:
        generation = self.app.consumer_generation_id
        tp, offset = message.tp, message.offset
        seen = self.last.get(tp)
        if seen is None or seen[0] != generation:
            log.info("generation %s: first event of %s-%s at offset %s",
                     generation, tp.topic, tp.partition, offset)
        elif offset > seen[1] + 1:
            WORKER_SKIPPED_OFFSETS.labels(topic=tp.topic).inc(offset - seen[1] - 1)
            log.error("generation %s: offsets %s to %s of %s-%s never reached the worker",
                      generation, seen[1] + 1, offset - 1, tp.topic, tp.partition)
        self.last[tp] = (generation, offset)


STALLED_EXIT = 75  # EX_TEMPFAIL: restart me


def _exit_now(code: int) -> None:
    """Out at once: a hung agent can hang Faust's graceful stop too."""
    logging.shutdown()
    os._exit(code)


def is_stalled(idle: float, waiting: int, busy: bool, patience: float) -> bool:
    """Events wait in Kafka, the agent has taken none for ``patience`` seconds, and no
    rebalance or table recovery (while which taking none is expected) is under way."""
    return waiting > 0 and not busy and idle >= patience


class StallWatch:
    """Exits the worker when its agent has stopped taking the events waiting for it.

    Seen once in CI (under a variant since reverted): Faust logged "Stream stopped
    processing" for 6.6 minutes while the test's loads waited, and did nothing else; the
    worker was alive, so nothing restarted it. Exiting hands the partitions to the other
    workers, and the worker is restarted (``opentrack run``; compose's restart policy),
    recovers its table from the changelog and processes again what was not committed, which
    the table recognises (at-least-once, as after a SIGKILL). Kafka itself away for longer
    than ``patience`` with events fetched-pending also ends here: the restarts then wait for
    the broker as a first start does."""

    def __init__(
        self, app: faust.App, offsets: OffsetWatch, patience: float, topics: tuple[str, ...],
        exit: Callable[[int], Any] = _exit_now,
    ) -> None:
        self.app, self.offsets, self.patience, self.exit = app, offsets, patience, exit
        self.topics = topics
        self.last_taken = time.monotonic()

    def see(self) -> None:
        self.last_taken = time.monotonic()

    def partitions(self) -> list[faust.types.TP]:
        """Our partitions of the agent's topics. Not the table's changelog, also assigned:
        the worker itself writes it, and reads it only to recover."""
        return [tp for tp in self.app.consumer.assignment() if tp.topic in self.topics]

    async def waiting(self) -> int:
        """Events in Kafka after the last one the agent took, over ``partitions()`` (a
        first version counted the changelog too, and exited an idle worker)."""
        generation = self.app.consumer_generation_id
        total = 0
        for tp in self.partitions():
            try:
                highwater = self.app.consumer.highwater(tp)
                seen = self.offsets.last.get(tp)
                if seen is not None and seen[0] == generation:
                    following = seen[1] + 1
                else:  # nothing taken in this generation yet: from where it reads
                    following = await self.app.consumer.position(tp)
            except Exception:  # noqa: BLE001 - between assignments: look again later
                continue
            if highwater is not None and following is not None:
                total += max(0, highwater - following)
        return total

    async def check(self) -> None:
        now = time.monotonic()
        busy = bool(self.app.rebalancing or getattr(self.app, "in_recovery", False))
        if busy:  # a recovery's time is not the agent's
            self.last_taken = now
        idle = now - self.last_taken
        if idle < self.patience:
            return
        waiting = await self.waiting()
        if is_stalled(idle, waiting, busy, self.patience):
            log.critical("the agent has taken no event for %.0f s while %d wait: exiting "
                         "with %d so that the worker is restarted", idle, waiting, STALLED_EXIT)
            self.exit(STALLED_EXIT)


class LoopWatch:
    """Exits the worker when its event loop has run nothing for ``patience`` seconds.

    A call that blocks the loop (a client stuck in C, a synchronous call that never
    returns) stops the agent and ``StallWatch``'s timer alike, both being on the loop: from
    a thread, this asks the loop to run a trivial callback, and exits as ``StallWatch``
    does when it is not run in time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, patience: float, every: float = 5.0,
                 exit: Callable[[int], Any] = _exit_now) -> None:
        self.loop, self.patience, self.every, self.exit = loop, patience, every, exit

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="loop-watch", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        while True:
            answered = threading.Event()
            try:
                self.loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop is closed: the worker has stopped
                return
            if not answered.wait(self.patience):
                if self.loop.is_closed():
                    return
                log.critical("the event loop has run nothing for %.0f s (a call blocks it): "
                             "exiting with %d so that the worker is restarted",
                             self.patience, STALLED_EXIT)
                self.exit(STALLED_EXIT)
                return
            time.sleep(self.every)


class FetchWithoutLoss:
    """Replaces the consumer's ``getmany`` with one that never drops a fetched record without
    moving the partition back to it.

    Faust's own throws away, without a seek, the rest of a fetched batch when the flow
    stops or the generation changes, and every record of a partition that is not active at
    that moment (while the table is restored after an assignment); Kafka's consumer has
    moved past them all the same. It counts on the seek to committed offsets at the end of
    the restore to read them again, and that seek skips a partition nobody has committed
    yet: a worker that joined second started ``opens.raw`` partitions at offsets 9 to 148,
    and those loads were lost (the two-worker scaling test). Here a record that cannot be
    handed on sends its partition back to it, so it is fetched again when the partition is
    active; what comes after it in the batch waits too, to keep the partition's order.
    Records held because a rebalance began are left to the next assignment, which starts
    every partition again from its commit."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.consumer = app.consumer
        self.consumer.getmany = self.getmany  # type: ignore[method-assign]

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        consumer = self.consumer
        records, active = await consumer._wait_next_records(timeout)  # type: ignore[attr-defined]
        if records is None or consumer.should_stop:  # type: ignore[attr-defined]
            return
        generation = self.app.consumer_generation_id
        held: dict[Any, int] = {}  # partition -> offset of its first record not handed on
        for tp, record in consumer.scheduler.iterate(records):  # type: ignore[attr-defined]
            if tp in held:
                continue
            if not (consumer.flow_active
                    and self.app.consumer_generation_id == generation
                    and (active is None or tp in active
                         or tp in consumer._buffered_partitions)):  # type: ignore[attr-defined]
                held[tp] = record.offset
                continue
            self.app.monitor.track_tp_end_offset(tp, consumer.highwater(tp))
            yield tp, consumer._to_message(tp, record)  # type: ignore[attr-defined]
        if not held:
            return
        if not consumer.flow_active or self.app.consumer_generation_id != generation:
            # A rebalance is under way: the next assignment starts every partition from its
            # commit (or its beginning), which includes what was held here. Seeking now could
            # skip records handed on but cleared from the agent's queue at the revocation.
            return
        assigned = consumer.assignment()
        for tp, offset in held.items():
            if tp in assigned:
                log.info("fetched %s-%s from offset %s while it was not active: read again",
                         tp.topic, tp.partition, offset)
                await consumer.seek(tp, offset)


class ChangelogBarrier:
    """Makes the producer flush that Faust runs before committing offsets wait for every table
    change to have reached Kafka's producer.

    Faust writes table changes to the changelog through a buffer whose flush gives up after
    100 ms without a send (a loaded event loop is often that late) and does not wait for the
    message being sent. Offsets could then be committed for events whose changelog record was
    still in memory, and a SIGKILL lost them: the table came back one load short (found by the
    SIGKILL recovery test). This counts the buffer's messages in and out; it must be installed
    before the producer starts. A flush that cannot finish raises, so that Faust stops the
    worker rather than commit past an unwritten change.
    """

    patience = 60.0

    def __init__(self, producer: faust.types.ProducerT) -> None:
        self.put = self.sent = 0
        buffer = producer.buffer
        buffer_put, send_pending, flush = buffer.put, buffer._send_pending, producer.flush

        def put(fut: faust.types.FutureMessage) -> None:
            self.put += 1
            buffer_put(fut)

        async def send(fut: faust.types.FutureMessage) -> None:
            try:
                await send_pending(fut)
            finally:
                self.sent += 1

        async def flush_all() -> None:
            target = self.put  # what was written before this commit; later writes go on
            deadline = time.monotonic() + self.patience
            while self.sent < target:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{target - self.sent} table changes not handed to Kafka's producer in "
                        f"{self.patience:.0f} s; not committing past them")
                await asyncio.sleep(0.001)
            await flush()

        buffer.put = put  # type: ignore[method-assign]
        buffer._send_pending = send  # type: ignore[method-assign]
        producer.flush = flush_all  # type: ignore[method-assign]


class QuietWorker(Worker):
    """Faust's worker without its terminal spinner, which sets the root logger to DEBUG: every
    debug call of Faust and aiokafka then builds a record that is thrown away (measured: the
    worker did 70 % more events per second without it)."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)


def run_worker(settings: Settings, instance: int = 0) -> None:
    app = create_worker_app(settings, instance)
    QuietWorker(
        app, loglevel=settings.log_level, quiet=True,
        logging_config=logging_config(settings, "worker"),
    ).execute_from_commandline()
