"""`opentrack run`: the whole local stack as child processes, stopped cleanly together.

Process layout (embedded mode): a Kafka broker (Java), one Faust worker, one loader that owns
the chDB warehouse and answers reads over a Unix socket, and the web server (pixel, API).
A child that dies is restarted after a short pause; Ctrl-C or SIGTERM stops them all, web
first (so the producer flushes), the broker last.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from opentrack.kafka_local import LocalKafka
from opentrack.processes import stop_process_group
from opentrack.settings import Settings
from opentrack.topics import ensure_topics

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    env: dict[str, str] = field(default_factory=dict)  # this child's own settings

    def start(self, env: dict[str, str], log_dir: Path) -> None:
        out = open(log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "opentrack.cli", *self.args],
            env={**env, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        self.started_at = time.monotonic()

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.process = self.process, None
        stop_process_group(proc, timeout)


class Stack:
    def __init__(self, settings: Settings, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.kafka: LocalKafka | None = None
        self.children = [
            Child("loader", ["loader"]),
            Child("worker", ["worker"]),
            Child("web", ["web"]),
        ]
        if settings.metrics_listen is not None:  # one port each: the loader's, then the worker's
            host, port = settings.metrics_listen
            self.child("worker").env["OPENTRACK_METRICS_LISTEN"] = f"{host}:{port + 1}"
        self.log_dir = settings.data_dir / "logs"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.settings.kafka_bootstrap:
            self.kafka = LocalKafka(self.settings.data_dir / "kafka", self.settings.partitions)
            self.kafka.start()
            self.env["OPENTRACK_KAFKA_BOOTSTRAP"] = self.kafka.bootstrap
        bootstrap = self.env.get("OPENTRACK_KAFKA_BOOTSTRAP") or self.settings.bootstrap
        ensure_topics(bootstrap, self.settings.partitions)
        for child in self.children:
            child.start(self.env, self.log_dir)
        self.wait_ready()

    @property
    def base_url(self) -> str:
        host, port = self.settings.listen
        return f"http://{host}:{port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Ready when the web answers /healthz and the warehouse answers a read."""
        deadline = time.monotonic() + timeout
        probe = urllib.request.Request(
            f"{self.base_url}/v1/emails/opentrack-readiness-probe/opens",
            headers={"Authorization": f"Bearer {self.settings.api_key}"},
        )
        while time.monotonic() < deadline:
            self.check_children(restart=False)
            try:
                urllib.request.urlopen(probe, timeout=2)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # the warehouse answered: the email is unknown
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the stack was not ready in {timeout:.0f}s; see {self.log_dir}")

    def check_children(self, restart: bool = True) -> None:
        for child in self.children:
            proc = child.process
            if proc is None or proc.poll() is None:
                continue
            if not restart:
                raise RuntimeError(
                    f"{child.name} exited with {proc.returncode}; "
                    f"see {self.log_dir}/{child.name}.log"
                )
            child.restarts += 1
            log.warning("%s exited with %s, restarting", child.name, proc.returncode)
            time.sleep(min(5.0, child.restarts))
            child.start(self.env, self.log_dir)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def metrics_urls(self) -> dict[str, str]:
        """Where each process serves its Prometheus metrics."""
        urls = {"web": f"{self.base_url}/metrics"}
        if self.settings.metrics_listen is not None:
            host, port = self.settings.metrics_listen
            urls["loader"] = f"http://{host}:{port}/metrics"
            urls["worker"] = f"http://{host}:{port + 1}/metrics"
        return urls
