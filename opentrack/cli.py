"""The `opentrack` command: the whole stack, or each part of it, with the same settings."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time

import click

from opentrack.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """OpenTrack: email open tracking — pixel → Kafka → Faust → ClickHouse.

    Settings come from OPENTRACK_* environment variables (see the README); every command
    reads the same ones, so `.venv/bin/opentrack replay` talks to the stack `make run` started.
    """


@main.command()
def run() -> None:
    """Start the whole local stack: Kafka (unless OPENTRACK_KAFKA_BOOTSTRAP is set), the
    stream worker, the warehouse loader and the web server. Ctrl-C stops everything."""
    from opentrack.stack import Stack

    settings = _settings()
    _logging(settings)
    stack = Stack(settings)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        click.echo("starting OpenTrack (Kafka, worker, loader, web)…")
        stack.start()
        base = stack.base_url
        click.echo(
            f"\nOpenTrack is running.\n"
            f"  pixel and API : {base}\n"
            f"  health        : {base}/healthz\n"
            f"  metrics       : {base}/metrics\n"
            f"  Kafka         : {stack.env.get('OPENTRACK_KAFKA_BOOTSTRAP')}\n"
            f"  data dir      : {settings.data_dir}\n"
            f"  logs          : {stack.log_dir}\n"
            f"  API key       : {settings.api_key}\n\n"
            f"Try: curl -H 'Authorization: Bearer {settings.api_key}' "
            f"{base}/v1/emails/<email_id>/opens\n"
            "Press Ctrl-C to stop.\n"
        )
        while not stopping:
            time.sleep(0.5)
            stack.check_children()
    finally:
        click.echo("stopping…")
        stack.stop()
        click.echo("stopped.")


@main.command()
def web() -> None:
    """Run the web server (pixel, API) under granian on OPENTRACK_LISTEN."""
    from granian import Granian
    from granian.constants import Interfaces

    settings = _settings()
    _logging(settings)
    if settings.web_workers > 1:
        metrics_dir = settings.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    host, port = settings.listen
    Granian(
        "opentrack.web:create_app",
        factory=True,
        interface=Interfaces.WSGI,
        address=host,
        port=port,
        workers=settings.web_workers,
        blocking_threads=settings.web_threads,
        log_level=settings.log_level.lower(),
        respawn_failed_workers=True,
    ).serve()


@main.command()
@click.option("--instance", default=0, show_default=True,
              help="Number of this worker on this machine; each keeps its state in its own folder.")
def worker(instance: int) -> None:
    """Run a stream worker (Faust): drop replays, classify, dedup, keep per-email state."""
    from streams.worker import run_worker

    settings = _settings()
    sys.argv = [sys.argv[0], "worker"]  # Faust parses the command line itself
    run_worker(settings, instance)


@main.command()
def loader() -> None:
    """Load Kafka into ClickHouse; in embedded mode also own chDB and serve reads."""
    from warehouse.service import run_loader

    settings = _settings()
    _logging(settings)
    run_loader(settings)


@main.command()
@click.option("--port", type=int, default=None, help="Broker port (default: a free one).")
def kafka(port: int | None) -> None:
    """Run a local single-node Kafka broker (KRaft) under the data dir until Ctrl-C."""
    from opentrack.kafka_local import LocalKafka
    from opentrack.topics import ensure_topics

    settings = _settings()
    _logging(settings)
    broker = LocalKafka(settings.data_dir / "kafka", settings.partitions, port=port)
    broker.start()
    ensure_topics(broker.bootstrap, settings.partitions)
    click.echo(f"Kafka is ready: OPENTRACK_KAFKA_BOOTSTRAP={broker.bootstrap}")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and broker.process and broker.process.poll() is None:
            time.sleep(0.5)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
