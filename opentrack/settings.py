"""The one settings object, read from the environment (DESIGN.md, "Settings")."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """A setting has a value the program cannot use; the message says which and why."""


def _host_port(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"{name}={value!r}: expected HOST:PORT, for example 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


def _number(env: dict[str, str], name: str, default: float, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(env: dict[str, str]) -> str:
    level = (env.get("OPENTRACK_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise SettingsError(
            f"OPENTRACK_LOG_LEVEL={level!r}: expected one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _secret_file(path: Path, nbytes: int) -> str:
    """Generate a secret once and keep it, so restarts keep tokens and keys valid."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    kafka_bootstrap: str | None
    clickhouse_url: str | None
    secret: str = field(repr=False)
    previous_secrets: tuple[str, ...] = field(repr=False)
    api_key: str = field(repr=False)
    public_url: str
    dedup_window: float
    scanner_seconds: float
    listen: tuple[str, int]
    proxy_hops: int
    partitions: int
    web_workers: int
    web_threads: int
    log_level: str
    rules_path: Path | None = None
    # where a worker's or loader's Prometheus metrics are served (the web has /metrics)
    metrics_listen: tuple[str, int] | None = None
    # a worker whose agent takes no event for this long while events wait exits (to be
    # restarted): Faust only logs such a stall
    worker_stall_seconds: float = 300.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("OPENTRACK_DATA_DIR") or "./.opentrack").resolve()
        secret = env.get("OPENTRACK_SECRET") or _secret_file(data_dir / "secret", 32)
        api_key = env.get("OPENTRACK_API_KEY") or _secret_file(data_dir / "api_key", 24)
        listen = _host_port(env.get("OPENTRACK_LISTEN") or "127.0.0.1:8000", "OPENTRACK_LISTEN")
        return cls(
            data_dir=data_dir,
            kafka_bootstrap=env.get("OPENTRACK_KAFKA_BOOTSTRAP") or None,
            clickhouse_url=env.get("OPENTRACK_CLICKHOUSE_URL") or None,
            secret=secret,
            previous_secrets=tuple(
                s for s in (env.get("OPENTRACK_SECRET_PREVIOUS") or "").split(",") if s
            ),
            api_key=api_key,
            public_url=(env.get("OPENTRACK_PUBLIC_URL") or f"http://{listen[0]}:{listen[1]}").rstrip("/"),
            dedup_window=_number(env, "OPENTRACK_DEDUP_WINDOW", 60.0),
            scanner_seconds=_number(env, "OPENTRACK_SCANNER_SECONDS", 10.0),
            listen=listen,
            proxy_hops=int(_number(env, "OPENTRACK_PROXY_HOPS", 0)),
            partitions=int(_number(env, "OPENTRACK_PARTITIONS", 4, minimum=1)),
            web_workers=int(_number(env, "OPENTRACK_WEB_WORKERS", 2, minimum=1)),
            web_threads=int(_number(env, "OPENTRACK_WEB_THREADS", 4, minimum=1)),
            log_level=_log_level(env),
            rules_path=Path(env["OPENTRACK_RULES"]) if env.get("OPENTRACK_RULES") else None,
            metrics_listen=_host_port(env["OPENTRACK_METRICS_LISTEN"], "OPENTRACK_METRICS_LISTEN")
            if env.get("OPENTRACK_METRICS_LISTEN") else None,
            worker_stall_seconds=_number(env, "OPENTRACK_WORKER_STALL_SECONDS", 300.0,
                                         minimum=10),
        )

    @property
    def bootstrap(self) -> str:
        """The brokers to use: the configured ones, or the local broker `opentrack run` started."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        try:
            return (self.data_dir / "kafka" / "bootstrap").read_text().strip()
        except FileNotFoundError:
            raise SettingsError(
                "OPENTRACK_KAFKA_BOOTSTRAP is unset and no local broker is running: "
                "start one with `opentrack kafka` (or `opentrack run`), or set the variable"
            ) from None

    @property
    def warehouse_socket(self) -> Path:
        """Where the embedded warehouse's owner answers queries (chDB allows one process)."""
        return self.data_dir / "warehouse.sock"
