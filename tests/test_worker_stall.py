"""The worker's stall watchdog: when it exits, and when it must not.

The decision is a plain function; ``StallWatch`` is driven here with stand-ins for the
three things it reads from Faust (the assignment and its offsets, the rebalancing and
recovery flags), since a real agent cannot be made to hang without a hook in the worker.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from streams.worker import STALLED_EXIT, StallWatch, is_stalled


@pytest.mark.parametrize(("idle", "waiting", "busy", "stalled"), [
    (301, 5, False, True),
    (300, 1, False, True),
    (299, 5, False, False),  # not long enough
    (900, 0, False, False),  # idle because nothing waits
    (900, 5, True, False),  # a rebalance or a table recovery
])
def test_is_stalled(idle: float, waiting: int, busy: bool, stalled: bool) -> None:
    assert is_stalled(idle, waiting, busy, patience=300) is stalled


class Consumer:
    def __init__(self, highwater: dict[str, int], position: dict[str, int]) -> None:
        self._highwater, self._position = highwater, position

    def assignment(self) -> set[str]:
        return set(self._highwater)

    def highwater(self, tp: str) -> int:
        return self._highwater[tp]

    async def position(self, tp: str) -> int:
        return self._position[tp]


def watch_of(app: SimpleNamespace, taken: dict[str, tuple[int, int]]) -> tuple[StallWatch, list]:
    exits: list[int] = []
    watch = StallWatch(app, SimpleNamespace(last=taken), patience=60, exit=exits.append)
    watch.last_taken -= 61  # the agent took its last event 61 s ago
    return watch, exits


def test_exits_when_events_wait_after_the_last_one_taken() -> None:
    app = SimpleNamespace(consumer=Consumer({"a": 10, "b": 4}, {"b": 4}),
                          consumer_generation_id=3, rebalancing=False, in_recovery=False)
    watch, exits = watch_of(app, {"a": (3, 6)})  # a: offsets 7-9 wait; b: none
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
    app = SimpleNamespace(consumer=Consumer({"a": 7}, {}), consumer_generation_id=3,
                          rebalancing=False, in_recovery=False)
    watch, exits = watch_of(app, {"a": (3, 6)})
    asyncio.run(watch.check())
    assert exits == []
