"""Nothing is lost when Kafka goes away, or when the web process dies with a full spool.

Each test runs its own broker and web server (stopping the shared ones would disturb the
other tests). Loads go to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path

import requests
from kafka import KafkaConsumer, TopicPartition

from opentrack.events import TOPIC_OPENS_RAW, RawOpen
from opentrack.kafka_local import LocalKafka
from opentrack.settings import Settings
from opentrack.stack import Child
from opentrack.topics import ensure_topics
from tests.conftest import API_KEY, stack_env
from tests.test_backbone import CHROME


def start_web(env: dict[str, str], log_dir: Path) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    web = Child("web", ["web"])
    web.start(env, log_dir)
    base = f"http://{env['OPENTRACK_LISTEN']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/livez", timeout=1).status_code == 200:
                return web
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError("web did not start: " + (log_dir / "web.log").read_text()[-3000:])


def pixel_url(env: dict[str, str], email_id: str) -> str:
    from opentrack.tokens import TokenSigner

    return f"http://{env['OPENTRACK_LISTEN']}/o/{TokenSigner(env['OPENTRACK_SECRET']).sign(email_id)}.gif"


def raw_event_ids(bootstrap: str, email_id: str) -> list[str]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = consumer.partitions_for_topic(TOPIC_OPENS_RAW)
    tps = [TopicPartition(TOPIC_OPENS_RAW, p) for p in partitions]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    ids = []
    while any(consumer.position(tp) < offset for tp, offset in end.items()):
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                event = RawOpen.from_bytes(record.value)
                if event.email_id == email_id:
                    ids.append(event.event_id)
    consumer.close()
    return ids


def wait_spool_empty(data_dir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not list((data_dir / "spool").glob("*.jsonl")):
            return
        time.sleep(0.5)
    raise AssertionError(f"spool not drained: {list((data_dir / 'spool').glob('*'))}")


def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka").start()
    ensure_topics(broker.bootstrap, 4)
    env = stack_env(tmp_path / "data", broker.bootstrap, OPENTRACK_LOG_LEVEL="INFO")
    web = start_web(env, tmp_path / "logs")
    try:
        url = pixel_url(env, "outage-1")
        accepted = 0
        latencies: dict[str, list[float]] = {"up": [], "down": []}
        phase = "up"
        stop = threading.Event()

        def steady_load() -> None:
            nonlocal accepted
            session = requests.Session()
            end = time.monotonic() + 60  # bounded whatever happens
            while not stop.is_set() and time.monotonic() < end:
                started = time.perf_counter()
                response = session.get(url, headers={"User-Agent": CHROME}, timeout=5)
                latencies[phase].append(time.perf_counter() - started)
                if response.status_code == 200:
                    accepted += 1
                time.sleep(0.01)

        loader = threading.Thread(target=steady_load)
        loader.start()
        time.sleep(4)
        phase = "down"
        broker.stop()
        time.sleep(22)
        broker.start()
        phase = "up"
        time.sleep(5)
        stop.set()
        loader.join()

        wait_spool_empty(Path(env["OPENTRACK_DATA_DIR"]))
        ids = raw_event_ids(broker.bootstrap, "outage-1")
        print(f"\naccepted {accepted} loads; {len(set(ids))} distinct event ids in opens.raw, "
              f"{len(ids) - len(set(ids))} duplicate deliveries (dropped downstream by event_id)")
        for name, values in latencies.items():
            values.sort()
            print(f"pixel latency with the broker {name}: p50 "
                  f"{statistics.median(values) * 1000:.1f} ms, "
                  f"p99 {values[int(len(values) * 0.99)] * 1000:.1f} ms over {len(values)} loads")
        assert accepted > 500
        assert len(set(ids)) == accepted
    finally:
        web.stop()
        broker.stop()


def test_killed_web_process_spool_is_delivered_after_restart(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka").start()
    ensure_topics(broker.bootstrap, 4)
    env = stack_env(tmp_path / "data", broker.bootstrap)
    data_dir = Path(env["OPENTRACK_DATA_DIR"])
    broker.stop()  # Kafka is away: every load goes only to the spool
    web = start_web(env, tmp_path / "logs")
    try:
        url = pixel_url(env, "killed-1")
        for _ in range(200):
            assert requests.get(url, headers={"User-Agent": CHROME}, timeout=5).status_code == 200
        assert list((data_dir / "spool").glob("*.jsonl")), "the spool should hold the loads"
        os.killpg(web.process.pid, signal.SIGKILL)
        web.process.wait()
        web.process = None

        broker.start()
        web = start_web(env, tmp_path / "logs")
        wait_spool_empty(data_dir)
        ids = raw_event_ids(broker.bootstrap, "killed-1")
        assert len(set(ids)) == 200
    finally:
        web.stop()
        broker.stop()


def test_settings_of_the_tests_are_valid() -> None:
    assert Settings.from_env(stack_env(Path("/tmp/x"), "127.0.0.1:1")).api_key == API_KEY
