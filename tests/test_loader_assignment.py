"""The loader's watch for an assignment that stays empty while no one else in the group
holds a partition: the decision on the group's description, and the description as a real
broker gives it."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewTopic

from warehouse.assignment import AssignmentWatch, is_stuck


def member(member_id: str, *partitions: int) -> dict[str, Any]:
    assigned = [{"topic": "t", "partitions": list(partitions)}] if partitions else []
    return {"member_id": member_id, "member_assignment": {"assigned_partitions": assigned}}


def group(*members: dict[str, Any], state: str = "Stable") -> dict[str, Any]:
    return {"group_state": state, "members": list(members), "error": None}


def test_nobody_holding_a_partition_is_stuck() -> None:
    assert is_stuck(group(member("me")), "me")


def test_another_member_holding_the_partitions_is_not_stuck() -> None:
    assert not is_stuck(group(member("me"), member("other", 0, 1)), "me")


def test_a_consumer_the_group_does_not_know_is_stuck() -> None:
    assert is_stuck(group(member("other", 0), state="Stable"), "me")
    assert is_stuck(group(state="Empty"), "me")


def test_a_rebalance_or_an_unknown_answer_is_left_alone() -> None:
    assert not is_stuck(group(member("me"), state="PreparingRebalance"), "me")
    assert not is_stuck(None, "me")
    assert not is_stuck({"error": "CoordinatorNotAvailableError", "members": []}, "me")
    undecoded = {"member_id": "me", "member_assignment": b"\x00\x01"}
    assert not is_stuck(group(undecoded), "me")


def wait_assigned(consumer: KafkaConsumer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200)


def wait_topic_known(bootstrap: str, topic: str, timeout: float = 30) -> None:
    """A group joined before the new topic's metadata reached the broker's cache gets an
    empty assignment (the range assignor logs "No partition metadata"): wait for it first."""
    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        deadline = time.monotonic() + timeout
        while not probe.partitions_for_topic(topic) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        probe.close()


@pytest.mark.timeout(120)
def test_a_second_consumer_without_partitions_is_not_stuck_on_a_real_broker(
    kafka_broker: Any,
) -> None:
    """One partition, two consumers: the one left without is normal, not stuck; the watch
    reads the real group description (member ids, decoded assignments)."""
    topic, group_id = f"watch-{uuid.uuid4().hex[:8]}", f"watch-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    wait_topic_known(kafka_broker.bootstrap, topic)
    consumers = [KafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap,
                               group_id=group_id) for _ in range(2)]
    try:
        wait_assigned(consumers[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the second has joined too
            for c in consumers:
                c.poll(timeout_ms=100)
            ids = {c._coordinator._generation.member_id for c in consumers}
            described = AssignmentWatch(kafka_broker.bootstrap, group_id)._describe()
            joined = described and {m["member_id"] for m in described["members"]} == ids
            if joined and any(c.assignment() for c in consumers):
                break
        holder = next(c for c in consumers if c.assignment())
        idle = next(c for c in consumers if not c.assignment())
        watch = AssignmentWatch(kafka_broker.bootstrap, group_id, patience=0.0)
        assert not watch.stuck(holder)
        assert not watch.stuck(idle)  # the first look only starts the clock
        assert not watch.stuck(idle)  # the second asks the group: the other holds it
        described = watch._describe()
        assert is_stuck(described, "a-member-the-group-does-not-know")
    finally:
        for c in consumers:
            c.close()
