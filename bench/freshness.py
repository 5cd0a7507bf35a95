"""Freshness: time from a pixel load to the moment the CRM API shows it, on the local stack.

Starts its own local stack (Kafka, worker, loader, web; embedded chDB) in a temporary
folder, loads the pixel N times one after another, and after each load polls
GET /v1/emails/<id>/opens until ``raw_load_count`` has grown. Prints p50, p90, p99, max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import requests

from opentrack.kafka_local import free_port
from opentrack.settings import Settings
from opentrack.stack import Stack

AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=500, help="pixel loads to time (500)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="give up on one load after this many seconds (10)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="opentrack-freshness-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
        env.update(OPENTRACK_DATA_DIR=tmp, OPENTRACK_LISTEN=f"127.0.0.1:{free_port()}",
                   OPENTRACK_LOG_LEVEL="WARNING")
        settings = Settings.from_env(env)
        stack = Stack(settings, env)
        print("starting the local stack…", flush=True)
        stack.start()
        try:
            delays = measure(stack.base_url, settings.api_key, args.loads, args.timeout)
        finally:
            stack.stop()
    print(f"\nfreshness over {len(delays)} loads (pixel load → visible in the CRM API):")
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        print(f"  {label}: {percentile(delays, q) * 1000:7.1f} ms")
    print(f"  max: {max(delays) * 1000:7.1f} ms   (targets: p50 < 300 ms, p99 < 1000 ms)")


def measure(base: str, api_key: str, loads: int, timeout: float) -> list[float]:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key}"
    email_id = f"fresh-{int(time.time())}"
    pixel = http.post(f"{base}/v1/emails", json={
        "email_id": email_id, "profile_id": "bench", "person_type": "contact",
        "person_id": "b1", "template_id": "t", "subject": "s",
        "sent_at": "2026-01-01T00:00:00Z"}, timeout=10).json()["pixel_url"]
    state_url = f"{base}/v1/emails/{email_id}/opens"
    while http.get(state_url, timeout=10).status_code != 200:
        time.sleep(0.05)
    delays = []
    for i in range(loads):
        started = time.perf_counter()
        requests.get(pixel, headers={"User-Agent": AGENT}, timeout=10)
        while time.perf_counter() - started < timeout:
            if http.get(state_url, timeout=10).json()["raw_load_count"] > i:
                delays.append(time.perf_counter() - started)
                break
            time.sleep(0.005)
        else:
            raise SystemExit(f"load {i} not visible after {timeout}s")
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{loads} loads", flush=True)
    return delays


if __name__ == "__main__":
    main()
