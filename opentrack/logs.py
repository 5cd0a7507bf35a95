"""Structured logs: one JSON object a line on stderr, the same shape for every process.

Why JSON: the processes run side by side (and scaled out under docker compose), and a log
collector can filter on ``component``, ``level`` and ``logger`` without parsing prose.
Each line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``component``
(web, worker, loader, ...), ``pid``, any ``extra={...}`` fields, and ``exc_info`` for errors.

Secrets never reach the output: the signing secrets, the API key, the ClickHouse password
and anything after ``Bearer `` are replaced by ``[redacted]`` in the finished line, whatever
logged them (our code, a library, a traceback).
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from pythonjsonlogger.json import JsonFormatter

from opentrack.settings import Settings

REDACTED = "[redacted]"
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
# Libraries that speak too much at INFO (every connection, every rebalance step).
QUIET_LIBRARIES = ("kafka", "aiokafka", "clickhouse_driver", "urllib3")
MIN_SECRET_LENGTH = 4  # shorter "secrets" would blank out ordinary words


class Redactor:
    """Replaces known secrets (as they are, and as they look inside a JSON string) and
    bearer tokens in a text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = set()
        for secret in secrets:
            if len(secret) >= MIN_SECRET_LENGTH:
                forms.add(secret)
                forms.add(json.dumps(secret)[1:-1])
        self._secrets = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _BEARER.sub(r"\1" + REDACTED, text)


class SecretsRedactedJsonFormatter(JsonFormatter):
    """python-json-logger's formatter, with known secrets removed from every line."""

    def __init__(self, component: str, secrets: Iterable[str] = (), **kwargs: Any) -> None:
        kwargs.setdefault("fmt", ["levelname", "name", "message", "process"])
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger",
                                            "process": "pid"})
        super().__init__(timestamp="time", static_fields={"component": component}, **kwargs)
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


def secrets_of(settings: Settings) -> list[str]:
    """Every value in the settings that must not be logged."""
    values = [settings.secret, settings.api_key, *settings.previous_secrets]
    if settings.clickhouse_url:
        password = urlsplit(settings.clickhouse_url).password
        if password:
            values += [password, unquote(password)]
    return [v for v in values if v]


def logging_config(settings: Settings, component: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for one process: JSON to stderr at the settings'
    level. Also what granian's workers and Faust's worker are configured with."""
    level = settings.log_level
    quiet = max(logging.WARNING, logging.getLevelName(level))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {
            "()": SecretsRedactedJsonFormatter,
            "component": component,
            "secrets": secrets_of(settings),
        }},
        "handlers": {"stderr": {
            "class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
        }},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            **{name: {"level": logging.getLevelName(quiet)} for name in QUIET_LIBRARIES},
            # granian's own loggers stop at their handlers by default: send them to ours
            "_granian": {"level": level, "handlers": [], "propagate": True},
            "granian.access": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure(settings: Settings, component: str) -> None:
    """Configure this process's logging (replaces any handlers already there)."""
    logging.config.dictConfig(logging_config(settings, component))
