"""Ground truth for the per-email open state, computed the slow obvious way from DESIGN.md.

Sort one email's distinct loads by time, walk each client, count a load when it comes at
least the window after that client's previous counted load. Tests, the labelled workload
and the accuracy report compare the pipeline against this, never against itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentrack.events import RawOpen
from streams.state import client_fingerprint

IsMachine = Callable[[RawOpen], bool]


def counted_verdicts(loads: Iterable[RawOpen], window_ms: int) -> dict[str, bool]:
    unique = {raw.event_id: raw for raw in loads}.values()
    last: dict[str, int] = {}
    verdicts = {}
    for raw in sorted(unique, key=lambda r: (r.received_at, r.event_id)):
        fp = client_fingerprint(raw.user_agent, raw.client)
        verdicts[raw.event_id] = fp not in last or raw.received_at - last[fp] >= window_ms
        if verdicts[raw.event_id]:
            last[fp] = raw.received_at
    return verdicts


def expected_state(loads: Iterable[RawOpen], window_ms: int, is_machine: IsMachine) -> dict:
    unique = {raw.event_id: raw for raw in loads}
    verdicts = counted_verdicts(unique.values(), window_ms)
    ordered = sorted(unique.values(), key=lambda r: (r.received_at, r.event_id))
    counted = [r for r in ordered if verdicts[r.event_id]]
    human = [r for r in counted if not is_machine(r)]
    return {
        "opened": bool(counted),
        "open_count": len(counted),
        "human_open_count": len(human),
        "machine_open_count": len(counted) - len(human),
        "raw_load_count": len(ordered),
        "first_opened_at": counted[0].received_at if counted else None,
        "last_opened_at": counted[-1].received_at if counted else None,
        "last_human_opened_at": human[-1].received_at if human else None,
        "first_human_opened_at": human[0].received_at if human else None,
    }
