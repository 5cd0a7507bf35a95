"""Shared fixtures: real services, started once per test session on free loopback ports."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from opentrack.kafka_local import LocalKafka, free_port
from opentrack.settings import Settings
from opentrack.stack import Stack
from opentrack.topics import ensure_topics

API_KEY = "test-api-key-0123456789"
SECRET = "test-secret-0123456789"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), partitions=4)
    broker.start()
    ensure_topics(broker.bootstrap, 4)
    yield broker
    broker.stop()


STALL_SECONDS = 45


def stack_env(data_dir: Path, bootstrap: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
    env.update({
        "OPENTRACK_DATA_DIR": str(data_dir),
        "OPENTRACK_KAFKA_BOOTSTRAP": bootstrap,
        "OPENTRACK_LISTEN": f"127.0.0.1:{free_port()}",
        "OPENTRACK_API_KEY": API_KEY,
        "OPENTRACK_SECRET": SECRET,
        "OPENTRACK_LOG_LEVEL": "WARNING",
        # shorter than the default 300 s, so that a worker wrongly taken for stalled exits
        # within the suite (the tests restart no one: the next test fails)
        "OPENTRACK_WORKER_STALL_SECONDS": str(STALL_SECONDS),
        **extra,
    })
    return env


class RunningStack:
    """The real stack (worker, loader, web) and a small client for its HTTP API."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.settings = stack.settings
        self.base = stack.base_url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {API_KEY}"

    def register(self, email_id: str, sent_at: str = "2026-01-05T09:00:00Z", **fields: Any) -> dict:
        body = {"email_id": email_id, "profile_id": "p1", "person_type": "candidate",
                "person_id": "c1", "template_id": "t1", "subject": "Hello",
                "sent_at": sent_at, **fields}
        response = self.http.post(f"{self.base}/v1/emails", json=body, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()

    def opens(self, email_id: str) -> requests.Response:
        return self.http.get(f"{self.base}/v1/emails/{email_id}/opens", timeout=10)

    def wait_for(self, email_id: str, done: Callable[[dict], bool], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            response = self.opens(email_id)
            if response.status_code == 200:
                last = response.json()
                if done(last):
                    return last
            time.sleep(0.1)
        raise AssertionError(f"{email_id} never reached the expected state; last: {last}\n"
                             + self.log_tails())

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.stack.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)


@pytest.fixture(scope="session")
def running_stack(
    kafka_broker: LocalKafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    env = stack_env(tmp_path_factory.mktemp("stack"), kafka_broker.bootstrap)
    stack = Stack(Settings.from_env(env), env)
    try:
        stack.start()
    except Exception:
        stack.stop()
        raise
    yield RunningStack(stack)
    stack.stop()


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's clickhouse-server (18.16), the real server the clickhouse-driver path runs on."""
    from warehouse.clickhouse_local import find_clickhouse_server, start_clickhouse_server

    if find_clickhouse_server() is None:
        pytest.fail("clickhouse-server is not installed: run `make system-packages`")
    server = start_clickhouse_server(tmp_path_factory.mktemp("clickhouse"))
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["chdb", "server"])
def warehouse_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Each warehouse test runs on both engines: the embedded chDB and a ClickHouse server."""
    from warehouse.engines import ChdbEngine, ServerEngine
    from warehouse.schema import migrate

    if request.param == "chdb":
        engine = ChdbEngine(tmp_path_factory.mktemp("chdb"))
    else:
        engine = ServerEngine(request.getfixturevalue("clickhouse_server").url)
    migrate(engine)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def server_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A second stack on a ClickHouse server (Debian's 18.16) instead of chDB, with its own
    broker and server: the parity and ClickHouse-outage tests use it."""
    from warehouse.clickhouse_local import start_clickhouse_server

    broker = LocalKafka(tmp_path_factory.mktemp("kafka-server-stack"), partitions=4)
    broker.start()
    ensure_topics(broker.bootstrap, 4)
    clickhouse = start_clickhouse_server(tmp_path_factory.mktemp("clickhouse-stack"))
    env = stack_env(tmp_path_factory.mktemp("server-stack"), broker.bootstrap,
                    OPENTRACK_CLICKHOUSE_URL=clickhouse.url)
    stack = Stack(Settings.from_env(env), env)
    try:
        stack.start()
    except Exception:
        stack.stop()
        clickhouse.stop()
        broker.stop()
        raise
    running = RunningStack(stack)
    running.clickhouse = clickhouse
    yield running
    stack.stop()
    clickhouse.stop()
    broker.stop()
