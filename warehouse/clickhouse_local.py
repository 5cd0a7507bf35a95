"""Throwaway ClickHouse server (Debian's 18.16.1 package) for tests and benchmarks.

Runs as root without any flag; starts in ~0.1-0.2 s, SIGTERM stop takes ~0.4-1 s.

SQL probed on 18.16.1 through clickhouse-driver 0.2.11 (so the team knows what is portable):
  Works: ReplacingMergeTree(ver) + SELECT ... FINAL; argMax; countIf; uniqExact; quantile
    (returns Float64); quantilesExact; CREATE TABLE IF NOT EXISTS; INSERT ... VALUES with a
    list of tuples; Nullable(String); Array(String); toUnixTimestamp; if; multiIf;
    WHERE (a, b) < (1, 'x') (also with %(name)s params); LIMIT n; ORDER BY ... DESC;
    PARTITION BY toYYYYMM(toDateTime(intDiv(ts_ms, 1000))) on Int64 (parts 202311 etc.).
  Caveats:
    - LowCardinality(...) DDL needs allow_experimental_low_cardinality_type=1 (Code 44
      otherwise); the users.xml below sets it, after which insert/select/FINAL/GROUP BY work.
    - ALTER TABLE t DELETE WHERE ... works on the MergeTree family only (not Memory) and is
      asynchronous: no mutations_sync setting (Code 115); poll system.mutations for is_done = 1.
    - FORMAT JSONCompact raises no error but is ignored by the native protocol: the driver
      still returns tuples. Real JSON needs the HTTP port (http_port).
    - Nullable columns are rejected in ORDER BY (sorting) keys.
  Fails: DateTime64 and Map (Code 50, unknown type), table TTL clause, ADD COLUMN IF NOT EXISTS,
    mutations_sync.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickhouse_driver import Client

_LOG_TAIL_LINES = 40

_CONFIG_XML = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{root}/log/clickhouse-server.log</log>
        <errorlog>{root}/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <!-- Only these two ports listen: interserver/https/secure-tcp ports are off when unset,
         and 18.16 has no mysql/postgresql/prometheus/grpc ports at all. -->
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"""

_USERS_XML = """<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""


def find_clickhouse_server() -> str | None:
    """Locate the server binary; Debian puts it in /usr/sbin, which is not always on PATH."""
    for name in ("clickhouse-server", "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    """Ask the kernel for an unused loopback port (tiny race, fine for throwaway servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalClickHouse:
    """Handle on a running throwaway server; ports and data survive stop()/start_again()."""

    host: str
    port: int
    http_port: int
    data_dir: Path
    process: subprocess.Popen
    binary: str = "clickhouse-server"
    timeout: float = 30.0

    @property
    def url(self) -> str:
        return f"clickhouse://{self.host}:{self.port}/default"

    def client(self, **kwargs: Any) -> Client:
        """Native-protocol client for this server (callers own and disconnect it)."""
        return Client(host=self.host, port=self.port, **kwargs)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; the whole process group goes, so nothing strays."""
        if self.process.returncode is not None:
            return
        _signal_group(self.process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _exited(self.process) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The leader is still unreaped here, so its pgid cannot have been recycled.
        _signal_group(self.process, signal.SIGKILL)
        self.process.wait()

    def start_again(self) -> None:
        """Restart on the same ports and data dir, e.g. after a fault test's outage."""
        self.stop()
        self.process = _spawn(self.binary, self.data_dir)
        _wait_ready(self, self.timeout)


def _exited(process: subprocess.Popen) -> bool:
    """Has the child exited? Uses WNOWAIT so it stays a zombie until stop() reaps it."""
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    return os.waitid(os.P_PID, process.pid, flags) is not None


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _spawn(binary: str, data_dir: Path) -> subprocess.Popen:
    """Start in the foreground in a new session so stop() can kill the whole group."""
    # Popen dup()s the file into the child, so closing our copy right away is fine.
    with open(data_dir / "log" / "console.log", "ab") as console:
        return subprocess.Popen(
            [binary, f"--config-file={data_dir / 'config.xml'}"],
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _log_tail(data_dir: Path) -> str:
    parts = []
    for name in ("console.log", "clickhouse-server.log"):  # the .err.log only duplicates
        path = data_dir / "log" / name
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
            parts.append(f"--- {path} ---\n" + "\n".join(lines))
    return "\n".join(parts) or "(no server log written)"


def _wait_ready(ch: LocalClickHouse, timeout: float) -> None:
    """Poll TCP connect + SELECT 1: the port opens before the server can answer queries."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if ch.process.poll() is not None:
            raise RuntimeError(
                f"clickhouse-server exited with code {ch.process.returncode} during start-up\n"
                + _log_tail(ch.data_dir)
            )
        try:
            with socket.create_connection((ch.host, ch.port), timeout=1):
                pass  # cheap and silent; the driver logs a traceback per refused connect
            client = ch.client(connect_timeout=1, send_receive_timeout=5)
            try:
                if client.execute("SELECT 1") == [(1,)]:
                    return
            finally:
                client.disconnect()
        except Exception as exc:  # any failure just means "not ready yet"
            last_error = exc
        time.sleep(0.05)
    ch.stop()
    raise RuntimeError(
        f"clickhouse-server on {ch.host}:{ch.port} not ready after {timeout:.0f}s "
        f"(last error: {last_error!r})\n" + _log_tail(ch.data_dir)
    )


def start_clickhouse_server(data_dir: Path, timeout: float = 30.0) -> LocalClickHouse:
    """Write a loopback-only config under data_dir, start the server, wait until it answers."""
    binary = find_clickhouse_server()
    if binary is None:
        raise RuntimeError("clickhouse-server binary not found on PATH or in /usr/sbin")
    data_dir = Path(data_dir).resolve()
    for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    tcp_port, http_port = _free_port(), _free_port()
    while http_port == tcp_port:
        http_port = _free_port()
    (data_dir / "config.xml").write_text(
        _CONFIG_XML.format(root=data_dir, tcp_port=tcp_port, http_port=http_port)
    )
    (data_dir / "users.xml").write_text(_USERS_XML)
    ch = LocalClickHouse(
        host="127.0.0.1",
        port=tcp_port,
        http_port=http_port,
        data_dir=data_dir,
        process=_spawn(binary, data_dir),
        binary=binary,
        timeout=timeout,
    )
    _wait_ready(ch, timeout)
    return ch
