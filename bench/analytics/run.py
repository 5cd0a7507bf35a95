"""Analytics latency: the comparison by template, by subject and by sequence step on a big
embedded warehouse (target: p50 < 200 ms each).

Fills a fresh chDB warehouse in a temporary folder (or ``--data-dir``) with synthetic rows
through the loader's write path (``warehouse.loader.write_batch``, in big batches): sends,
processed opens (some re-decided with a higher revision, as the worker emits them), per-email
states and engagements - and, as the loader does, the per-email facts of each batch's emails
(``warehouse.facts``). Then runs each comparison ``--runs`` times and prints p50 / p99 /
max and the CPU time, first on the warehouse as loaded, then after ``OPTIMIZE TABLE ...
FINAL`` (the state background merges reach on a warehouse that is not being written). The
CPU column is the steadier figure on a shared machine.

    .venv/bin/python bench/analytics/run.py                      # 10M opens, 1M emails
    .venv/bin/python bench/analytics/run.py --opens 1000000 --emails 100000

Comparisons, send timing and follow-ups read ``email_facts``: one short row per email, not
the opens. Open timing still groups the opens (the time of each open is what it shows). A
``--data-dir`` of an older warehouse is migrated first, which fills its facts (timed). The
last section times the loader's extra work per batch: recomputing the facts of the emails a
batch touched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dashboards import analytics  # noqa: E402
from dashboards.params import Filters  # noqa: E402
from warehouse import facts  # noqa: E402
from warehouse.engines import ChdbEngine, Engine  # noqa: E402
from warehouse.loader import write_batch  # noqa: E402
from warehouse.schema import migrate  # noqa: E402

DAY_MS = 86_400_000
START_MS = 1_767_225_600_000  # 2026-01-01
DAYS = 90
TEMPLATES = [f"template_{i:02d}" for i in range(12)]
SUBJECTS_PER_TEMPLATE = 3
SEQUENCES = [("seq-a", 3), ("seq-b", 2), ("seq-c", 4), ("", 1)]  # "" = one-off sends
PROFILES = [f"profile-{i}" for i in range(20)]
CLASSES = np.array(["human", "proxy", "machine"])
CLASS_SHARE = [0.45, 0.20, 0.35]


def hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    """n random 32-hex-digit ids (like the pipeline's UUIDs), fast."""
    text = rng.bytes(16 * n).hex()
    return [text[i:i + 32] for i in range(0, 32 * n, 32)]


def batches(emails: int, opens: int, batch_emails: int, seed: int
            ) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """Rows per table for ``batch_emails`` emails at a time, ``opens / emails`` each on
    average (40 % of emails never opened, the rest a geometric number of loads)."""
    rng = np.random.default_rng(seed)
    per_opener = opens / emails / 0.6
    for first in range(0, emails, batch_emails):
        n = min(batch_emails, emails - first)
        email_ids = hex_ids(rng, n)
        template = rng.integers(0, len(TEMPLATES), n)
        subject = rng.integers(0, SUBJECTS_PER_TEMPLATE, n)
        sequence = rng.integers(0, len(SEQUENCES), n)
        step = np.array([rng.integers(1, SEQUENCES[s][1] + 1) for s in sequence])
        profile = rng.integers(0, len(PROFILES), n)
        sent_at = START_MS + rng.integers(0, DAYS * DAY_MS, n)
        person = rng.random(n) < 0.7
        opened = rng.random(n) < 0.6
        loads = np.where(opened, rng.geometric(1 / per_opener, n), 0)
        sends, states, engagement, open_rows = [], [], [], []
        for i, email_id in enumerate(email_ids):
            seq_id, _ = SEQUENCES[sequence[i]]
            t = TEMPLATES[template[i]]
            sends.append((
                email_id, PROFILES[profile[i]], "candidate" if person[i] else "contact",
                f"person-{first + i}", t, f"{t} subject {subject[i]}", seq_id,
                int(step[i]) if seq_id else 0, int(sent_at[i]), 1, int(sent_at[i]),
            ))
            k = int(loads[i])
            if k:
                at = np.sort(sent_at[i] + rng.exponential(6 * 3600_000, k).astype(np.int64))
                cls = rng.choice(CLASSES, k, p=CLASS_SHARE)
                counted = rng.random(k) < 0.85
                counted[0] = True
                ids = hex_ids(rng, k)
                open_rows += [(ids[j], email_id, int(at[j]), str(cls[j]), "", int(counted[j]),
                               "fp", "", "", "", 1) for j in range(k)]
                if rng.random() < 0.05:  # a load re-decided later: revision 2 flips it
                    open_rows.append((ids[-1], email_id, int(at[-1]), str(cls[-1]), "",
                                      int(not counted[-1]), "fp", "", "", "", 2))
                    counted[-1] = not counted[-1]
                human = counted & (cls != "machine")
                total, humans = int(counted.sum()), int(human.sum())
                states.append((
                    email_id, int(total > 0), total, humans, total - humans, k,
                    int(at[counted][0]) if total else 0, int(at[counted][-1]) if total else 0,
                    int(at[human][-1]) if humans else 0, k, int(at[human][0]) if humans else 0,
                ))
            roll = rng.random()
            if roll < (0.12 if k else 0.01):
                engagement.append((hex_ids(rng, 1)[0], email_id, "reply",
                                   int(sent_at[i]) + DAY_MS))
            elif roll > 0.985:
                engagement.append((hex_ids(rng, 1)[0], email_id, "unsubscribe",
                                   int(sent_at[i]) + DAY_MS))
        yield {"sends": sends, "opens": open_rows, "email_state": states,
               "engagement": engagement}


def fill(engine: Engine, emails: int, opens: int, batch_emails: int, seed: int) -> dict:
    counts = dict.fromkeys(("sends", "opens", "email_state", "engagement"), 0)
    started = time.perf_counter()
    for tables in batches(emails, opens, batch_emails, seed):
        write_batch(engine, tables)
        for table, rows in tables.items():
            counts[table] += len(rows)
        elapsed = time.perf_counter() - started
        print(f"  {counts['sends']:>10,} emails  {counts['opens']:>11,} opens  "
              f"{elapsed:6.0f} s", flush=True)
    return counts


def timed(run: Callable[[], Any], runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of each run. chDB runs inside this process, so its
    CPU time (all threads) shows the work apart from what other processes on the machine
    take from it."""
    run()  # warm: first reads load marks and column files into the caches
    wall, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    return wall, cpu


def print_times(name: str, wall: list[float], cpu: list[float]) -> None:
    p99 = statistics.quantiles(wall, n=100, method="inclusive")[-1] if len(wall) > 1 else wall[0]
    print(f"  {name:32} {statistics.median(wall):8.0f} {p99:8.0f} {max(wall):8.0f} "
          f"{statistics.median(cpu):8.0f}", flush=True)


HEADER = f"  {'query':32} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cpu p50':>8}"


def report(engine: Engine, runs: int) -> None:
    everything = Filters()
    one_profile = Filters(profile_id=PROFILES[0])
    month = Filters(start=START_MS, end=START_MS + 30 * DAY_MS)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("compare by template", lambda: analytics.compare(engine, "template", everything)),
        ("compare by subject", lambda: analytics.compare(engine, "subject", everything)),
        ("compare by sequence step",
         lambda: analytics.compare(engine, "sequence_step", everything)),
        ("  by template, one profile",
         lambda: analytics.compare(engine, "template", one_profile)),
        ("  by template, one month", lambda: analytics.compare(engine, "template", month)),
        ("follow-ups (100, one profile)",
         lambda: analytics.follow_ups(engine, one_profile, limit=100)),
        ("timing (weekday x hour)", lambda: analytics.timing(engine, everything)),
    ]
    print(HEADER)
    for name, run in cases:
        print_times(name, *timed(run, runs))


def refresh_cost(engine: Engine, runs: int, seed: int) -> None:
    """The loader's extra work per batch: the facts of the emails it touched, recomputed
    from the tables and inserted (the same rows again here: nothing changes)."""
    ids = [r["email_id"] for r in engine.query("SELECT email_id FROM sends LIMIT 100000")]
    rng = np.random.default_rng(seed)
    print(HEADER)
    for touched in (10, 100, 1000, 10000):
        sample = [ids[i] for i in rng.choice(len(ids), min(touched, len(ids)), replace=False)]
        print_times(f"refresh {touched:,} emails", *timed(
            lambda sample=sample: facts.refresh(engine, sample), runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opens", type=int, default=10_000_000, help="loads (10M)")
    parser.add_argument("--emails", type=int, default=1_000_000, help="sends (1M)")
    parser.add_argument("--batch-emails", type=int, default=50_000,
                        help="emails per write_batch call (50k: about 500k opens)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per query (15)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the warehouse here (and reuse it if it is already full)")
    args = parser.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="opentrack-bench-analytics-"))
    engine = ChdbEngine(data_dir)
    started = time.perf_counter()
    migrated = migrate(engine)
    have = engine.query("SELECT count() AS n FROM sends")[0]["n"]
    print(f"warehouse: {data_dir} (chDB, {os.cpu_count()} CPUs)")
    if migrated and have:
        print(f"migrated {migrated} in {time.perf_counter() - started:.1f} s "
              f"(facts filled for {have:,} sends)")
    if have == 0:
        print(f"filling: {args.emails:,} emails, about {args.opens:,} opens")
        started = time.perf_counter()
        counts = fill(engine, args.emails, args.opens, args.batch_emails, args.seed)
        print(f"filled in {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{table} {n:,}" for table, n in counts.items()))
    else:
        print(f"reusing {have:,} sends")
    parts = engine.query("SELECT table, count() AS parts FROM system.parts WHERE active "
                         "AND database = currentDatabase() GROUP BY table ORDER BY table")
    print("active parts: " + ", ".join(f"{p['table']} {p['parts']}" for p in parts))
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"\nas loaded ({args.runs} runs each):")
    report(engine, args.runs)
    for table in ("sends", "opens", "email_state", "engagement", "email_facts"):
        engine.execute(f"OPTIMIZE TABLE {table} FINAL")
    print(f"\nafter OPTIMIZE TABLE ... FINAL ({args.runs} runs each):")
    report(engine, args.runs)
    print("\nthe loader's extra work per batch: recompute the touched emails' facts")
    refresh_cost(engine, args.runs, args.seed)
    print(f"\nload average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    engine.close()


if __name__ == "__main__":
    main()
