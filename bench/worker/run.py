"""Worker throughput beside the raw consume rate of the same topic.

In one run, on a fresh local broker: N labelled raw loads (and their sends) are produced to
``opens.raw``; then (1) aiokafka consumes them with no processing, (2) Faust alone hands
them to an agent that does nothing (``faust_alone.py``: the ceiling of any Faust agent
here), and (3) the OpenTrack worker processes the same N events and the sends (replay drop,
classify, dedup, state, emit). The worker's rate is taken from the timestamps of its first
and last output records, so Faust's start-up is not counted. Prints events/s for each, the
worker's ratio to both, and the medians over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from opentrack.events import TOPIC_EMAIL_STATE, TOPIC_OPENS_RAW, TOPIC_SENDS
from opentrack.kafka_local import LocalKafka
from opentrack.topics import ensure_topics
from opentrack.workload import generate


def produce(bootstrap: str, events: list, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for event in events:
        producer.send(topic, key=event.key.encode(), value=event.to_bytes())
    producer.flush()
    producer.close()


async def raw_consume(bootstrap: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(TOPIC_OPENS_RAW, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        seen, started = 0, None
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if started is None and batches:
                started = time.perf_counter()
            seen += sum(len(records) for records in batches.values())
        return n / (time.perf_counter() - (started or time.perf_counter()))
    finally:
        await consumer.stop()


def output_span(bootstrap: str, expected: int, timeout: float) -> tuple[int, float]:
    """(records, seconds between the first and last) of the worker's state output."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(TOPIC_EMAIL_STATE, p)
           for p in consumer.partitions_for_topic(TOPIC_EMAIL_STATE) or []]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    first = last = None
    count = 0
    deadline = time.monotonic() + timeout
    idle_since = time.monotonic()
    while time.monotonic() < deadline:
        batches = consumer.poll(timeout_ms=500)
        for records in batches.values():
            for record in records:
                count += 1
                first = record.timestamp if first is None else min(first, record.timestamp)
                last = record.timestamp if last is None else max(last, record.timestamp)
        if batches:
            idle_since = time.monotonic()
        elif count and (count >= expected or time.monotonic() - idle_since > 15):
            break
    consumer.close()
    return count, ((last or 0) - (first or 0)) / 1000


def faust_alone(bootstrap: str, n: int, tmp: Path, env: dict[str, str]) -> float:
    out = tmp / "faust-alone.txt"
    subprocess.run([sys.executable, str(Path(__file__).with_name("faust_alone.py")),
                    "--bootstrap", bootstrap, "--events", str(n), "--out", str(out),
                    "--data-dir", str(tmp / "faust-alone")], env=env, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return float(out.read_text()) if out.exists() else 0.0


def one_run(n_loads: int, seed: int) -> tuple[float, float, float]:
    emails = int(n_loads / 1.12)
    workload = generate(emails=emails, days=7, seed=seed,
                        start_ms=time.time_ns() // 1_000_000 - 21 * 86_400_000)
    loads = [load.raw for load in workload.loads][:n_loads]
    with tempfile.TemporaryDirectory(prefix="opentrack-bench-worker-") as tmp:
        broker = LocalKafka(Path(tmp) / "kafka").start()
        try:
            ensure_topics(broker.bootstrap, 4)
            produce(broker.bootstrap, workload.sends, TOPIC_SENDS)
            produce(broker.bootstrap, loads, TOPIC_OPENS_RAW)
            raw_rate = asyncio.run(raw_consume(broker.bootstrap, len(loads)))
            env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
            faust_rate = faust_alone(broker.bootstrap, len(loads), Path(tmp), env)
            env.update(OPENTRACK_DATA_DIR=str(Path(tmp) / "data"),
                       OPENTRACK_KAFKA_BOOTSTRAP=broker.bootstrap, OPENTRACK_LOG_LEVEL="WARNING")
            worker = subprocess.Popen([sys.executable, "-m", "opentrack.cli", "worker"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                # one state per send, one per load: every event emits one state record
                expected = len(workload.sends) + len(loads)
                count, seconds = output_span(broker.bootstrap, expected, timeout=900)
            finally:
                worker.terminate()
                worker.wait(30)
            worker_rate = (len(workload.sends) + len(loads)) / seconds if seconds else 0.0
            to_alone = f"{worker_rate / faust_rate:.2f}" if faust_rate else "n/a (it failed)"
            print(f"  raw consume {raw_rate:9.0f} events/s | Faust alone {faust_rate:7.0f} "
                  f"events/s | worker {worker_rate:7.0f} events/s ({count} state records) | ratio "
                  f"{worker_rate / raw_rate:.2f} to raw, {to_alone} to Faust alone", flush=True)
            return raw_rate, faust_rate, worker_rate
        finally:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=100_000, help="raw loads per run (100000)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (3)")
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}: {args.loads} loads", flush=True)
        results.append(one_run(args.loads, seed=run + 1))
    raw = statistics.median(r for r, _, _ in results)
    alone = statistics.median(f for _, f, _ in results)
    worker = statistics.median(w for _, _, w in results)
    print(f"\nmedian over {args.runs} runs: raw consume {raw:.0f} events/s, Faust alone "
          f"{alone:.0f} events/s, worker {worker:.0f} events/s, ratio {worker / raw:.2f} to raw "
          "(targets: ratio >= 0.5, worker >= 20000 events/s), "
          + (f"{worker / alone:.2f} to Faust alone" if alone else "Faust alone failed"))


if __name__ == "__main__":
    main()
