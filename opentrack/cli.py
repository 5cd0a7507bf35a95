"""The `opentrack` command: the whole stack, or each part of it, with the same settings."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading

import click

from opentrack.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc


def _logging(settings: Settings, component: str) -> None:
    """JSON logs on stderr at OPENTRACK_LOG_LEVEL, secrets redacted (opentrack.logs)."""
    from opentrack.logs import configure

    configure(settings, component)


def _serve_metrics(settings: Settings, offset: int = 0) -> None:
    """Prometheus metrics of a worker or loader on OPENTRACK_METRICS_LISTEN (port + offset,
    so that several workers on one machine each get their own); off when unset."""
    if settings.metrics_listen is None:
        return
    from prometheus_client import start_http_server

    host, port = settings.metrics_listen
    try:
        start_http_server(port + offset, addr=host)
    except OSError as exc:
        raise click.UsageError(
            f"cannot serve metrics on {host}:{port + offset} (OPENTRACK_METRICS_LISTEN): {exc}"
        ) from exc
    logging.getLogger("opentrack.metrics").info(
        "metrics at http://%s:%d/metrics", host, port + offset)


def _stop_on_signals() -> threading.Event:
    """Ctrl-C and SIGTERM ask for a clean stop instead of killing the process mid-way."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping


def _ensure_topics(settings: Settings) -> None:
    """Create missing topics with their partitions and retention (idempotent), so that a
    worker or loader started on a fresh cluster (docker compose) finds them right."""
    from opentrack.topics import ensure_topics

    ensure_topics(settings.bootstrap, settings.partitions)


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
    _logging(settings, "run")
    stack = Stack(settings)
    stopping = _stop_on_signals()
    try:
        click.echo("starting OpenTrack (Kafka, worker, loader, web)…")
        stack.start()
        base = stack.base_url
        click.echo(
            f"\nOpenTrack is running.\n"
            f"  pixel and API : {base}\n"
            f"  health        : {base}/healthz\n"
            f"  metrics       : {', '.join(stack.metrics_urls().values())}\n"
            f"  Kafka         : {stack.env.get('OPENTRACK_KAFKA_BOOTSTRAP')}\n"
            f"  data dir      : {settings.data_dir}\n"
            f"  logs          : {stack.log_dir}\n"
            f"  dashboards    : {base}/dashboards/ (log in with the API key)\n"
            f"  API key       : {settings.api_key}\n\n"
            "See it work: in another shell, `.venv/bin/opentrack demo --emails 2000` sends a "
            "labelled workload\nthrough the public endpoints and prints the dashboards that "
            "show it.\n"
            f"Try: curl -H 'Authorization: Bearer {settings.api_key}' "
            f"{base}/v1/emails/<email_id>/opens\n"
            "Press Ctrl-C to stop.\n"
        )
        while not stopping.wait(0.5):
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

    from opentrack.logs import logging_config

    settings = _settings()
    _logging(settings, "web")
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
        log_dictconfig=logging_config(settings, "web"),
        respawn_failed_workers=True,
    ).serve()


@main.command()
@click.option("--instance", default=0, show_default=True,
              help="Number of this worker on this machine; each keeps its state in its own folder.")
def worker(instance: int) -> None:
    """Run a stream worker (Faust): drop replays, classify, dedup, keep per-email state."""
    from streams.worker import run_worker

    settings = _settings()
    _logging(settings, "worker")
    _serve_metrics(settings, offset=instance)
    _ensure_topics(settings)
    sys.argv = [sys.argv[0], "worker"]  # Faust parses the command line itself
    run_worker(settings, instance)


@main.command()
def loader() -> None:
    """Load Kafka into ClickHouse; in embedded mode also own chDB and serve reads."""
    from warehouse.service import run_loader

    settings = _settings()
    _logging(settings, "loader")
    _serve_metrics(settings)
    _ensure_topics(settings)
    run_loader(settings)


@main.command()
def migrate() -> None:
    """Apply the warehouse schema migrations it lacks, then exit. Every loader does this when
    it starts; run it once first when several loaders start together (`docker compose up
    --scale loader=N`), since a migration that rebuilds a table must not run twice at once.
    On the embedded warehouse, stop the stack first: its loader owns chDB."""
    from warehouse.engines import writer_engine
    from warehouse.schema import LATEST
    from warehouse.schema import migrate as apply_migrations

    settings = _settings()
    _logging(settings, "migrate")
    engine = writer_engine(settings.clickhouse_url, settings.data_dir)
    try:
        applied = apply_migrations(engine)
    finally:
        engine.close()
    done = ", ".join(str(v) for v in applied) or "none (it was up to date)"
    click.echo(f"warehouse at schema version {LATEST}; applied now: {done}")


@main.command()
@click.option("--emails", default=1000, show_default=True, type=click.IntRange(1, 1_000_000),
              help="How many sends to register.")
@click.option("--days", default=7.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Simulated days the sends are spread over (ending last midnight UTC).")
@click.option("--seed", type=int, default=None,
              help="Seed of the workload (default: a new one; printed, to repeat a run).")
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Requests in flight at most.")
@click.option("--wait", "wait_timeout", default=120.0, show_default=True,
              help="Seconds to wait for the pipeline to process the last loads (0: do not).")
def demo(emails: int, days: float, seed: int | None, concurrency: int,
         wait_timeout: float) -> None:
    """Send a realistic labelled workload through the running stack's public endpoints:
    registrations, pixel loads of every kind (people, Gmail and Yahoo proxies, Apple's
    prefetch, scanners, bots, repeated loads), replies and unsubscribes; then print the
    dashboards' URLs. Reads the same OPENTRACK_* settings as the stack."""
    import random

    from opentrack.demo import run_demo

    settings = _settings()
    _logging(settings, "demo")
    seed = random.SystemRandom().randrange(1 << 30) if seed is None else seed
    result = run_demo(settings, emails, days, seed, concurrency, wait_timeout, click.echo)
    if result.failures:
        sys.exit(1)


@main.command()
@click.option("--port", type=int, default=None, help="Broker port (default: a free one).")
def kafka(port: int | None) -> None:
    """Run a local single-node Kafka broker (KRaft) under the data dir until Ctrl-C."""
    from opentrack.kafka_local import LocalKafka
    from opentrack.topics import ensure_topics

    settings = _settings()
    _logging(settings, "kafka")
    broker = LocalKafka(settings.data_dir / "kafka", settings.partitions, port=port)
    broker.start()
    ensure_topics(broker.bootstrap, settings.partitions)
    click.echo(f"Kafka is ready: OPENTRACK_KAFKA_BOOTSTRAP={broker.bootstrap}")
    stopping = _stop_on_signals()
    try:
        while not stopping.wait(0.5) and broker.process and broker.process.poll() is None:
            pass
    finally:
        broker.stop()


@main.command()
@click.option("--from-beginning", "from_beginning", is_flag=True,
              help="Re-process everything Kafka holds.")
@click.option("--from-time", "from_time", metavar="T",
              help="Re-process from this ISO 8601 time (record time in Kafka).")
@click.option("--from-offsets", "from_offsets", metavar="P:O,…",
              help="Re-process opens.raw from these offsets per partition, e.g. 0:120,1:98.")
@click.option("--to-time", "to_time", metavar="T", help="Stop at this ISO 8601 time.")
@click.option("--into", type=click.Choice(["state", "warehouse", "all"]), default="all",
              show_default=True,
              help="state: rebuild what the worker lacks; warehouse: emit loads, states, "
                   "sends and engagement again for the loader; all: both.")
@click.option("--reclassify", is_flag=True,
              help="Apply the current classification rules to the replayed loads.")
@click.option("--dry-run", is_flag=True,
              help="Only say what would be re-processed: topics, partitions, offsets, counts.")
@click.option("--wait", "wait_timeout", default=600.0, show_default=True,
              help="Seconds to wait for the worker and the loader to catch up.")
def replay(from_beginning: bool, from_time: str | None, from_offsets: str | None,
           to_time: str | None, into: str, reclassify: bool, dry_run: bool,
           wait_timeout: float) -> None:
    """Re-process the raw stream from an offset or a time, while the stack runs.

    Idempotent: replaying any range any number of times changes no count, unless
    --reclassify meets rules that changed since; the summary then says how many loads
    changed class. Exit code 3 when the range is no longer retained by Kafka.
    """
    from kafka import KafkaConsumer

    from opentrack import replay as replaying
    from opentrack.http import Invalid
    from opentrack.times import parse_time
    from warehouse.engines import reader_engine

    if sum(map(bool, (from_beginning, from_time, from_offsets))) != 1:
        raise click.UsageError("give exactly one of --from-beginning, --from-time, --from-offsets")
    settings = _settings()
    _logging(settings, "replay")
    try:
        start = parse_time(from_time, "--from-time") if from_time else None
        end = parse_time(to_time, "--to-time") if to_time else None
        offsets = replaying.parse_offsets(from_offsets) if from_offsets else None
    except (Invalid, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    try:
        ranges = replaying.plan(consumer, replaying.topics_for(into), from_time=start,
                                from_offsets=offsets, to_time=end)
    except replaying.NotRetained as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(replaying.EXIT_NOT_RETAINED)
    finally:
        consumer.close()
    click.echo(replaying.describe(ranges))
    if dry_run:
        if replaying.uses_reload(into, reclassify):
            click.echo(replaying.describe_reload(settings, ranges))
        click.echo("dry run: nothing was re-processed")
        return
    engine = reader_engine(settings.clickhouse_url, settings.warehouse_socket)
    try:
        summary = replaying.replay(settings, ranges, into=into, reclassify=reclassify,
                                   engine=engine, wait_timeout=wait_timeout)
    except replaying.ReplayFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(replaying.report(summary))
    if not summary.caught_up:
        click.echo("warning: the worker or the loader had not caught up when the wait ended; "
                   "the counts above may be partial", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
