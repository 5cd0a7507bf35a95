"""Accuracy of classification and per-email state on a labelled workload, without services.

Generates a seeded workload (opentrack.workload), classifies every load with the real rules
(streams/rules.toml), feeds the sends and loads to the worker's pure state code
(streams.state, with the worker's own classifier adapter), and prints precision and recall
per class, the misclassified loads by what made them, and how many emails show a state
different from the truth.

    .venv/bin/python bench/accuracy.py                 # 5000 emails, seed 1
    .venv/bin/python bench/accuracy.py --emails 50000 --seed 7 --shuffle
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from opentrack.accuracy import classify_offline, format_report, report, run_state_machine
from opentrack.settings import Settings
from opentrack.workload import Workload, generate
from streams.classify import DEFAULT_SCANNER_SECONDS
from streams.classify_adapter import classifier_from_settings

T = TypeVar("T")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Everything runs in this process: no Kafka, worker or warehouse is needed.",
    )
    parser.add_argument("--emails", type=int, default=5000, help="sends to generate (5000)")
    parser.add_argument("--days", type=float, default=7.0, help="sends spread over (7)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    parser.add_argument(
        "--scanner-seconds", type=float, default=DEFAULT_SCANNER_SECONDS,
        help="delivery-time window, for the generator and the classifier (%(default)s)",
    )
    parser.add_argument(
        "--dedup-window", type=float, default=60.0,
        help="seconds within which one client's repeated load is not counted (60)",
    )
    parser.add_argument(
        "--shuffle", action="store_true",
        help="feed the state code the events in random order (state must not change)",
    )
    return parser.parse_args(argv)


def timed(label: str, timings: dict[str, float], fn: Callable[[], T]) -> T:
    began = time.perf_counter()
    result = fn()
    timings[label] = time.perf_counter() - began
    return result


def describe(workload: Workload) -> str:
    """What was generated: the mail setups of the recipients and the loads by kind."""
    setups = Counter(workload.setups[send.person_id] for send in workload.sends)
    kinds = Counter(load.kind for load in workload.loads)
    engagements = Counter(e.kind for e in workload.engagements)
    sends = len(workload.sends) or 1
    lines = [
        f"{len(workload.sends)} sends, {len(workload.loads)} loads, "
        + ", ".join(f"{n} {kind}s ({100 * n / sends:.1f}%)" for kind, n in engagements.items()),
        "sends by recipient's mail setup: "
        + ", ".join(f"{setup} {100 * n / sends:.1f}%" for setup, n in setups.most_common()),
        "loads by kind: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings.from_env({  # given secrets, so that nothing is written to disk
        "OPENTRACK_SECRET": "bench-accuracy",
        "OPENTRACK_API_KEY": "bench-accuracy",
        "OPENTRACK_SCANNER_SECONDS": str(args.scanner_seconds),
        "OPENTRACK_DEDUP_WINDOW": str(args.dedup_window),
    })
    window_ms = int(settings.dedup_window * 1000)
    timings: dict[str, float] = {}
    workload = timed("generate", timings, lambda: generate(
        args.emails, days=args.days, seed=args.seed, scanner_seconds=args.scanner_seconds,
    ))
    verdicts = timed("classify", timings, lambda: classify_offline(
        workload, settings.scanner_seconds
    ))
    states = timed("state", timings, lambda: run_state_machine(
        workload, classifier_from_settings(settings), window_ms,
        shuffle_seed=args.seed if args.shuffle else None,
    ))
    result = timed("report", timings, lambda: report(workload, verdicts, states, window_ms))
    print(describe(workload))
    print(", ".join(f"{label} {seconds:.2f} s" for label, seconds in timings.items()))
    print()
    print(format_report(result))


if __name__ == "__main__":
    main()
