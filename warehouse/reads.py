"""The reads behind the CRM API, as plain functions over an engine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from warehouse.engines import Engine

STATE_FIELDS = (
    "opened", "open_count", "human_open_count", "machine_open_count", "raw_load_count",
    "first_opened_at", "last_opened_at", "last_human_opened_at",
)
TIME_FIELDS = ("first_opened_at", "last_opened_at", "last_human_opened_at", "sent_at")


def iso(ms: int | None) -> str | None:
    """Epoch ms → ISO 8601 UTC; 0 is the warehouse's "never"."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _present(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name in TIME_FIELDS:
        if name in out:
            out[name] = iso(out[name])
    if "opened" in out:
        out["opened"] = bool(out["opened"])
    for name in ("sequence_id",):
        if name in out and out[name] == "":
            out[name] = None
    if out.get("sequence_step") == 0:
        out["sequence_step"] = None
    return out


def email_opens(engine: Engine, email_id: str) -> dict[str, Any] | None:
    """One email's open state with its send's metadata; None for an email never registered."""
    rows = engine.query(
        """
        SELECT s.email_id AS email_id, s.profile_id AS profile_id,
               s.person_type AS person_type, s.person_id AS person_id,
               s.template_id AS template_id, s.subject AS subject,
               s.sequence_id AS sequence_id, s.sequence_step AS sequence_step,
               s.sent_at AS sent_at, s.tracking AS tracking,
               st.opened AS opened, st.open_count AS open_count,
               st.human_open_count AS human_open_count,
               st.machine_open_count AS machine_open_count,
               st.raw_load_count AS raw_load_count, st.first_opened_at AS first_opened_at,
               st.last_opened_at AS last_opened_at,
               st.last_human_opened_at AS last_human_opened_at,
               (SELECT count() FROM engagement FINAL
                WHERE email_id = %(email_id)s AND kind = 'reply') AS replies,
               (SELECT count() FROM engagement FINAL
                WHERE email_id = %(email_id)s AND kind = 'unsubscribe') AS unsubscribes
        FROM (SELECT * FROM sends FINAL WHERE email_id = %(email_id)s) AS s
        LEFT JOIN (SELECT * FROM email_state FINAL WHERE email_id = %(email_id)s) AS st
        USING email_id
        """,
        {"email_id": email_id},
    )
    if not rows:
        return None
    row = _present(rows[0])
    row["tracking"] = bool(row["tracking"])
    row["replied"] = row["replies"] > 0
    row["unsubscribed"] = row["unsubscribes"] > 0
    return row
