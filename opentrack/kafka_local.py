"""A real single-node Apache Kafka broker (KRaft, broker + controller) for local runs and tests.

The jars come from Maven Central through ``kafka/pom.xml`` into a cache outside the checkout
(``$OPENTRACK_CACHE_DIR`` or ``~/.cache/opentrack``), fetched once. The broker listens on
loopback only, on free ports, and start-up waits until it answers metadata requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from importlib.resources import files
from pathlib import Path

from opentrack.processes import stop_process_group

KAFKA_VERSION = "3.9.1"
BROKER_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

log = logging.getLogger(__name__)


class KafkaStartError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("OPENTRACK_CACHE_DIR") or Path.home() / ".cache" / "opentrack"
    return Path(base) / f"kafka-{KAFKA_VERSION}"


def ensure_jars() -> Path:
    """The folder of broker jars, fetched with Maven on first use."""
    libs = cache_dir() / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise KafkaStartError("Maven (mvn) is needed once to fetch the Kafka jars: install maven")
    pom = files("opentrack") / "kafka" / "pom.xml"
    libs.mkdir(parents=True, exist_ok=True)
    log.info("fetching Apache Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
         f"-Dkafka.version={KAFKA_VERSION}", f"-DoutputDirectory={libs}"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise KafkaStartError(
            "could not fetch the Kafka jars with Maven; check access to Maven Central:\n"
            + (result.stdout + result.stderr)[-3000:]
        )
    marker.touch()
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions={partitions}
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions={partitions}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions={partitions}
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=-1
"""

_LOG4J = """\
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log_file}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
"""


class LocalKafka:
    """One broker process over one data folder; ``stop()`` then ``start()`` keeps the data
    and the ports, which is what outage tests need."""

    def __init__(self, data_dir: Path, partitions: int = 4, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.partitions = partitions
        self.port = port or free_port()
        self.controller_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _java(self, libs: Path, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaStartError("Java 17 is needed to run the local Kafka broker: install it")
        return [java, "-cp", f"{libs}/*", *args]

    def _configure(self, libs: Path) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(_PROPERTIES.format(
            port=self.port, controller_port=self.controller_port,
            log_dir=self.data_dir / "logs", partitions=self.partitions,
        ))
        (self.data_dir / "log4j.properties").write_text(_LOG4J.format(log_file=self.log_file))
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = subprocess.run(
                self._java(libs, STORAGE_TOOL, "random-uuid"),
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            fmt = subprocess.run(
                self._java(libs, STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(props)),
                capture_output=True, text=True,
            )
            if fmt.returncode != 0:
                raise KafkaStartError(f"formatting Kafka storage failed:\n{fmt.stderr[-2000:]}")
        return props

    def start(self, timeout: float = 90.0) -> LocalKafka:
        libs = ensure_jars()
        props = self._configure(libs)
        jvm = [
            "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
        ]
        out = open(self.data_dir / "broker.out", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            self._java(libs, *jvm, BROKER_MAIN, str(props)),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        self._wait_ready(timeout)
        (self.data_dir / "bootstrap").write_text(self.bootstrap + "\n")
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise KafkaStartError(f"the Kafka broker exited at start:\n{self.log_tail()}")
            if broker_ready(self.bootstrap):
                return
            time.sleep(0.2)
        self.stop()
        raise KafkaStartError(
            f"the Kafka broker was not ready in {timeout:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.data_dir / "broker.out", self.log_file):
            with contextlib.suppress(OSError):
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return text

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM for a clean shutdown (the broker flushes its logs), SIGKILL if it hangs."""
        proc, self.process = self.process, None
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "bootstrap").unlink()
        stop_process_group(proc, timeout)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def broker_ready(bootstrap: str) -> bool:
    """The broker answers a metadata request and has an active controller."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=2000, connections_max_idle_ms=5000,
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        cluster = admin.describe_cluster()
        return cluster.get("controller_id", -1) != -1
    except (KafkaError, OSError, ValueError):
        return False
    finally:
        admin.close()
