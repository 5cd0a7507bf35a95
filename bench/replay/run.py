"""Replay into the warehouse: events/s beside the raw consume rate of the same topic.

What it times is ``opentrack replay --from-beginning --into warehouse`` rebuilding a lost
embedded (chDB) warehouse: the loader process re-reads the worker's outputs
(``opens.processed``, ``email_state``), the sends and the engagement from Kafka and writes
them its own way (``warehouse.reload``), end to end, from starting the command until it
exits with every row written, then checks that the warehouse holds every row.

Set-up, once, on a fresh local broker (loopback, free ports): a labelled workload of N raw
loads and their sends and engagement (``opentrack.workload``), and the outputs the worker
makes of them, computed with the worker's own code (``streams.state`` and the packaged
rules), in the order the worker would see them, and published as the worker publishes them
(one state per event, keyed by email; nothing compacted yet: the reload's worst case).
Computing the outputs in-process instead of running the Faust worker keeps the set-up
minutes long instead of hours (the worker is far slower than the replay it feeds).

Each run: a fresh, empty warehouse and a loader whose group offsets are at the end of every
topic (as after a warehouse was lost: the loader will not load anything again by itself),
then the replay. Beside it, aiokafka reads ``opens.raw`` from beginning to end with no
processing. Prints per run and the medians over runs: replay events/s (every record the
reload read), raw loads/s (the raw loads the replay covered), the raw consume events/s and
the ratio of the first to the third.

    .venv/bin/python bench/replay/run.py               # 1,000,000 loads, 3 runs
    .venv/bin/python bench/replay/run.py --quick       # 50,000 loads
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from opentrack.events import (
    TOPIC_EMAIL_STATE,
    TOPIC_ENGAGEMENT,
    TOPIC_OPENS_PROCESSED,
    TOPIC_OPENS_RAW,
    TOPIC_SENDS,
)
from opentrack.kafka_local import LocalKafka
from opentrack.processes import stop_process_group
from opentrack.replay import LOADER_GROUP
from opentrack.settings import Settings
from opentrack.topics import ensure_topics
from warehouse.engines import RemoteEngine

TARGET_EVENTS_PER_SECOND = 100_000
BATCH_BYTES = 512 * 1024  # below the broker's 1 MiB message limit
LOADS_PER_EMAIL = 1.13  # what the labelled workload makes, about


@dataclass
class Filled:
    """What the topics hold, to check the rebuilt warehouse against."""

    loads: int
    sends: int
    opens: int  # distinct processed loads
    states: int  # distinct emails with a state
    engagement: int
    records: int  # every record the reload reads


@dataclass
class Run:
    replay_events_per_s: float
    raw_loads_per_s: float
    raw_consume_per_s: float
    seconds: float


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compute_outputs(n_loads: int, seed: int) -> tuple[dict[str, list[tuple[bytes, bytes]]], int]:
    """(key, value) records of every topic: the workload and what the worker makes of it;
    and how many distinct loads the worker emitted."""
    from opentrack.workload import generate
    from streams import state
    from streams.classify_adapter import classifier_from_settings

    started = time.monotonic()
    workload = generate(emails=int(n_loads / LOADS_PER_EMAIL) + 10, days=7, seed=seed,
                        start_ms=time.time_ns() // 1_000_000 - 21 * 86_400_000)
    loads = [labelled.raw for labelled in workload.loads[:n_loads]]
    log(f"  workload: {len(workload.sends)} sends, {len(loads)} loads, "
        f"{len(workload.engagements)} replies and unsubscribes "
        f"({time.monotonic() - started:.0f}s)")
    started = time.monotonic()
    settings = Settings.from_env({"OPENTRACK_DATA_DIR": tempfile.gettempdir()})
    classify = classifier_from_settings(settings)
    window_ms = int(settings.dedup_window * 1000)
    records: dict[str, state.EmailRecord] = {}
    processed: list[tuple[bytes, bytes]] = []
    states: list[tuple[bytes, bytes]] = []
    emitted: set[str] = set()

    def emit(email_id: str, outcome: state.Outcome) -> None:
        key = email_id.encode()
        processed.extend((key, opened.to_bytes()) for opened in outcome.opens)
        emitted.update(opened.event_id for opened in outcome.opens)
        if outcome.state is not None:
            states.append((key, outcome.state.to_bytes()))

    for send in workload.sends:  # the sends come before their loads, as in the pipeline
        record = records.setdefault(send.email_id, state.EmailRecord.from_dict(send.email_id,
                                                                                None))
        emit(send.email_id, state.apply_send(record, send, classify, window_ms))
    for i, raw in enumerate(loads, 1):
        record = records[raw.email_id]
        emit(raw.email_id, state.apply_load(record, raw, classify, window_ms))
        if i % 200_000 == 0:
            log(f"  worker outputs: {i}/{len(loads)} loads")
    log(f"  worker outputs: {len(processed)} processed opens, {len(states)} states "
        f"({time.monotonic() - started:.0f}s)")
    return {
        TOPIC_SENDS: [(s.email_id.encode(), s.to_bytes()) for s in workload.sends],
        TOPIC_OPENS_RAW: [(raw.email_id.encode(), raw.to_bytes()) for raw in loads],
        TOPIC_ENGAGEMENT: [(e.email_id.encode(), e.to_bytes()) for e in workload.engagements],
        TOPIC_OPENS_PROCESSED: processed,
        TOPIC_EMAIL_STATE: states,
    }, len(emitted)


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
    """Whole record batches through aiokafka, partitioned by key as the pipeline's
    producers do (murmur2), so that the topics stay co-partitioned."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=BATCH_BYTES)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        placed: dict[bytes, int] = {}
        batches = {p: producer.create_batch() for p in partitions}
        sent = []
        for key, value in records:
            p = placed.get(key)
            if p is None:
                p = placed[key] = partitioner(key, partitions, partitions)
            if batches[p].append(key=key, value=value, timestamp=None) is None:
                sent.append(await producer.send_batch(batches[p], topic, partition=p))
                batches[p] = producer.create_batch()
                batches[p].append(key=key, value=value, timestamp=None)
            if len(sent) >= 64:
                await asyncio.gather(*sent)
                sent.clear()
        for p, batch in batches.items():
            if batch.record_count():
                sent.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def fill(bootstrap: str, n_loads: int, seed: int) -> Filled:
    topics, opens = compute_outputs(n_loads, seed)
    filled = Filled(
        loads=len(topics[TOPIC_OPENS_RAW]), sends=len(topics[TOPIC_SENDS]), opens=opens,
        states=len({key for key, _ in topics[TOPIC_EMAIL_STATE]}),
        engagement=len(topics[TOPIC_ENGAGEMENT]),
        records=sum(len(topics[t]) for t in (TOPIC_SENDS, TOPIC_ENGAGEMENT,
                                              TOPIC_OPENS_PROCESSED, TOPIC_EMAIL_STATE)),
    )
    for topic in list(topics):
        started = time.monotonic()
        records = topics.pop(topic)
        asyncio.run(produce(bootstrap, topic, records))
        log(f"  produced {len(records)} records to {topic} ({time.monotonic() - started:.0f}s)")
    return filled


async def raw_consume(bootstrap: str) -> tuple[int, float]:
    """(records, records/s) of ``opens.raw`` read from beginning to end, no processing."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(TOPIC_OPENS_RAW, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    try:
        tps = [TopicPartition(TOPIC_OPENS_RAW, p)
               for p in consumer.partitions_for_topic(TOPIC_OPENS_RAW) or ()]
        total = sum((await consumer.end_offsets(tps)).values())
        seen = 0
        started = time.perf_counter()
        while seen < total:
            polled = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            seen += sum(len(records) for records in polled.values())
        return seen, seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def loader_offsets_at_end(bootstrap: str) -> None:
    """The loader's group has read everything: it will not rebuild the warehouse itself."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=LOADER_GROUP,
                             enable_auto_commit=False)
    try:
        topics = (TOPIC_SENDS, TOPIC_OPENS_PROCESSED, TOPIC_EMAIL_STATE, TOPIC_ENGAGEMENT,
                  "erasures")
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        consumer.commit({tp: OffsetAndMetadata(ends[tp], "", -1) for tp in tps})
    finally:
        consumer.close()


def start_loader(env: dict[str, str], log_path: Path, socket: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        loader = subprocess.Popen([sys.executable, "-m", "opentrack.cli", "loader"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if loader.poll() is not None:
            raise RuntimeError(f"the loader exited; see {log_path}")
        try:
            RemoteEngine(socket, timeout=5).query("SELECT 1 AS ok")
            return loader
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.3)
    stop_process_group(loader)
    raise RuntimeError(f"the loader did not answer in 120 s; see {log_path}")


def check_warehouse(socket: Path, filled: Filled) -> None:
    engine = RemoteEngine(socket, timeout=120)
    counts = engine.query(
        "SELECT (SELECT count() FROM sends FINAL) AS sends, (SELECT count() FROM opens FINAL) "
        "AS opens, (SELECT count() FROM email_state FINAL) AS states, "
        "(SELECT count() FROM engagement FINAL) AS engagement, "
        "(SELECT count() FROM email_facts FINAL) AS facts")[0]
    expected = {"sends": filled.sends, "opens": filled.opens, "states": filled.states,
                "engagement": filled.engagement, "facts": filled.sends}
    if counts != expected:
        raise AssertionError(f"the rebuilt warehouse holds {counts}, expected {expected}")


def one_run(tmp: Path, bootstrap: str, filled: Filled, run: int) -> Run:
    read, raw_rate = asyncio.run(raw_consume(bootstrap))
    data = tmp / f"run-{run}"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
    env.update(OPENTRACK_DATA_DIR=str(data), OPENTRACK_KAFKA_BOOTSTRAP=bootstrap,
               OPENTRACK_LOG_LEVEL="WARNING")
    settings = Settings.from_env(env)
    loader_offsets_at_end(bootstrap)
    loader = start_loader(env, data / "loader.log", settings.warehouse_socket)
    try:
        started = time.perf_counter()
        replay = subprocess.run(
            [sys.executable, "-m", "opentrack.cli", "replay", "--from-beginning", "--into",
             "warehouse"], env=env, stdout=subprocess.PIPE, text=True, timeout=3600)
        seconds = time.perf_counter() - started
        if replay.returncode != 0:
            raise RuntimeError(f"the replay failed ({replay.returncode}):\n{replay.stdout}")
        check_warehouse(settings.warehouse_socket, filled)
    finally:
        stop_process_group(loader)
    lines = replay.stdout.strip().splitlines()
    summary = lines[next((i for i, line in enumerate(lines) if line.startswith("reloaded")), 0):]
    reloaded = re.search(r"reloaded the warehouse from (\d+) events", replay.stdout)
    events = int(reloaded.group(1)) if reloaded else 0
    if events != filled.records:
        raise AssertionError(f"the replay read {events} records, the topics hold "
                             f"{filled.records}:\n{replay.stdout}")
    result = Run(events / seconds, filled.loads / seconds, raw_rate, seconds)
    log("\n".join(f"    {line}" for line in summary))
    print(f"run {run}: replay {events} events in {seconds:.1f}s: "
          f"{result.replay_events_per_s:,.0f} events/s ({result.raw_loads_per_s:,.0f} raw "
          f"loads/s) | raw consume of {TOPIC_OPENS_RAW} ({read} records) "
          f"{raw_rate:,.0f} events/s | ratio {result.replay_events_per_s / raw_rate:.2f}",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=1_000_000,
                        help="raw loads to replay (1000000)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (3)")
    parser.add_argument("--quick", action="store_true", help="50,000 loads, for a smoke test")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    args = parser.parse_args()
    loads = 50_000 if args.quick else args.loads
    with tempfile.TemporaryDirectory(prefix="opentrack-bench-replay-") as name:
        tmp = Path(name)
        log(f"starting a local Kafka broker in {tmp}")
        broker = LocalKafka(tmp / "kafka").start()
        try:
            ensure_topics(broker.bootstrap, 4)
            log(f"filling the topics with {loads} raw loads and what the worker makes of them")
            filled = fill(broker.bootstrap, loads, args.seed)
            log(f"  {filled.records} records for the reload: {filled.opens} opens, "
                f"{filled.states} emails' states, {filled.sends} sends, "
                f"{filled.engagement} replies and unsubscribes")
            runs = []
            for run in range(1, args.runs + 1):
                log(f"run {run}/{args.runs}: empty warehouse, replay --from-beginning "
                    "--into warehouse")
                runs.append(one_run(tmp, broker.bootstrap, filled, run))
        finally:
            broker.stop()
    replay = statistics.median(r.replay_events_per_s for r in runs)
    loads_rate = statistics.median(r.raw_loads_per_s for r in runs)
    raw = statistics.median(r.raw_consume_per_s for r in runs)
    print(f"\nmedian over {len(runs)} runs of {loads} raw loads ({filled.records} records "
          f"reloaded): replay {replay:,.0f} events/s ({loads_rate:,.0f} raw loads/s), "
          f"raw consume {raw:,.0f} events/s, ratio {replay / raw:.2f} "
          f"(target: replay >= {TARGET_EVENTS_PER_SECOND:,} events/s into chDB)")


if __name__ == "__main__":
    main()
