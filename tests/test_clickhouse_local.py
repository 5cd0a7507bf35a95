"""The throwaway ClickHouse server must start, answer, stop cleanly and survive a restart."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from warehouse import clickhouse_local
from warehouse.clickhouse_local import (
    LocalClickHouse,
    find_clickhouse_server,
    start_clickhouse_server,
)

pytestmark = pytest.mark.skipif(
    find_clickhouse_server() is None, reason="clickhouse-server binary not installed"
)


def _group_members(pgid: int) -> list[int]:
    """PIDs still in the server's process group (it runs in its own session)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                pass
    return members


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def clickhouse(tmp_path: Path):
    ch = start_clickhouse_server(tmp_path / "ch")
    yield ch
    ch.stop()


def test_start_query_stop(clickhouse: LocalClickHouse) -> None:
    assert clickhouse.url == f"clickhouse://127.0.0.1:{clickhouse.port}/default"
    client = clickhouse.client()
    (version,) = client.execute("SELECT version()")[0]
    client.disconnect()
    assert version.split(".")[0].isdigit()

    pid = clickhouse.process.pid
    clickhouse.stop()
    assert clickhouse.process.returncode is not None
    assert _group_members(pid) == []
    assert not _port_open(clickhouse.port)
    assert not _port_open(clickhouse.http_port)


def test_start_again_keeps_data_and_ports(clickhouse: LocalClickHouse) -> None:
    client = clickhouse.client()
    client.execute(
        "CREATE TABLE IF NOT EXISTS t (id String, ver UInt64) "
        "ENGINE = ReplacingMergeTree(ver) ORDER BY id"
    )
    client.execute("INSERT INTO t (id, ver) VALUES", [("a", 1), ("a", 2), ("b", 1)])
    client.disconnect()
    port, http_port, old_pid = clickhouse.port, clickhouse.http_port, clickhouse.process.pid

    clickhouse.stop()
    assert _group_members(old_pid) == []
    clickhouse.start_again()

    assert (clickhouse.port, clickhouse.http_port) == (port, http_port)
    assert clickhouse.process.pid != old_pid
    client = clickhouse.client()
    rows = client.execute("SELECT id, ver FROM t FINAL ORDER BY id")
    client.disconnect()
    assert rows == [("a", 2), ("b", 1)]


def test_startup_failure_raises_with_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the HTTP port is taken, so the readiness poll never talks to our dummy socket.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = iter([clickhouse_local._free_port(), busy.getsockname()[1]])
        monkeypatch.setattr(clickhouse_local, "_free_port", lambda: next(ports))
        with pytest.raises(RuntimeError, match="exited with code") as excinfo:
            start_clickhouse_server(tmp_path / "ch", timeout=10)
    assert "Address already in use" in str(excinfo.value)
