"""Faust alone: how fast Faust hands raw events to an agent that does nothing with them.

Run by ``run.py`` as its own process, with the worker's Faust settings that matter here
(raw serializers, no web server, the worker's quiet logging), no table and no output: the
ceiling of any Faust agent on this machine. Writes events/s to the file it is given.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

import faust

from opentrack.events import TOPIC_OPENS_RAW
from streams.worker import QuietWorker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--events", type=int, required=True, help="events to take, then stop")
    parser.add_argument("--out", type=Path, required=True, help="file for the events/s")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    app = faust.App(
        f"opentrack-bench-faust-alone-{uuid.uuid4().hex[:8]}",  # a new group: from the start
        broker=f"kafka://{args.bootstrap}", store="memory://", datadir=str(args.data_dir),
        web_enabled=False, consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(TOPIC_OPENS_RAW, key_serializer="raw", value_serializer="raw")
    taken, started = 0, 0.0

    @app.agent(topic)
    async def count(stream: faust.StreamT) -> None:
        nonlocal taken, started
        async for _ in stream.events():
            if not taken:
                started = time.perf_counter()
            taken += 1
            if taken >= args.events:
                rate = taken / (time.perf_counter() - started)
                args.out.write_text(f"{rate:.0f}\n")
                os._exit(0)  # measured: no need for Faust's graceful stop

    QuietWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
