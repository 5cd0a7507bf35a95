"""Times on the wire: ISO 8601 in the API, integer epoch milliseconds (UTC) everywhere else."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from opentrack.http import Invalid


def parse_time(value: Any, field: str) -> int:
    """ISO 8601 with a timezone (or 'Z') → epoch milliseconds UTC."""
    if not isinstance(value, str) or not value:
        raise Invalid(field, "expected an ISO 8601 time such as 2026-12-04T09:30:00Z")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Invalid(field, f"{value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise Invalid(field, "the time needs a timezone, for example a trailing Z for UTC")
    if not 1990 <= parsed.year <= 2200:
        raise Invalid(field, "the year is out of range")
    return int(parsed.astimezone(UTC).timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    """Epoch ms → ISO 8601 UTC with milliseconds; 0 and None (the warehouse's "never") → None."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
