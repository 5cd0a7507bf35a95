"""`opentrack loader`: the process that writes the warehouse.

In embedded mode it also owns chDB, which allows one process per data path, so it answers the
web processes' read queries over a Unix socket under the data dir (mode 0600: only this user).
Only read statements are accepted there; writes come from the loader inside this process, and
from a reload that `opentrack replay --into warehouse` asks for (``POST /reload``): this
process then reads the named Kafka ranges itself and writes them the loader's way
(``warehouse.reload``), so what is written is still only what Kafka holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from opentrack.settings import Settings
from warehouse.engines import Engine, is_read_only, writer_engine
from warehouse.loader import Loader
from warehouse.reload import Reload, ReloadError, Span
from warehouse.schema import migrate

log = logging.getLogger(__name__)
MAX_QUERY_BYTES = 1 << 20


class QueryServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: Path, engine: Engine, bootstrap: str | None = None) -> None:
        self.engine = engine
        self.bootstrap = bootstrap
        self.reloading = threading.Lock()  # one reload at a time
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _QueryHandler)
        finally:
            os.umask(old)


class _QueryHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: QueryServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug(format, *args)

    def address_string(self) -> str:
        return "local"

    def _reply(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        length = int(self.headers.get("Content-Length") or 0)
        if self.path == "/reload" and length <= MAX_QUERY_BYTES:
            self._reload(self.rfile.read(length))
            return
        if self.path != "/query" or length > MAX_QUERY_BYTES:
            self._reply(400, {"error": "POST /query with a JSON body of at most 1 MiB"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            sql, params = request["sql"], request.get("params") or {}
        except (ValueError, KeyError, TypeError):
            self._reply(400, {"error": "expected {sql, params}"})
            return
        if not is_read_only(sql):
            self._reply(403, {"error": "only read queries are served here"})
            return
        try:
            rows = self.server.engine.query(sql, params)
        except Exception as exc:
            log.warning("warehouse query failed: %s", exc)
            self._reply(500, {"error": str(exc)})
            return
        self._reply(200, {"rows": rows})

    def _reload(self, body: bytes) -> None:
        """Runs a reload and streams its progress as JSON lines, the result last; a client
        that goes away stops it."""
        try:
            request = json.loads(body)
            spans = [Span.from_dict(s) for s in request["spans"]]
            since_ms = request.get("since_ms")
            if since_ms is not None and not isinstance(since_ms, int):
                raise ReloadError("since_ms is epoch milliseconds")
        except (ValueError, KeyError, TypeError, ReloadError) as exc:
            self._reply(400, {"error": f"expected {{spans, since_ms?}}: {exc}"})
            return
        if self.server.bootstrap is None:
            self._reply(409, {"error": "this process does not load from Kafka"})
            return
        if not self.server.reloading.acquire(blocking=False):
            self._reply(409, {"error": "a reload is already running"})
            return
        try:
            job = Reload(self.server.engine, self.server.bootstrap, spans, since_ms=since_ms,
                         diff=bool(request.get("diff", True)))
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["done"] = job.run().to_dict()
                except Exception as exc:
                    log.exception("reload failed")
                    outcome["error"] = str(exc)

            thread = threading.Thread(target=run, name="reload", daemon=True)
            thread.start()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                while thread.is_alive():
                    self._line({"progress": job.progress()})
                    thread.join(0.5)
                self._line(outcome)
            except OSError:  # the replay went away (Ctrl-C): stop reading Kafka
                job.stop()
                thread.join()
        finally:
            self.server.reloading.release()

    def _line(self, payload: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
        self.wfile.flush()


def run_loader(settings: Settings) -> None:
    engine = writer_engine(settings.clickhouse_url, settings.data_dir)
    migrate(engine)
    server = None
    if not settings.clickhouse_url:
        server = QueryServer(settings.warehouse_socket, engine, settings.bootstrap)
        threading.Thread(target=server.serve_forever, name="warehouse-queries", daemon=True).start()
        log.info("embedded warehouse owned by pid %d, reads at %s", os.getpid(),
                 settings.warehouse_socket)
    loader = Loader(engine, settings.bootstrap)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: loader.stop())
    try:
        loader.run()
    finally:
        if server is not None:
            server.shutdown()
            with contextlib.suppress(FileNotFoundError):
                settings.warehouse_socket.unlink()
        engine.close()
