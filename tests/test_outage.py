"""Nothing is lost when Kafka goes away, or when the web process dies with a full spool.

Each test runs its own broker and web server (stopping the shared ones would disturb the
other tests). Loads go to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from opentrack.events import TOPIC_OPENS_RAW, RawOpen
from opentrack.kafka_local import LocalKafka
from opentrack.settings import Settings
from opentrack.stack import Child
from opentrack.topics import ensure_topics
from tests.conftest import API_KEY, stack_env
from tests.test_backbone import CHROME
from tests.topics import topic_records


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


def topic_values(bootstrap: str, topic: str) -> list[bytes]:
    return [record.value for record in topic_records(bootstrap, topic)]


def raw_event_ids(bootstrap: str, email_id: str) -> list[str]:
    events = (RawOpen.from_bytes(value) for value in topic_values(bootstrap, TOPIC_OPENS_RAW))
    return [event.event_id for event in events if event.email_id == email_id]


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


# -- a spool segment claimed by another reader at the worst moment ------------------------

RACE_EVENTS = 20
RACE_SEGMENT_EVENTS = 10  # two segments: two claims, the second with a live full segment beside


def spool_race_writer(spool: str, topic: str, live_bootstrap: str, claimer: str) -> None:
    """A web process's publisher with Kafka away, and another spool reader (another process,
    or a second publisher of this one) that runs a full pass against a live broker exactly
    when a segment file has been created and its writer has not locked it yet.

    Run in a subprocess (``python -c``): the audit hook that picks the moment stays there.
    Prints the accepted event ids and how many claims ran, as JSON."""
    import fcntl

    from ingest import publish
    from opentrack.kafka_local import free_port

    publish.SEGMENT_EVENTS = RACE_SEGMENT_EVENTS
    spool_dir = Path(spool)
    other = publish.Publisher(lambda: live_bootstrap, spool_dir) if claimer == "sibling" else None
    claiming = False
    claims = 0

    def claim() -> None:
        nonlocal claims
        claims += 1
        if other is not None:  # the same pid: a sibling publisher of this process
            other.deliver_spool()
            return
        subprocess.run(
            [sys.executable, "-c", CLAIMER_CODE, spool, live_bootstrap],
            check=True, timeout=60,
        )

    def hook(event: str, args: tuple) -> None:
        nonlocal claiming
        if event != "fcntl.flock" or claiming or not args[1] & fcntl.LOCK_EX:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a spool thread's lock, not the writer's
        if not os.readlink(f"/proc/self/fd/{args[0]}").startswith(spool):
            return
        claiming = True  # the claimer's own locks must not claim again
        try:
            claim()
        finally:
            claiming = False

    sys.addaudithook(hook)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every event waits in the spool
    publisher = publish.Publisher(lambda: dead, spool_dir)
    ids = []
    for _ in range(RACE_EVENTS):
        event_id = str(uuid.uuid4())
        publisher.publish_record(topic, event_id, event_id.encode())
        ids.append(event_id)
    publisher.close(timeout=1)
    if other is not None:
        other.close(timeout=5)
    print(json.dumps({"ids": ids, "claims": claims}))


CLAIMER_CODE = """
import logging
import sys
from pathlib import Path
from ingest.publish import Publisher
logging.basicConfig(level=logging.WARNING, format="claimer %(levelname)s %(name)s: %(message)s")
logging.getLogger("ingest.publish").setLevel(logging.INFO)
publisher = Publisher(lambda: sys.argv[2], Path(sys.argv[1]))
publisher.deliver_spool()
publisher.close(timeout=5)
"""


@pytest.mark.parametrize("claimer", ["process", "sibling"])
def test_segment_claimed_while_being_created_loses_nothing(
    tmp_path: Path, kafka_broker: LocalKafka, claimer: str
) -> None:
    """The race of a failed outage run: another web process's spool pass found a segment in
    the window between its creation and its writer's lock, delivered its 0 events and deleted
    it; the writer then spooled into the deleted file, and its events were lost once their
    delivery failed. Every segment creation here meets a claimer in that window."""
    from ingest.publish import Publisher

    spool = tmp_path / "spool"
    spool.mkdir()
    topic = f"spool-race-{claimer}-{uuid.uuid4().hex[:8]}"
    code = ("import sys; from tests.test_outage import spool_race_writer; "
            "spool_race_writer(*sys.argv[1:])")
    done = subprocess.run(
        [sys.executable, "-c", code, str(spool), topic, kafka_broker.bootstrap, claimer],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    accepted = report["ids"]
    assert len(accepted) == RACE_EVENTS
    assert report["claims"] == RACE_EVENTS // RACE_SEGMENT_EVENTS, "a claim per segment made"

    drainer = Publisher(lambda: kafka_broker.bootstrap, spool)  # the next process to start
    try:
        wait_spool_empty(tmp_path, timeout=60)
    finally:
        drainer.close()
    delivered = {value.decode() for value in topic_values(kafka_broker.bootstrap, topic)}
    lost = [event_id for event_id in accepted if event_id not in delivered]
    assert not lost, f"{len(lost)} of {len(accepted)} accepted events lost: {done.stderr[-3000:]}"
