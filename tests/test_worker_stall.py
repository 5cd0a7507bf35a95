"""The worker's stall watchdog: when it exits, and when it must not.

The decision is a plain function; ``StallWatch`` is driven here with stand-ins for the
three things it reads from Faust (the assignment and its offsets, the rebalancing and
recovery flags). A real worker left idle past its patience must stay up (the stacks of the
tests run with a patience of ``STALL_SECONDS``); a real worker whose classifier blocks the
event loop must exit (``LoopWatch``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.types import TP
from kafka import KafkaProducer

from opentrack.events import RawOpen, SendRegistered, now_ms
from opentrack.kafka_local import LocalKafka
from opentrack.topics import ensure_topics
from streams.worker import STALLED_EXIT, LoopWatch, StallWatch, is_stalled
from tests.conftest import STALL_SECONDS
from tests.test_backbone import CHROME, load


@pytest.mark.parametrize(("idle", "waiting", "busy", "stalled"), [
    (301, 5, False, True),
    (300, 1, False, True),
    (299, 5, False, False),  # not long enough
    (900, 0, False, False),  # idle because nothing waits
    (900, 5, True, False),  # a rebalance or a table recovery
])
def test_is_stalled(idle: float, waiting: int, busy: bool, stalled: bool) -> None:
    assert is_stalled(idle, waiting, busy, patience=300) is stalled


INBOUND = ("opens.raw", "emails.sent")
CHANGELOG = TP("opentrack-streams-emails-changelog", 0)


def tp(name: str) -> TP:
    return TP("opens.raw", "ab".index(name))


class Consumer:
    """The assignment always holds the table's changelog too, read only to recover: the
    worker writes it, so its high-water mark runs ahead of the position."""

    def __init__(self, highwater: dict[str, int], position: dict[str, int]) -> None:
        self._highwater = {tp(k): v for k, v in highwater.items()} | {CHANGELOG: 500}
        self._position = {tp(k): v for k, v in position.items()} | {CHANGELOG: 20}

    def assignment(self) -> set[TP]:
        return set(self._highwater)

    def highwater(self, partition: TP) -> int:
        return self._highwater[partition]

    async def position(self, partition: TP) -> int:
        return self._position[partition]


def watch_of(app: SimpleNamespace, taken: dict[str, tuple[int, int]]) -> tuple[StallWatch, list]:
    exits: list[int] = []
    last = {tp(k): v for k, v in taken.items()}
    watch = StallWatch(app, SimpleNamespace(last=last), patience=60, topics=INBOUND,
                       exit=exits.append)
    watch.last_taken -= 61  # the agent took its last event 61 s ago
    return watch, exits


def test_exits_when_events_wait_after_the_last_one_taken() -> None:
    app = SimpleNamespace(consumer=Consumer({"a": 10, "b": 4}, {"b": 4}),
                          consumer_generation_id=3, rebalancing=False, in_recovery=False)
    watch, exits = watch_of(app, {"a": (3, 6)})  # a: offsets 7-9 wait; b: none; changelog: no
    assert asyncio.run(watch.waiting()) == 3
    asyncio.run(watch.check())
    assert exits == [STALLED_EXIT]


def test_an_older_generation_counts_from_where_the_consumer_reads() -> None:
    app = SimpleNamespace(consumer=Consumer({"a": 10}, {"a": 10}),
                          consumer_generation_id=4, rebalancing=False, in_recovery=False)
    watch, exits = watch_of(app, {"a": (3, 2)})  # taken in generation 3; now read at 10
    asyncio.run(watch.check())
    assert exits == []


@pytest.mark.parametrize("flag", ["rebalancing", "in_recovery"])
def test_no_exit_and_the_clock_restarts_during_a_rebalance_or_recovery(flag: str) -> None:
    app = SimpleNamespace(consumer=Consumer({"a": 10}, {}), consumer_generation_id=3,
                          rebalancing=False, in_recovery=False)
    setattr(app, flag, True)
    watch, exits = watch_of(app, {"a": (3, 6)})
    asyncio.run(watch.check())
    setattr(app, flag, False)
    asyncio.run(watch.check())  # idle counts again from the end of the recovery
    assert exits == []


def test_a_caught_up_idle_worker_stays() -> None:
    """Seen in CI with the first version, which counted the changelog: an idle worker with
    its inputs all taken was taken for stalled ("33 wait") and exited."""
    app = SimpleNamespace(consumer=Consumer({"a": 7}, {}), consumer_generation_id=3,
                          rebalancing=False, in_recovery=False)
    watch, exits = watch_of(app, {"a": (3, 6)})
    asyncio.run(watch.check())
    assert exits == []


def test_an_idle_worker_stays_up_past_its_patience(running_stack) -> None:
    """Traffic (which writes the table's changelog, also assigned to the worker), then
    nothing for longer than the patience and one check: the same worker takes the next load.
    The first version of the watchdog exited here."""
    worker = running_stack.stack.child("worker").process
    email_id = f"idle-{uuid.uuid4().hex[:8]}"
    url = running_stack.register(email_id)["pixel_url"]
    load(url, CHROME)
    running_stack.wait_for(email_id, lambda s: s["raw_load_count"] == 1)
    time.sleep(STALL_SECONDS + 10 + 3)  # the watch looks every 10 s
    assert worker.poll() is None, running_stack.log_tails()
    load(url, CHROME)
    running_stack.wait_for(email_id, lambda s: s["raw_load_count"] == 2)


def loop_in_thread() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


def test_loop_watch_exits_when_a_call_blocks_the_loop() -> None:
    loop = loop_in_thread()
    exits: list[int] = []
    LoopWatch(loop, patience=0.5, every=0.05, exit=exits.append).start()
    time.sleep(0.3)
    assert exits == []  # the loop answers
    loop.call_soon_threadsafe(time.sleep, 2)  # blocks it
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [STALLED_EXIT]
    loop.call_soon_threadsafe(loop.stop)


def test_loop_watch_leaves_a_closed_loop_alone() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    exits: list[int] = []
    LoopWatch(loop, patience=0.1, every=0.01, exit=exits.append).start().join(5)
    assert exits == []


# The real worker, with a classifier that never returns for one user agent (as a rules
# engine or a parser stuck in C would): the whole event loop stops with it.
HANGING_WORKER = """
import time
from opentrack.settings import Settings
from streams.classify_adapter import classifier_from_settings
from streams.worker import QuietWorker, create_worker_app

settings = Settings.from_env()
real = classifier_from_settings(settings)

def classify(raw, sent_at):
    if raw.user_agent == "hang-me":
        time.sleep(3600)
    return real(raw, sent_at)

app = create_worker_app(settings, classify=classify)
QuietWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()
"""


@pytest.mark.timeout(240)
def test_a_worker_whose_loop_is_blocked_exits_to_be_restarted(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka", partitions=4).start()
    worker = None
    try:
        ensure_topics(broker.bootstrap, 4)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        email_id = f"hang-{uuid.uuid4().hex[:8]}"
        sent = now_ms() - 3_600_000
        for event in (SendRegistered(email_id, "p1", "candidate", "c1", "t1", "s", sent),
                      RawOpen(f"ev-{email_id}", email_id, now_ms(), "hang-me", "127.0.0.0")):
            producer.send(event.topic, key=event.key.encode(), value=event.to_bytes())
        producer.flush()
        producer.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
        env.update(OPENTRACK_DATA_DIR=str(tmp_path / "data"),
                   OPENTRACK_KAFKA_BOOTSTRAP=broker.bootstrap,
                   OPENTRACK_WORKER_STALL_SECONDS="10")
        worker = subprocess.Popen([sys.executable, "-c", HANGING_WORKER], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = worker.communicate(timeout=180)
        assert worker.returncode == STALLED_EXIT, stderr[-3000:]
        assert "the event loop has run nothing for 10 s" in stderr, stderr[-3000:]
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(10)
        broker.stop()
