"""The labelled workload through Kafka and real workers: classification accuracy per class,
and per-email counts exactly equal to truth — across a rebalance between two workers and a
SIGKILL of one of them mid-stream."""

from __future__ import annotations

import os
import random
import signal
import time

from kafka import KafkaProducer

from opentrack.accuracy import format_report, report
from opentrack.events import now_ms
from opentrack.stack import Child
from opentrack.times import iso
from opentrack.workload import generate
from tests.topics import produce_loads
from warehouse.engines import RemoteEngine

STATE_FIELDS = ("opened", "open_count", "human_open_count", "machine_open_count",
                "raw_load_count", "first_opened_at", "last_opened_at", "last_human_opened_at")
CHUNK = 2000


def register_all(stack, sends) -> None:
    for i in range(0, len(sends), 1000):
        body = {"emails": [{
            "email_id": s.email_id, "profile_id": s.profile_id, "person_type": s.person_type,
            "person_id": s.person_id, "template_id": s.template_id, "subject": s.subject,
            "sent_at": iso(s.sent_at), "sequence_id": s.sequence_id,
            "sequence_step": s.sequence_step,
        } for s in sends[i:i + 1000]]}
        response = stack.http.post(f"{stack.base}/v1/emails/batch", json=body, timeout=60)
        assert response.status_code == 201, response.text


def query_chunks(engine, sql: str, ids: list[str]) -> list[dict]:
    """One query per 2,000 ids: an IN list of every id would pass ClickHouse's query size."""
    rows = []
    for i in range(0, len(ids), CHUNK):
        rows += engine.query(sql, {"ids": tuple(ids[i:i + CHUNK])})
    return rows


def test_labelled_workload_through_two_workers_with_a_kill(running_stack) -> None:
    settings = running_stack.settings
    workload = generate(emails=18_500, days=7, seed=random.randrange(1 << 30),
                        start_ms=now_ms() - 21 * 86_400_000,  # ends in the past, like real loads
                        scanner_seconds=settings.scanner_seconds)
    loads = [load.raw for load in workload.loads]
    assert len(loads) >= 20_000
    ids = [s.email_id for s in workload.sends]
    register_all(running_stack, workload.sends)

    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=20)

    def produce(part) -> None:
        produce_loads(producer, part)

    third = len(loads) // 3
    stack = running_stack.stack
    second = Child("worker-1", ["worker", "--instance", "1"])
    try:
        produce(loads[:third])
        second.start(stack.env, stack.log_dir)  # a second worker joins: rebalance
        produce(loads[third:2 * third])
        time.sleep(3)
        first = stack.child("worker")
        os.killpg(first.process.pid, signal.SIGKILL)  # one is killed mid-stream
        first.process.wait()
        produce(loads[2 * third:])
        producer.close()
        time.sleep(5)
        first.start(stack.env, stack.log_dir)  # and comes back: rebalance again

        engine = RemoteEngine(settings.warehouse_socket)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            total = sum(r["n"] for r in query_chunks(
                engine, "SELECT sum(raw_load_count) AS n FROM email_state FINAL "
                        "WHERE email_id IN %(ids)s", ids))
            if total >= len(loads):
                break
            time.sleep(2)
        time.sleep(3)  # let the last re-decided opens land too
    finally:
        second.stop()

    verdicts = {r["event_id"]: r["load_class"] for r in query_chunks(
        engine, "SELECT event_id, load_class FROM opens FINAL WHERE email_id IN %(ids)s", ids)}
    states = {}
    for r in query_chunks(engine, f"SELECT email_id, {', '.join(STATE_FIELDS)} "
                                  "FROM email_state FINAL WHERE email_id IN %(ids)s", ids):
        state = {k: r[k] for k in STATE_FIELDS}
        state["opened"] = bool(state["opened"])
        for k in ("first_opened_at", "last_opened_at", "last_human_opened_at"):
            state[k] = state[k] or None
        states[r["email_id"]] = state
    window_ms = int(settings.dedup_window * 1000)
    result = report(workload, verdicts, states, window_ms)
    print("\n" + format_report(result))

    assert result.unclassified == 0
    for score in result.scores.values():
        assert score.precision >= 0.98 and score.recall >= 0.98, score
    # Dedup, replays and timing are exact whatever the classes: these fields equal truth.
    truth = workload.truth(window_ms)
    for email_id in ids:
        for field in ("opened", "open_count", "raw_load_count", "first_opened_at",
                      "last_opened_at"):
            assert states[email_id][field] == truth[email_id][field], (email_id, field)
    # And the human/machine split is exactly what the verdicts the pipeline gave imply.
    from opentrack.truth import expected_state

    by_email = workload.loads_by_email()
    for email_id in ids:
        raws = [load.raw for load in by_email.get(email_id, ())]
        implied = expected_state(raws, window_ms, lambda r: verdicts[r.event_id] == "machine")
        assert states[email_id] == {k: implied[k] for k in states[email_id]}, email_id
