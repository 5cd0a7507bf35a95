"""One interface over three ways to reach ClickHouse.

- ``ChdbEngine``: the embedded default, chDB in this process, on disk under the data dir.
  chDB allows one process per data path, so exactly one process (``opentrack loader``) owns
  it: it writes the warehouse and answers read queries for the others over a Unix socket.
- ``RemoteEngine``: how the web processes read the embedded warehouse, through that socket.
- ``ServerEngine``: a ClickHouse server through clickhouse-driver (``OPENTRACK_CLICKHOUSE_URL``).

SQL is parameterised everywhere: ``%(name)s`` placeholders, values escaped by
clickhouse-driver's own escaping, whichever engine runs the query.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from clickhouse_driver.util.escape import escape_params
from prometheus_client import Histogram

Row = dict[str, Any]
T = TypeVar("T")

WAREHOUSE_QUERY_SECONDS = Histogram(
    "opentrack_warehouse_query_seconds",
    "Time of one warehouse statement as this process sees it, by engine (chdb, server, "
    "remote: through the embedded warehouse's owner) and statement kind",
    ["engine", "kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STATEMENT_KINDS = frozenset({
    "select", "insert", "alter", "create", "drop", "optimize", "system", "show", "describe",
    "exists", "truncate", "set", "rename",
})


def statement_kind(sql: str) -> str:
    """The statement's first keyword, from a small fixed set (a bounded metric label)."""
    head = sql.lstrip().split(None, 1)[0].lower() if sql.strip() else ""
    if head == "with":
        return "select"
    return head if head in STATEMENT_KINDS else "other"


def timed(engine: str, sql: str, run: Callable[[], T]) -> T:
    """Run one statement, observing its time in ``opentrack_warehouse_query_seconds``."""
    started = time.perf_counter()
    try:
        return run()
    finally:
        WAREHOUSE_QUERY_SECONDS.labels(engine=engine, kind=statement_kind(sql)).observe(
            time.perf_counter() - started
        )


class WarehouseUnavailable(RuntimeError):
    """The warehouse cannot be reached now; the caller retries or answers 503."""


class Engine(Protocol):
    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Row]: ...
    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None: ...
    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...
    def close(self) -> None: ...


class _Context:
    """What clickhouse-driver's escaping needs to know of the server (only for datetimes)."""

    class server_info:  # noqa: N801 - mirrors the driver's attribute
        timezone = "UTC"

    client_settings = {"server_side_params": False}


def bind(sql: str, params: dict[str, Any] | None) -> str:
    if not params:
        return sql
    return sql % escape_params(params, _Context)


def is_read_only(sql: str) -> bool:
    head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    return head in {"SELECT", "WITH", "EXISTS", "SHOW", "DESCRIBE"}


class ChdbEngine:
    def __init__(self, path: Path) -> None:
        from chdb import session

        Path(path).mkdir(parents=True, exist_ok=True)
        self._session = session.Session(str(path))
        self._lock = threading.Lock()
        # Numbers as JSON numbers, like clickhouse-driver returns them.
        self._run("SET output_format_json_quote_64bit_integers = 0", "CSV")

    def _run(self, sql: str, fmt: str = "JSONCompact") -> Any:
        with self._lock:
            try:
                return timed("chdb", sql, lambda: self._session.query(sql, fmt))
            except Exception as exc:
                raise RuntimeError(f"chDB query failed: {exc}") from exc

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Row]:
        raw = self._run(bind(sql, params)).bytes()
        if not raw:
            return []
        payload = json.loads(raw)
        names = [m["name"] for m in payload["meta"]]
        return [dict(zip(names, row, strict=True)) for row in payload["data"]]

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._run(bind(sql, params), "CSV")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        body = "\n".join(
            json.dumps(dict(zip(columns, row, strict=True)), separators=(",", ":"))
            for row in rows
        )
        self._run(f"INSERT INTO {table} ({', '.join(columns)}) FORMAT JSONEachRow\n{body}", "CSV")

    def close(self) -> None:
        with self._lock:
            self._session.close()


class ServerEngine:
    """clickhouse-driver, one connection per thread (the driver's client is not thread-safe).

    ``timeout`` (seconds) bounds connecting and each exchange, for callers that must answer
    quickly (the health check); the driver's defaults otherwise."""

    def __init__(self, url: str, timeout: float | None = None) -> None:
        self.url = url if timeout is None else _with_timeouts(url, timeout)
        self._local = threading.local()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            from clickhouse_driver import Client

            client = self._local.client = Client.from_url(self.url)
        return client

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        from clickhouse_driver.errors import Error as DriverError
        from clickhouse_driver.errors import NetworkError, ServerException

        try:
            return timed("server", args[0], lambda: self._client().execute(*args, **kwargs))
        except (TimeoutError, NetworkError, EOFError, OSError) as exc:
            self._local.client = None
            raise WarehouseUnavailable(f"ClickHouse server unreachable: {exc}") from exc
        except ServerException:
            raise
        except DriverError as exc:
            self._local.client = None
            raise WarehouseUnavailable(f"ClickHouse driver error: {exc}") from exc

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Row]:
        rows, columns = self._call(bind(sql, params), with_column_types=True)
        names = [c[0] for c in columns]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._call(bind(sql, params))

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._call(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", list(rows))

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.disconnect()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("warehouse", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class RemoteEngine:
    """Read queries against the embedded warehouse, through the process that owns it."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._local = threading.local()

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        body = json.dumps(payload).encode()
        for attempt in (1, 2):  # a kept-alive connection may have been closed by the owner
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = _UnixConnection(self.socket_path, self.timeout)
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = json.loads(response.read() or b"null")
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise WarehouseUnavailable(
                        f"the embedded warehouse at {self.socket_path} does not answer "
                        f"(is `opentrack loader` running?): {exc}"
                    ) from exc
                continue
            if response.status != 200:
                raise RuntimeError(f"warehouse query failed: {data}")
            return data
        raise AssertionError("unreachable")

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Row]:
        payload = {"sql": sql, "params": params or {}}
        return timed("remote", sql, lambda: self._post("/query", payload))["rows"]

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        raise PermissionError("the embedded warehouse takes writes only from its owner process")

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        raise PermissionError("the embedded warehouse takes writes only from its owner process")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def writer_engine(clickhouse_url: str | None, data_dir: Path) -> Engine:
    """The engine of the process that loads the warehouse."""
    if clickhouse_url:
        return ServerEngine(clickhouse_url)
    return ChdbEngine(Path(data_dir) / "warehouse")


def reader_engine(
    clickhouse_url: str | None, socket_path: Path, timeout: float | None = None
) -> Engine:
    """The engine of a process that only reads (the web server); ``timeout`` bounds each
    query's connection and exchange (default: 30 s through the socket, the driver's own)."""
    if clickhouse_url:
        return ServerEngine(clickhouse_url, timeout)
    return RemoteEngine(socket_path, 30.0 if timeout is None else timeout)


def _with_timeouts(url: str, seconds: float) -> str:
    """The ClickHouse URL with clickhouse-driver's connect and exchange timeouts set."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name in ("connect_timeout", "send_receive_timeout", "sync_request_timeout"):
        query[name] = str(seconds)
    return urlunsplit(parts._replace(query=urlencode(query)))
