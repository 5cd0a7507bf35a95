"""Readiness of what the web needs: Kafka (to publish) and the warehouse (to answer reads).

Why cached: load balancers, compose and Prometheus may probe every second from several
places; one check per process every ``ttl`` seconds answers them all. Why short timeouts: a
probe must answer "not ready" quickly rather than hang with what it depends on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentrack.logs import Redactor, secrets_of
from opentrack.settings import Settings
from warehouse.engines import Engine, reader_engine


@dataclass(frozen=True)
class Check:
    ready: bool
    seconds: float
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "seconds": round(self.seconds, 4), "detail": self.detail}


def kafka_check(bootstrap: Callable[[], str], timeout: float) -> Check:
    """A metadata request answered, with an active controller."""
    from kafka import KafkaAdminClient

    started = time.monotonic()
    admin = None
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap(), request_timeout_ms=int(timeout * 1000),
            bootstrap_timeout_ms=int(timeout * 1000), connections_max_idle_ms=5000,
        )
        cluster = admin.describe_cluster()
        brokers = len(cluster.get("brokers", ()))
        if cluster.get("controller_id", -1) == -1:
            return Check(False, time.monotonic() - started, "no active controller")
        return Check(True, time.monotonic() - started, f"{brokers} broker(s), controller up")
    except Exception as exc:  # anything that stops a metadata answer means not ready
        return Check(False, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    finally:
        if admin is not None:
            admin.close()


def warehouse_check(engine: Engine) -> Check:
    started = time.monotonic()
    try:
        engine.query("SELECT 1 AS ok")
        return Check(True, time.monotonic() - started, "answers queries")
    except Exception as exc:
        return Check(False, time.monotonic() - started, f"{type(exc).__name__}: {exc}")


class Readiness:
    """The cached readiness report of one process."""

    def __init__(self, settings: Settings, ttl: float = 1.5, timeout: float = 1.0) -> None:
        self.settings = settings
        self.ttl = ttl
        self.timeout = timeout
        self._engine = reader_engine(settings.clickhouse_url, settings.warehouse_socket,
                                     timeout=timeout)
        self._redact = Redactor(secrets_of(settings))  # the report is public: no secrets
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._report: tuple[bool, dict[str, Any]] = (False, {})

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): each dependency with ready, seconds taken and a detail."""
        with self._lock:  # concurrent probes wait for one check instead of each running it
            if time.monotonic() - self._checked_at >= self.ttl:
                checks = {
                    "kafka": kafka_check(lambda: self.settings.bootstrap, self.timeout),
                    "warehouse": warehouse_check(self._engine),
                }
                ready = all(c.ready for c in checks.values())
                self._report = (ready, {
                    "status": "ready" if ready else "not ready",
                    "not_ready": sorted(name for name, c in checks.items() if not c.ready),
                    "checks": {name: {**c.as_json(), "detail": self._redact(c.detail)}
                               for name, c in checks.items()},
                })
                self._checked_at = time.monotonic()
            return self._report
