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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from clickhouse_driver.util.escape import escape_params

Row = dict[str, Any]


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
                return self._session.query(sql, fmt)
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
    """clickhouse-driver, one connection per thread (the driver's client is not thread-safe)."""

    def __init__(self, url: str) -> None:
        self.url = url
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
            return self._client().execute(*args, **kwargs)
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
        return self._post("/query", {"sql": sql, "params": params or {}})["rows"]

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


def reader_engine(clickhouse_url: str | None, socket_path: Path) -> Engine:
    """The engine of a process that only reads (the web server)."""
    if clickhouse_url:
        return ServerEngine(clickhouse_url)
    return RemoteEngine(socket_path)
