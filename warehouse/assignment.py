"""Notices a loader that holds no partition while nobody else in its group does either.

Seen once in CI: the loader restarted, its first join found no metadata for any topic
("No partition metadata for topic ..." from kafka-python's range assignor), so it was given
nothing; it normally rejoins at its next metadata refresh, but this time it never did, and
the group's broker no longer knew its member id when it left minutes later. The warehouse
took nothing for five minutes. A loader with nothing assigned is normal when the group has
more loaders than partitions, so the group is asked before anything is done: only when no
member holds a partition, or this consumer is not a member at all, is it stuck.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def is_stuck(group: dict[str, Any] | None, member_id: str | None) -> bool:
    """From a ``describe_groups`` entry: no member holds a partition, or we are not in it."""
    if not group or group.get("error"):
        return False  # the broker did not say: ask again later rather than guess
    members = group.get("members") or []
    if member_id and member_id not in {m.get("member_id") for m in members}:
        return True
    for member in members:
        assignment = member.get("member_assignment")
        if not isinstance(assignment, dict):
            return False  # not decoded: cannot tell, so not stuck
        if any(a.get("partitions") for a in assignment.get("assigned_partitions") or []):
            return False
    return group.get("group_state") == "Stable"


class AssignmentWatch:
    """Asks the group, at most every ``patience`` seconds, while our assignment is empty."""

    def __init__(self, bootstrap: str, group_id: str, patience: float = 20.0) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.patience = patience
        self.empty_since: float | None = None

    def stuck(self, consumer: Any) -> bool:
        if consumer.assignment():
            self.empty_since = None
            return False
        now = time.monotonic()
        if self.empty_since is None:
            self.empty_since = now
            return False
        if now - self.empty_since < self.patience:
            return False
        self.empty_since = now  # the next look is another ``patience`` away
        generation = getattr(getattr(consumer, "_coordinator", None), "_generation", None)
        member_id = getattr(generation, "member_id", None) or None
        try:
            group = self._describe()
        except Exception as exc:  # noqa: BLE001 - the broker may be away; look again later
            log.debug("could not describe group %s: %s", self.group_id, exc)
            return False
        return is_stuck(group, member_id)

    def _describe(self) -> dict[str, Any] | None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            return admin.describe_groups([self.group_id]).get(self.group_id)
        finally:
            admin.close()
