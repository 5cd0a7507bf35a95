"""Scaled out: two stream workers and two loaders on a broker with several partitions and a
real ClickHouse server (Debian's 18.16; the embedded chDB allows one process). A labelled
workload of a few thousand loads goes through the pixel (``opentrack.demo``'s player), and
every email's counts equal the truth of what was sent; both workers and both loaders did
part of the work, each serving its own metrics. Prints the per-process figures that
docs/scaling.md quotes."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from opentrack import events
from opentrack.demo import Player, plan
from opentrack.kafka_local import LocalKafka, free_port
from opentrack.settings import Settings
from opentrack.stack import Child
from opentrack.topics import ensure_topics
from opentrack.workload import generate
from tests.conftest import API_KEY, SECRET
from tests.test_streams_accuracy import query_chunks
from tests.topics import load_stamps, table_entries, topic_records
from warehouse.engines import ServerEngine
from warehouse.schema import LATEST

PARTITIONS = 6
EMAILS = 2500
WINDOW_S, SCANNER_S = 5, 3  # short windows: each email's compressed clock stays short
COUNTS = ("opened", "open_count", "raw_load_count")


@dataclass
class ScaledStack:
    settings: Settings
    base: str
    engine: ServerEngine
    children: list[Child]
    metrics: dict[str, str]  # child name -> its /metrics URL
    log_dir: Path
    env: dict[str, str]

    def log_grep(self, pattern: str) -> str:
        """The lines of every log that match ``pattern``: the workers' positions."""
        return "\n".join(
            f"{p.stem}: {line}" for p in sorted(self.log_dir.glob("*.log"))
            for line in p.read_text(errors="replace").splitlines() if re.search(pattern, line))

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in sorted(self.log_dir.glob("*.log"))
        )


def where_loads_stopped(bootstrap: str, ids: list[str], sent: int) -> str:
    """For a failure message: how many of the test's loads each topic holds, so that a loss
    is pinned on the pixel, the worker or the loader."""
    wanted = set(ids)
    loads = [e for r in topic_records(bootstrap, events.TOPIC_OPENS_RAW)
             if (e := events.RawOpen.from_bytes(r.value)).email_id in wanted]
    raw = {e.event_id for e in loads}
    processed = {e.event_id for r in topic_records(bootstrap, events.TOPIC_OPENS_PROCESSED)
                 if (e := events.ProcessedOpen.from_bytes(r.value)).email_id in wanted}
    latest: dict[str, int] = {}
    for r in topic_records(bootstrap, events.TOPIC_EMAIL_STATE):
        if r.value is not None:
            state = events.EmailState.from_bytes(r.value)
            if state.email_id in wanted:
                latest[state.email_id] = state.raw_load_count
    lost = raw - processed
    lost_emails = sorted({e.email_id for e in loads if e.event_id in lost})
    sends_seen = {e.email_id for r in topic_records(bootstrap, events.TOPIC_SENDS)
                  if r.value is not None
                  and (e := events.SendRegistered.from_bytes(r.value)).email_id in wanted}
    entries = table_entries(bootstrap, lost_emails[:5])
    where = [f"{email_id}: {entry['changes']} changes, newest at "
             f"{entry['partition']}:{entry['offset']}, send known {entry['send_known']}, "
             f"{len(lost & set(entry['loads']))} lost loads kept, "
             f"{len(lost & set(entry['parked']))} parked"
             for email_id, entry in entries.items()]
    return (f"sent {sent}; in {events.TOPIC_OPENS_RAW}: {len(raw)}; in "
            f"{events.TOPIC_OPENS_PROCESSED}: {len(processed)} (of them not raw: "
            f"{len(processed - raw)}); in {events.TOPIC_EMAIL_STATE} (latest per email): "
            f"{sum(latest.values())}; the workers' group behind by: {worker_lag(bootstrap)}; "
            f"{len(lost_emails)} emails lost loads, {len(sends_seen & set(lost_emails))} of "
            f"their sends in {events.TOPIC_SENDS} ({len(sends_seen)} of {len(ids)} sends in "
            f"all); in the workers' table: {where}")


def worker_lag(bootstrap: str) -> dict[str, int]:
    """Per input partition, how far the stream workers' committed offset is from the end."""
    from kafka import KafkaAdminClient, KafkaConsumer

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        committed = admin.list_group_offsets("opentrack-streams")["opentrack-streams"]
        ends = consumer.end_offsets(list(committed))
        return {f"{tp.topic}-{tp.partition}": ends[tp] - meta.offset
                for tp, meta in sorted(committed.items()) if ends[tp] > meta.offset}
    finally:
        admin.close()
        consumer.close()


def two_free_ports() -> int:
    """A port whose next one is free too: `worker --instance i` serves metrics on port + i."""
    import socket

    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def wait_http(url: str, stack_children: list[Child], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in stack_children:
            if child.process is not None and child.process.poll() is not None:
                raise AssertionError(f"{child.name} exited with {child.process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer 200 in {timeout:.0f}s")


@pytest.fixture(scope="module")
def scaled_stack(clickhouse_server, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ScaledStack]:
    broker = LocalKafka(tmp_path_factory.mktemp("kafka-scaling"), partitions=PARTITIONS)
    broker.start()
    children: list[Child] = []
    try:
        ensure_topics(broker.bootstrap, PARTITIONS)
        client = clickhouse_server.client()
        client.execute("CREATE DATABASE IF NOT EXISTS scaling")
        client.disconnect()
        data_dir = tmp_path_factory.mktemp("scaling")
        log_dir = data_dir / "logs"
        log_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
        env.update({
            "OPENTRACK_DATA_DIR": str(data_dir),
            "OPENTRACK_KAFKA_BOOTSTRAP": broker.bootstrap,
            "OPENTRACK_CLICKHOUSE_URL": clickhouse_server.url.rsplit("/", 1)[0] + "/scaling",
            "OPENTRACK_LISTEN": f"127.0.0.1:{free_port()}",
            "OPENTRACK_API_KEY": API_KEY, "OPENTRACK_SECRET": SECRET,
            "OPENTRACK_PARTITIONS": str(PARTITIONS),
            "OPENTRACK_DEDUP_WINDOW": str(WINDOW_S),
            "OPENTRACK_SCANNER_SECONDS": str(SCANNER_S),
            "OPENTRACK_PROXY_HOPS": "1",  # the player's X-Forwarded-For carries the networks
            "OPENTRACK_LOG_LEVEL": "INFO",
        })
        settings = Settings.from_env(env)
        worker_port = two_free_ports()
        metrics = {}
        loaders = [Child(f"loader-{i}", ["loader"]) for i in range(2)]
        for loader in loaders:
            port = free_port()
            loader.env["OPENTRACK_METRICS_LISTEN"] = f"127.0.0.1:{port}"
            metrics[loader.name] = f"http://127.0.0.1:{port}/metrics"
        workers = [Child(f"worker-{i}", ["worker", "--instance", str(i)]) for i in range(2)]
        for i, worker in enumerate(workers):  # `--instance i` serves on the port + i
            worker.env["OPENTRACK_METRICS_LISTEN"] = f"127.0.0.1:{worker_port}"
            metrics[worker.name] = f"http://127.0.0.1:{worker_port + i}/metrics"
        web = Child("web", ["web"])
        # the first loader creates the tables; then the rest may start
        loaders[0].start(env, log_dir)
        children.append(loaders[0])
        wait_http(metrics["loader-0"], children)
        engine = ServerEngine(settings.clickhouse_url)
        deadline = time.monotonic() + 60
        # all migrations applied: two loaders migrating at once would rebuild tables together
        while not (engine.query("EXISTS TABLE schema_migrations")[0]["result"] and engine.query(
                "SELECT max(version) AS v FROM schema_migrations")[0]["v"] == LATEST):
            assert time.monotonic() < deadline, "the loader did not migrate the warehouse"
            time.sleep(0.3)
        for child in (loaders[1], *workers, web):
            child.start(env, log_dir)
            children.append(child)
        base = f"http://{env['OPENTRACK_LISTEN']}"
        wait_http(f"{base}/healthz", children)
        for name in ("loader-1", "worker-0", "worker-1"):
            wait_http(metrics[name], children, timeout=120)
        yield ScaledStack(settings, base, engine, children, metrics, log_dir, env)
    finally:
        for child in reversed(children):
            child.stop()
        broker.stop()


def scrape(url: str, name: str) -> dict[str, float]:
    """Samples of one metric family: label text -> value."""
    samples = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        match = re.match(rf"^{name}(\{{.*\}})? ([0-9.e+-]+)$", line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


def test_two_workers_and_two_loaders_count_exactly(scaled_stack: ScaledStack) -> None:
    stack = scaled_stack
    settings = stack.settings
    workload = generate(EMAILS, days=7, seed=8, scanner_seconds=SCANNER_S)
    plans = plan(workload, settings)
    player = Player(settings, concurrency=16, person_prefix="scaling-", seed=8)
    result = player.play(plans, lambda: None)
    finished = time.monotonic()
    assert result.failures == 0, result.errors
    sent = result.as_sent(settings)
    assert len(sent.loads) >= 2500
    ids = [s.email_id for s in sent.sends]

    deadline = time.monotonic() + 240
    total = 0
    while time.monotonic() < deadline:
        total = sum(r["n"] or 0 for r in query_chunks(
            stack.engine, "SELECT sum(raw_load_count) AS n FROM email_state FINAL "
                          "WHERE email_id IN %(ids)s", ids))
        if total >= len(sent.loads):
            break
        time.sleep(1)
    caught_up = time.monotonic() - finished
    assert total == len(sent.loads), (
        f"{total} of {len(sent.loads)} in the warehouse; "
        + where_loads_stopped(settings.bootstrap, ids, len(sent.loads)) + "\n"
        + stack.log_grep("never reached|first event|read again|Discarded commit|crashed") + "\n"
        + stack.log_tails())
    time.sleep(3)  # the last re-decided loads land too

    # the truth on the pixel's clock, which the workers judge by (see DemoResult.as_sent)
    sent = result.as_sent(settings, load_stamps(settings.bootstrap, ids))
    window_ms = int(settings.dedup_window * 1000)
    truth = sent.truth(window_ms)
    fields = ", ".join(("email_id", *COUNTS, "human_open_count", "machine_open_count",
                        "first_opened_at", "last_opened_at"))
    states = {r["email_id"]: r for r in query_chunks(
        stack.engine, f"SELECT {fields} FROM email_state FINAL WHERE email_id IN %(ids)s", ids)}
    rows = {r["email_id"]: r for r in query_chunks(
        stack.engine, "SELECT email_id, count() AS n_loads, sum(counted) AS n_counted, "
                      "sumIf(counted, load_class != 'machine') AS n_human FROM opens FINAL "
                      "WHERE email_id IN %(ids)s GROUP BY email_id", ids)}
    wrong = []
    for email_id, expected in truth.items():
        state = states.get(email_id)
        if not expected["raw_load_count"]:
            if state is not None and state["raw_load_count"]:
                wrong.append((email_id, "loads for an email that had none"))
            continue
        got = {k: (bool(state[k]) if k == "opened" else state[k]) for k in COUNTS}
        if got != {k: expected[k] for k in COUNTS}:
            wrong.append((email_id, got, {k: expected[k] for k in COUNTS}))
            continue
        assert state["human_open_count"] + state["machine_open_count"] == state["open_count"]
        # the opens table agrees with the state: no load lost or doubled between the two
        opens = rows[email_id]
        assert (opens["n_loads"], opens["n_counted"], opens["n_human"]) == (
            state["raw_load_count"], state["open_count"], state["human_open_count"]), email_id
        for key in ("first_opened_at", "last_opened_at"):  # client clock vs the pixel's stamp
            assert abs(state[key] - expected[key]) < 2000, (email_id, key)
    assert not wrong, f"{len(wrong)} emails differ from the truth, e.g. {wrong[:5]}"

    # both workers and both loaders did part of the work, and each served its metrics
    figures = {"emails": len(ids), "loads": len(sent.loads), "requests": result.requests,
               "play_seconds": round(result.seconds, 1),
               "requests_per_second": round(result.requests / result.seconds, 1),
               "caught_up_after_last_request_s": round(caught_up, 1)}
    for name in ("worker-0", "worker-1"):
        events = scrape(stack.metrics[name], "opentrack_worker_events_total")
        raw = sum(v for k, v in events.items() if 'topic="opens.raw"' in k)
        assert raw > 0, f"{name} processed no load: {events}"
        figures[f"{name}_raw_loads"] = int(raw)
    for name in ("loader-0", "loader-1"):
        rows_written = sum(scrape(stack.metrics[name], "opentrack_loader_rows_total").values())
        batch_seconds = scrape(stack.metrics[name], "opentrack_loader_batch_seconds_sum")[""]
        batches = scrape(stack.metrics[name], "opentrack_loader_batch_seconds_count")[""]
        inserts = scrape(stack.metrics[name], "opentrack_warehouse_query_seconds_count")
        assert rows_written > 0, f"{name} wrote nothing"
        assert any('kind="insert"' in k for k in inserts), inserts
        figures[f"{name}_rows"] = int(rows_written)
        figures[f"{name}_batches"] = int(batches)
        figures[f"{name}_rows_per_batch_second"] = round(rows_written / batch_seconds)
    print("\nscaling figures: " + json.dumps(figures, indent=1))

    # no input partition skipped offsets within a generation (nothing is compacted here)
    assert not stack.log_grep("never reached the worker"), stack.log_grep("never reached")

    # every process logs JSON lines (the workers' Faust logging is the lead's)
    for name in ("loader-0", "loader-1", "web"):
        text = (stack.log_dir / f"{name}.log").read_text()
        for line in text.splitlines():
            if line.strip():
                assert json.loads(line)["component"] in ("loader", "web"), line


BACKLOG = 60_000


def test_one_loader_catches_up_a_backlog(scaled_stack: ScaledStack) -> None:
    """The loader's write rate on the ClickHouse server: both loaders stopped, a backlog of
    processed opens (as the workers publish them) waits in Kafka, one loader comes back and
    writes it all. Figures for docs/scaling.md."""
    from kafka import KafkaProducer

    from opentrack.events import TOPIC_OPENS_PROCESSED, ProcessedOpen

    stack = scaled_stack
    loaders = [c for c in stack.children if c.name.startswith("loader")]
    for loader in loaders:
        loader.stop()
    producer = KafkaProducer(bootstrap_servers=stack.settings.bootstrap, linger_ms=20,
                             batch_size=256 * 1024)
    started_at = int(time.time() * 1000)
    for i in range(BACKLOG):
        email_id = f"backlog-{i % 5000:05d}"
        event = ProcessedOpen(
            event_id=f"backlog-{i:08d}", email_id=email_id, received_at=started_at + i,
            load_class="human", reason="", counted=True, fingerprint=f"{i % 97:016x}",
            client_family="Outlook", os_family="Windows", device_family="Other", revision=0,
        )
        producer.send(TOPIC_OPENS_PROCESSED, key=email_id.encode(), value=event.to_bytes())
    producer.flush()
    producer.close()

    loader = loaders[0]
    restart = time.monotonic()
    loader.start(stack.env, stack.log_dir)
    first = last = None
    deadline = time.monotonic() + 300
    count = 0
    while time.monotonic() < deadline:
        count = stack.engine.query(
            "SELECT count() AS n FROM opens WHERE email_id LIKE 'backlog-%'")[0]["n"]
        now = time.monotonic()
        if count and first is None:
            first = (now, count)
        if count >= BACKLOG:
            last = now
            break
        time.sleep(0.2)
    assert count == BACKLOG, f"{count} of {BACKLOG} rows written\n" + stack.log_tails()
    assert first is not None and last is not None
    rows = sum(scrape(stack.metrics[loader.name], "opentrack_loader_rows_total").values())
    batch_seconds = scrape(stack.metrics[loader.name], "opentrack_loader_batch_seconds_sum")[""]
    batches = scrape(stack.metrics[loader.name], "opentrack_loader_batch_seconds_count")[""]
    figures = {
        "backlog_rows": BACKLOG,
        "restart_to_first_rows_s": round(first[0] - restart, 1),
        "wall_rows_per_second": round((BACKLOG - first[1]) / max(last - first[0], 1e-3)),
        "insert_rows_per_second": round(rows / batch_seconds),
        "batches": int(batches), "rows_per_batch": round(rows / batches),
    }
    print("\nloader catch-up figures: " + json.dumps(figures, indent=1))
