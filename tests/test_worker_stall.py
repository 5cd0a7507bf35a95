"""The worker's stall watchdog: when it exits, and when it must not.

The decision is a plain function; ``StallWatch`` is driven here with stand-ins for the
three things it reads from Faust (the assignment and its offsets, the rebalancing and
recovery flags), since a real agent cannot be made to hang without a hook in the worker.
A real worker left idle past its patience must stay up (the stacks of the tests run with
a patience of ``STALL_SECONDS``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import pytest
from faust.types import TP

from streams.worker import STALLED_EXIT, StallWatch, is_stalled
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
