"""Operating the stack: JSON logs at the configured level with no secrets in them, /healthz
readiness of Kafka and the warehouse (and /livez), warehouse query latency in /metrics."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from opentrack.kafka_local import free_port
from opentrack.logs import REDACTED, logging_config
from opentrack.processes import stop_process_group
from opentrack.settings import Settings, SettingsError

SECRET, OLD_SECRET = "signing-secret-9f8e7d", "older-secret-1a2b3c"
API_KEY, CH_PASSWORD = "api-key-5c4b3a29", "ch-pass-77@x"
SECRET_ENV = {
    "OPENTRACK_SECRET": SECRET, "OPENTRACK_SECRET_PREVIOUS": OLD_SECRET,
    "OPENTRACK_API_KEY": API_KEY,
    "OPENTRACK_CLICKHOUSE_URL": "clickhouse://opentrack:ch-pass-77%40x@127.0.0.1:1/db",
}
SECRETS = (SECRET, OLD_SECRET, API_KEY, CH_PASSWORD, "ch-pass-77%40x")


def assert_json_lines(text: str, component: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "no log lines"
    for line in lines:
        assert {"time", "level", "logger", "message", "component", "pid"} <= set(line), line
        assert line["component"] == component
    for secret in SECRETS:
        assert secret not in text, f"a secret was logged: {secret}"
    return lines


def test_log_lines_are_json_at_the_level_without_secrets(tmp_path: Path) -> None:
    settings = Settings.from_env({**SECRET_ENV, "OPENTRACK_DATA_DIR": str(tmp_path),
                                  "OPENTRACK_LOG_LEVEL": "info"})
    config = logging_config(settings, "loader")
    stream = io.StringIO()
    root = logging.getLogger()
    touched = [root, *(logging.getLogger(name) for name in config["loggers"])]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in touched]
    logging.config.dictConfig(config)
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        log = logging.getLogger("opentrack.test")
        log.debug("not at INFO")
        logging.getLogger("kafka.conn").info("libraries speak at WARNING and above")
        log.info("key %s, header Authorization: Bearer %s", API_KEY, "tok.en-123")
        log.warning("url %s", settings.clickhouse_url, extra={"secret": SECRET})
        try:
            raise RuntimeError(f"failed with {OLD_SECRET} and {CH_PASSWORD}")
        except RuntimeError:
            log.exception("with a traceback")
    finally:  # put back what pytest had
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    lines = assert_json_lines(stream.getvalue(), "loader")
    assert [line["level"] for line in lines] == ["INFO", "WARNING", "ERROR"]
    assert "tok.en-123" not in stream.getvalue() and REDACTED in lines[0]["message"]
    assert "RuntimeError" in lines[2]["exc_info"]
    with pytest.raises(SettingsError, match="OPENTRACK_LOG_LEVEL"):
        Settings.from_env({**SECRET_ENV, "OPENTRACK_DATA_DIR": str(tmp_path),
                           "OPENTRACK_LOG_LEVEL": "chatty"})


def test_web_logs_json_and_says_what_is_not_ready(tmp_path: Path) -> None:
    """A real `opentrack web` with Kafka and the warehouse away: alive, not ready, quickly."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
    env.update({**SECRET_ENV, "OPENTRACK_DATA_DIR": str(tmp_path),
                "OPENTRACK_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                "OPENTRACK_LISTEN": f"127.0.0.1:{port}", "OPENTRACK_LOG_LEVEL": "INFO"})
    stderr = tmp_path / "web.log"
    with stderr.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "opentrack.cli", "web"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/livez", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise AssertionError(stderr.read_text())
        started = time.monotonic()
        response = requests.get(f"{base}/healthz", timeout=10)
        assert time.monotonic() - started < 4
        assert response.status_code == 503
        report = response.json()
        assert report["status"] == "not ready"
        assert report["not_ready"] == ["kafka", "warehouse"]
        assert not report["checks"]["warehouse"]["ready"]
        for secret in SECRETS:
            assert secret not in response.text
    finally:
        stop_process_group(proc, timeout=20)
    assert_json_lines(stderr.read_text(), "web")


def test_healthz_is_ready_and_warehouse_latency_is_measured(running_stack) -> None:
    base = running_stack.base
    response = requests.get(f"{base}/healthz", timeout=10)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["status"] == "ready" and report["not_ready"] == []
    assert report["checks"]["kafka"]["ready"] and report["checks"]["warehouse"]["ready"]
    assert requests.get(f"{base}/livez", timeout=10).status_code == 200
    running_stack.opens("observability-probe")  # one read through the warehouse
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert 'opentrack_warehouse_query_seconds_count{engine="remote",kind="select"}' in metrics
