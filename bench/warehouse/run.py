"""CRM reads and the loader's write rate on a big embedded (chDB) warehouse.

Fills a fresh chDB warehouse with a recruiting CRM's traffic, built as the pipeline's own
events (``SendRegistered``, ``ProcessedOpen``, ``EmailState``, ``Engagement`` from
``opentrack.events``) and written through the loader's path: each event is serialised as
the worker publishes it, then ``warehouse.loader.Loader.write`` writes loader-sized
batches of (topic, bytes) as ``Loader.run`` writes a polled batch (on chDB the JSON fast
path, ``warehouse.loader.TableWriter``). Then it times the reads
behind the CRM API (``warehouse.reads``):

- the state of one email by id (``email_opens``)            target p99 < 10 ms
- the Opened folder, first page and a deep page (keyset)     target p99 < 50 ms
- the related emails of a person (``person_emails``)
- the loader's rows/s beside a plain bulk insert of the same rows (a pandas frame through
  chDB's ``Python()`` table function) into same-shaped tables: target ratio >= 0.5

Each read is timed ``--queries`` times per round over ``--rounds`` rounds; each round gives a
p50 and a p99 and the report prints their medians over the rounds. The machine is shared
with other agents' builds and benchmarks (2 cores), so single figures are noisy: the
medians and the CPU time this process spent (chDB runs in-process) are what to compare.

    .venv/bin/python bench/warehouse/run.py                 # 1M emails, 10M opens
    .venv/bin/python bench/warehouse/run.py --quick         # 50k emails, 500k opens
    .venv/bin/python bench/warehouse/run.py --data-dir /tmp/wh   # keep it; reuse when full
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opentrack.events import (  # noqa: E402
    EmailState,
    Engagement,
    Event,
    ProcessedOpen,
    SendRegistered,
    now_ms,
)
from warehouse import reads  # noqa: E402
from warehouse.engines import ChdbEngine, Engine, RemoteEngine  # noqa: E402
from warehouse.loader import SINKS, Loader, rows_by_table  # noqa: E402
from warehouse.schema import migrate  # noqa: E402
from warehouse.service import QueryServer  # noqa: E402

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 86_400_000
SENT_DAYS = 60  # sends spread over the last two months
DEDUP_WINDOW_MS = 60 * SECOND_MS
LOADER_BATCH = inspect.signature(Loader).parameters["max_records"].default
TABLE_COLUMNS = {table: columns for table, columns, _, _ in SINKS.values()}

# (weight, load_class, reason, client_family, os_family, device_family): who loads pixels.
READERS = (
    (30, "human", "", "Outlook", "Windows", "Other"),
    (14, "human", "", "Chrome", "Windows", "Other"),
    (12, "human", "", "Mobile Safari UI/WKWebView", "iOS", "iPhone"),
    (6, "human", "", "Chrome Mobile WebView", "Android", "Samsung SM-S918B"),
    (20, "proxy", "gmail_proxy", "GoogleImageProxy", "Other", "Other"),
    (3, "proxy", "yahoo_proxy", "YahooMailProxy", "Other", "Other"),
)
PREFETCHERS = (  # machines that load right after delivery, once
    (60, "machine", "apple_mpp", "Apple Mail", "Mac OS X", "Mac"),
    (25, "machine", "scanner_microsoft", "Other", "Other", "Other"),
    (15, "machine", "delivery_scan", "Python Requests", "Other", "Other"),
)


@dataclass
class Shape:
    """How the generated traffic is distributed (chosen to look like a recruiting CRM)."""

    emails: int
    opens: int
    seed: int = 1
    profiles: int = 300  # sender profiles, a few of them sending most (Zipf-like weights)
    templates: int = 40
    open_rate: float = 0.4  # of emails with a pixel, ~40 % get opened at least once
    prefetch_rate: float = 0.3  # of opened emails, loaded first by MPP or a scanner
    burst_rate: float = 0.35  # of loads, a repeated load seconds after the previous one
    tracking_off_profiles: float = 0.02
    reply_rate: float = 0.08
    unsubscribe_rate: float = 0.01

    @property
    def loads_per_opened(self) -> float:
        """Raised by a tenth: the loads of recent sends that would come after now are not
        made, about that share at these settings."""
        return max(1.0, 1.12 * self.opens / max(1, self.emails * self.open_rate))


@dataclass
class Counts:
    emails: int = 0
    opened: int = 0
    messages: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_COLUMNS, 0))


def fingerprint(*parts: str) -> str:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).hexdigest()


class Traffic:
    """Sends, the loads of their pixels as the worker emits them, states and engagement."""

    def __init__(self, shape: Shape, now: int) -> None:
        self.shape = shape
        self.now = now
        self.rnd = random.Random(shape.seed)
        self.profiles = [f"profile-{i:03d}" for i in range(shape.profiles)]
        self.profile_weights = [1 / (i + 1) ** 0.8 for i in range(shape.profiles)]
        self.tracking_off = set(self.rnd.sample(
            self.profiles, max(1, int(shape.profiles * shape.tracking_off_profiles))))
        self.template_open_rate = [
            shape.open_rate + self.rnd.uniform(-0.1, 0.1) for _ in range(shape.templates)]
        self.person_number = 0
        self.person: tuple[str, str] = ("candidate", "")
        self.person_left = 0
        self.counts = Counts()

    def _next_person(self) -> tuple[str, str]:
        """Candidates get a few emails, contacts (client managers) many."""
        if self.person_left == 0:
            self.person_number += 1
            contact = self.rnd.random() < 0.2
            mean = 12 if contact else 3
            self.person = ("contact" if contact else "candidate", f"person-{self.person_number}")
            self.person_left = 1 + int(self.rnd.expovariate(1 / (mean - 1)))
        self.person_left -= 1
        return self.person

    def _id(self) -> str:
        return f"{self.rnd.getrandbits(128):032x}"

    def send(self, number: int) -> SendRegistered:
        rnd = self.rnd
        profile = rnd.choices(self.profiles, self.profile_weights)[0]
        person_type, person_id = self._next_person()
        template = rnd.randrange(self.shape.templates)
        in_sequence = rnd.random() < 0.6
        # sends come in time order over the last SENT_DAYS, as the CRM registers them
        step = (SENT_DAYS * DAY_MS - 5 * MINUTE_MS) // self.shape.emails
        sent_at = self.now - SENT_DAYS * DAY_MS + number * step + rnd.randrange(step)
        return SendRegistered(
            email_id=self._id(), profile_id=profile,  # random, like UUIDs: lookups spread
            person_type=person_type, person_id=person_id, template_id=f"template-{template:02d}",
            subject=f"template-{template:02d} subject {rnd.randrange(3)}", sent_at=sent_at,
            sequence_id=f"seq-{template % 8}" if in_sequence else None,
            sequence_step=rnd.randint(1, 5) if in_sequence else None,
            tracking=profile not in self.tracking_off, registered_at=sent_at + rnd.randrange(200),
        )

    def _load_times(self, send: SendRegistered, k: int) -> list[tuple[int, int]]:
        """(time, reader index) of up to ``k`` loads: the first hours after the send, the
        next ones about half a day apart, a third of them repeated loads seconds after the
        previous one by the same reader. Loads that would come after now have not happened
        yet: recent sends have fewer (the first one comes by now at the latest)."""
        rnd = self.rnd
        latest = self.now - 2 * MINUTE_MS
        readers = 1 + (k > 4) + (k > 20) + (rnd.random() < 0.1)
        t = min(latest, send.sent_at + MINUTE_MS + int(rnd.expovariate(1 / (4 * HOUR_MS))))
        loads = [(t, rnd.randrange(readers))]
        while len(loads) < k:
            if rnd.random() < self.shape.burst_rate:
                t, reader = t + rnd.randrange(SECOND_MS, 20 * SECOND_MS), loads[-1][1]
            else:
                t, reader = t + int(rnd.expovariate(1 / (12 * HOUR_MS))), rnd.randrange(readers)
            if t > latest:
                break
            loads.append((t, reader))
        return loads

    def opens(self, send: SendRegistered, k: int) -> list[Event]:
        """The processed opens of ``k`` loads and the states the worker emits: after the
        first load and after the last (states in between are replaced in the warehouse)."""
        rnd = self.rnd
        readers = [rnd.choices(READERS, [r[0] for r in READERS])[0] for _ in range(4)]
        fingerprints = [fingerprint(send.person_id, str(i)) for i in range(5)]
        loads = self._load_times(send, k)
        k = len(loads)
        if rnd.random() < self.shape.prefetch_rate:
            machine = rnd.choices(PREFETCHERS, [p[0] for p in PREFETCHERS])[0]
            readers.append(machine)
            loads[0] = (send.sent_at + rnd.randrange(2 * SECOND_MS, 8 * SECOND_MS), 4)
        out: list[Event] = []
        last_counted: dict[int, int] = {}
        count = humans = 0
        first = last = last_human = first_human = 0
        for revision, (t, reader) in enumerate(loads, start=1):
            _, load_class, reason, client, os_family, device = readers[reader]
            counted = t - last_counted.get(reader, -DEDUP_WINDOW_MS) >= DEDUP_WINDOW_MS
            if counted:
                last_counted[reader] = t
                count += 1
                first, last = first or t, t
                if load_class != "machine":
                    humans += 1
                    last_human, first_human = t, first_human or t
            out.append(ProcessedOpen(
                self._id(), send.email_id, t, load_class, reason, counted,
                fingerprints[reader], client, os_family, device, revision))
            if revision in (1, k):
                out.append(EmailState(
                    send.email_id, count > 0, count, humans, count - humans, revision,
                    first or None, last or None, last_human or None, revision,
                    first_human or None))
        return out

    def engagement(self, send: SendRegistered, opened: bool) -> list[Event]:
        rnd = self.rnd
        at = min(self.now - MINUTE_MS, send.sent_at + int(rnd.expovariate(1 / DAY_MS)))
        roll = rnd.random()
        if roll < (self.shape.reply_rate if opened else self.shape.reply_rate / 8):
            return [Engagement(self._id(), send.email_id, "reply", at)]
        if roll > 1 - self.shape.unsubscribe_rate:
            return [Engagement(self._id(), send.email_id, "unsubscribe", at)]
        return []

    def chunk(self, first: int, n: int) -> list[Event]:
        """The events of emails ``first`` .. ``first + n``, in the order the topics get them."""
        rnd = self.rnd
        mean_extra = self.shape.loads_per_opened - 1
        events: list[Event] = []
        for number in range(first, first + n):
            send = self.send(number)
            events.append(send)
            rate = self.template_open_rate[int(send.template_id[-2:])]
            opened = send.tracking and rnd.random() < rate
            if opened:
                k = 1 + int(rnd.expovariate(1 / mean_extra)) if mean_extra > 0 else 1
                events += self.opens(send, k)
                self.counts.opened += 1
            events += self.engagement(send, opened)
        self.counts.emails += n
        return events


# -- writing ---------------------------------------------------------------------------
@dataclass
class Clock:
    """Wall and CPU seconds (chDB runs in this process: its threads' CPU counts too, so the
    CPU figure shows the work apart from what other processes take from the machine)."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> Clock:
        self._began = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._began[0]
        self.cpu += time.process_time() - self._began[1]


@dataclass
class WriteTimes:
    """The loader path's time, split into decoding (bytes → rows) and inserting; and per
    compared chunk, rows/s (wall, CPU) of each way of writing the same rows."""

    decode: Clock = field(default_factory=Clock)
    insert: Clock = field(default_factory=Clock)
    rows: int = 0
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add_rate(self, name: str, rows: int, clock: Clock) -> None:
        self.rates.setdefault(name, []).append((rows / clock.wall, rows / clock.cpu))


def loader_write(engine: Engine, loader: Loader, messages: list[tuple[str, bytes]],
                 times: WriteTimes, settle: bool = False) -> None:
    """Loader-sized batches written as ``Loader.run`` writes a polled batch
    (``Loader.write``: on chDB the JSON fast path, the row builders elsewhere); full
    batches, as under a backlog, so the facts are refreshed every ``FACTS_LAG_SECONDS``;
    with ``settle``, also at the end, as ``Loader.run`` does once the backlog is over."""
    for start in range(0, len(messages), LOADER_BATCH):
        batch = messages[start:start + LOADER_BATCH]
        with times.insert:
            if not loader.write(batch):
                raise RuntimeError("the loader was stopped")
        times.rows += len(batch)  # every generated message is a row
    if settle:
        with times.insert:
            loader.settle()


def bulk_insert(engine: Engine, table: str, rows: list[tuple[Any, ...]]) -> None:
    """The plain way to bulk load rows into chDB: one columnar frame, one INSERT (chDB's
    ``Python()`` table function finds the frame by its variable name)."""
    bulk_frame = pd.DataFrame.from_records(rows, columns=list(TABLE_COLUMNS[table]))  # noqa: F841
    engine.execute(f"INSERT INTO bulk_{table} SELECT * FROM Python(bulk_frame)")


def raw_insert(engine: Engine, table: str, values: list[bytes]) -> None:
    """The messages' own JSON as rows (the events' fields are the columns), no decoding."""
    engine.execute(f"INSERT INTO bulk_{table} SETTINGS input_format_skip_unknown_fields = 1 "
                   "FORMAT JSONEachRow\n" + b"\n".join(values).decode())


# The warehouse's materialized views: (source, target) tables. The bulk tables get the same.
VIEWS = {"sends_by_person_mv": ("sends", "sends_by_person"),
         "sends_by_profile_mv": ("sends", "sends_by_profile"),
         "folder_index_mv": ("email_state", "folder_index"),
         "email_lookup_sends_mv": ("sends", "email_lookup"),
         "email_lookup_states_mv": ("email_state", "email_lookup"),
         "email_lookup_engagement_mv": ("engagement", "email_lookup")}


def create_bulk_tables(engine: Engine) -> None:
    """Same-shaped tables, and the same materialized views, for the bulk inserts."""
    for table in (*TABLE_COLUMNS, *(target for _, target in VIEWS.values())):
        engine.execute(f"CREATE TABLE IF NOT EXISTS bulk_{table} AS {table}")
    for view, (source, target) in VIEWS.items():
        select = engine.query("SELECT as_select FROM system.tables WHERE database = "
                              "currentDatabase() AND name = %(view)s",
                              {"view": view})[0]["as_select"]
        select = re.sub(rf"\bFROM (\w+\.)?{source}\b", f"FROM bulk_{source}", select)
        engine.execute(f"CREATE MATERIALIZED VIEW IF NOT EXISTS bulk_{view} TO "
                       f"bulk_{target} AS {select}")


def compare_with_bulk(engine: Engine, live: Loader, messages: list[tuple[str, bytes]],
                      times: WriteTimes) -> None:
    """One chunk through the loader, then the same rows written the plain bulk way and two
    cheaper ways the loader could take: rows/s of each."""
    insert = replace(times.insert)
    loader_write(engine, live, messages, times, settle=True)  # its facts refreshed, timed
    loader = Clock(times.insert.wall - insert.wall, times.insert.cpu - insert.cpu)
    written: dict[str, list[tuple[Any, ...]]] = {t: [] for t in TABLE_COLUMNS}
    with Clock() as decode:  # the rows of the bulk insert, as the row builders make them
        for start in range(0, len(messages), LOADER_BATCH):
            for table, table_rows in rows_by_table(messages[start:start + LOADER_BATCH]).items():
                written[table] += table_rows
    rows = sum(len(r) for r in written.values())
    with Clock() as bulk:
        for table, table_rows in written.items():
            if table_rows:
                bulk_insert(engine, table, table_rows)
    by_table: dict[str, list[bytes]] = {}
    for topic, value in messages:
        by_table.setdefault(SINKS[topic][0], []).append(value)
    with Clock() as raw:
        for table, values in by_table.items():
            raw_insert(engine, table, values)
    for table in (*TABLE_COLUMNS, *(target for _, target in VIEWS.values())):
        engine.execute(f"TRUNCATE TABLE bulk_{table}")
    times.add_rate("loader", rows, loader)
    times.add_rate("bulk", rows, bulk)
    times.add_rate("decode + columnar insert", rows,
                   Clock(decode.wall + bulk.wall, decode.cpu + bulk.cpu))
    times.add_rate("message JSON as rows", rows, raw)


def fill(engine: Engine, shape: Shape, chunk_emails: int, bulk_every: int) -> WriteTimes:
    create_bulk_tables(engine)
    traffic = Traffic(shape, now_ms())
    times = WriteTimes()
    live = Loader(engine, "unused:9092")  # its write() only: it never connects
    live.write([])  # makes its staging tables, outside the timed batches
    progress = tqdm(total=shape.emails + shape.opens, unit="ev", unit_scale=True,
                    desc="emails+opens", smoothing=0.05)
    for number, first in enumerate(range(0, shape.emails, chunk_emails)):
        n = min(chunk_emails, shape.emails - first)
        events = traffic.chunk(first, n)
        messages = [(e.topic, e.to_bytes()) for e in events]
        if number % bulk_every == bulk_every // 2:
            compare_with_bulk(engine, live, messages, times)
        else:
            loader_write(engine, live, messages, times)
        traffic.counts.messages += len(messages)
        progress.update(n + sum(isinstance(e, ProcessedOpen) for e in events))
        progress.set_postfix(
            loader=f"{times.rows / times.insert.wall:,.0f} rows/s")
    progress.close()
    with times.insert:
        live.settle()
    live.close()
    for table in (*VIEWS, *TABLE_COLUMNS, *(target for _, target in VIEWS.values())):
        engine.execute(f"DROP TABLE IF EXISTS bulk_{table}")
    c = traffic.counts
    print(f"generated {c.emails:,} emails ({c.opened / max(1, c.emails):.0%} opened, "
          f"{traffic.person_number:,} people), {c.messages:,} messages")
    return times


def print_write_times(times: WriteTimes) -> None:
    spent = times.insert.wall
    print(f"\nloader, all batches of {LOADER_BATCH:,} messages: {times.rows:,} rows in "
          f"{spent:.0f} s = {times.rows / spent:,.0f} rows/s; CPU per row "
          f"{times.insert.cpu * 1e6 / times.rows:.1f} us (Loader.write, decoding included)")
    if not times.rates:
        return
    medians = {name: [statistics.median(r[i] for r in rates) for i in (0, 1)]
               for name, rates in times.rates.items()}
    bulk = medians["bulk"]
    print(f"the same rows, {len(times.rates['bulk'])} chunks compared (medians; ratio to "
          "the bulk insert, target for the loader >= 0.5):")
    print(f"  {'':28} {'rows/s wall':>12} {'ratio':>6} {'rows/s CPU':>12} {'ratio':>6}")
    for name, (wall, cpu) in medians.items():
        print(f"  {name:28} {wall:12,.0f} {wall / bulk[0]:6.2f} {cpu:12,.0f} "
              f"{cpu / bulk[1]:6.2f}")
    print("  (bulk: a pandas frame, INSERT ... SELECT FROM Python(); the last two are ways "
          "the loader could write)")


# -- reading ---------------------------------------------------------------------------
@dataclass
class Sample:
    """Ids to read, drawn from the warehouse itself (so a reused one works the same)."""

    email_ids: list[str]
    people: list[tuple[str, str]]
    profile: str


def draw_sample(engine: Engine, seed: int) -> Sample:
    ids = engine.query(f"SELECT email_id FROM sends ORDER BY cityHash64(email_id, {seed}) "
                       "LIMIT 5000")
    people = engine.query(
        f"""SELECT person_type, person_id FROM sends_by_person
        WHERE cityHash64(person_id, {seed}) % 50 = 0
        GROUP BY person_type, person_id HAVING count() > 1 LIMIT 2000""")
    profile = engine.query("SELECT profile_id, count() AS n FROM sends GROUP BY profile_id "
                           "ORDER BY n DESC LIMIT 1")[0]["profile_id"]
    return Sample([r["email_id"] for r in ids],
                  [(r["person_type"], r["person_id"]) for r in people], profile)


def deep_cursor(engine: Engine, pages: int, **filters: Any) -> tuple[str | None, int]:
    """The cursor of page ``pages`` of the folder (or of its last page, if it has fewer),
    walking there; and the number of that page."""
    cursor, reached = None, 1
    while reached < pages:
        page = reads.opened_folder(engine, cursor=cursor, **filters)
        if page.next_cursor is None:
            break
        cursor, reached = page.next_cursor, reached + 1
    return cursor, reached


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Timing:
    name: str
    target_ms: float | None
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, calls: list[Callable[[], Any]]) -> None:
        wall, cpu = [], []
        for call in calls:
            began, began_cpu = time.perf_counter(), time.process_time()
            call()
            wall.append((time.perf_counter() - began) * 1000)
            cpu.append((time.process_time() - began_cpu) * 1000)
        self.p50.append(percentile(wall, 50))
        self.p99.append(percentile(wall, 99))
        self.cpu.append(statistics.median(cpu))

    def line(self) -> str:
        p99 = statistics.median(self.p99)
        verdict = ""
        if self.target_ms is not None:
            verdict = f"p99 < {self.target_ms:.0f}: {'yes' if p99 < self.target_ms else 'NO'}"
        spread = f"{min(self.p99):.1f}-{max(self.p99):.1f}"
        return (f"  {self.name:34} {statistics.median(self.p50):8.1f} {p99:8.1f} "
                f"{spread:>13} {statistics.median(self.cpu):8.1f}   {verdict}")


def aged_cursor(engine: Engine, minutes: int, limit: int) -> str | None:
    """The cursor of the folder's second page, as if the first had been read ``minutes``
    ago: the emails opened since then are ranked from their opens."""
    first = reads.opened_folder(engine, limit=limit)
    if first.next_cursor is None:
        return None
    values = reads.decode_cursor(first.next_cursor, {"t": int, "id": str, "as_of": int})
    values["as_of"] -= minutes * MINUTE_MS
    values["t"] = min(values["t"], values["as_of"])
    return reads.encode_cursor(values)


@contextmanager
def through_socket(engine: Engine, folder: Path) -> Iterator[Engine]:
    """The engine as the web processes reach it in embedded mode: the owner's query server
    on a Unix socket (here in a thread of this process, so both ends share its CPU)."""
    server = QueryServer(folder / "bench-warehouse.sock", engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    remote = RemoteEngine(folder / "bench-warehouse.sock")
    try:
        yield remote
    finally:
        remote.close()
        server.shutdown()
        server.server_close()


def measure_reads(engine: Engine, remote: Engine, sample: Sample, rounds: int, queries: int,
                  deep: int, seed: int) -> None:
    rnd = random.Random(seed)
    limit = 50
    deep_all, page_all = deep_cursor(engine, deep, limit=limit)
    deep_profile, page_profile = deep_cursor(engine, deep, limit=limit,
                                             profile_id=sample.profile)
    aged = aged_cursor(engine, 10, limit)
    timings = [
        Timing("email state by id", 10),
        Timing("  through the loader's socket", 10),
        Timing("Opened folder, first page", 50),
        Timing(f"Opened folder, page {page_all}", 50),
        Timing("  page 2, snapshot 10 min old", 50),
        Timing("  biggest profile, first page", 50),
        Timing(f"  biggest profile, page {page_profile}", 50),
        Timing("a person's emails, first page", None),
    ]
    page_calls = max(10, queries // 4)

    def folder(**filters: Any) -> Callable[[], list[Callable[[], Any]]]:
        return lambda: [lambda: reads.opened_folder(engine, limit=limit, **filters)] * page_calls

    plans: list[Callable[[], list[Callable[[], Any]]]] = [
        lambda: [lambda i=i: reads.email_opens(engine, i)
                 for i in rnd.choices(sample.email_ids, k=queries)],
        lambda: [lambda i=i: reads.email_opens(remote, i)
                 for i in rnd.choices(sample.email_ids, k=queries)],
        folder(),
        folder(cursor=deep_all),
        folder(cursor=aged),
        folder(profile_id=sample.profile),
        folder(profile_id=sample.profile, cursor=deep_profile),
        lambda: [lambda p=p: reads.person_emails(engine, *p)
                 for p in rnd.choices(sample.people, k=queries)],
    ]
    for plan in plans:  # warm: the first reads load marks and columns into the caches
        for call in plan()[:5]:
            call()
    for _ in tqdm(range(rounds), desc="timed rounds", leave=False):
        for timing, plan in zip(timings, plans, strict=True):
            timing.run(plan())
    print(f"  {'read (ms; medians of ' + str(rounds) + ' rounds)':34} {'p50':>8} {'p99':>8} "
          f"{'p99 range':>13} {'cpu p50':>8}")
    for timing in timings:
        print(timing.line(), flush=True)


def describe(engine: Engine) -> None:
    rows = engine.query(
        """SELECT table, sum(rows) AS rows, count() AS parts FROM system.parts
        WHERE active AND database = currentDatabase() GROUP BY table ORDER BY table""")
    print("tables: " + ", ".join(f"{r['table']} {r['rows']:,} rows/{r['parts']} parts"
                                 for r in rows))
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs (shared with other agents: expect noise)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emails", type=int, default=1_000_000, help="sends (1M)")
    parser.add_argument("--opens", type=int, default=10_000_000,
                        help="pixel loads, about (10M)")
    parser.add_argument("--quick", action="store_true",
                        help="a small run: 50k emails, 500k opens, 3 rounds, 3 bulk comparisons")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timed reads (5)")
    parser.add_argument("--queries", type=int, default=200,
                        help="lookups per round; folder pages a quarter of it (200)")
    parser.add_argument("--deep-page", type=int, default=50, help="the deep page (50)")
    parser.add_argument("--chunk-emails", type=int, default=10_000,
                        help="emails generated at a time (10k)")
    parser.add_argument("--bulk-every", type=int, default=8,
                        help="compare a chunk with a bulk insert every N chunks (8)")
    parser.add_argument("--optimize", action="store_true",
                        help="also time the reads after OPTIMIZE TABLE ... FINAL")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the warehouse here, and reuse it when already filled")
    args = parser.parse_args()
    if args.quick:
        args.emails, args.opens, args.rounds = 50_000, 500_000, 3
        args.chunk_emails, args.bulk_every = 5_000, 3

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="opentrack-bench-warehouse-"))
    engine = ChdbEngine(data_dir)
    try:
        began = time.perf_counter()
        applied = migrate(engine)
        version = engine.query("SELECT max(version) AS v FROM schema_migrations")[0]["v"]
        print(f"warehouse: {data_dir} (chDB), schema version {version} (migrations {applied} "
              f"took {time.perf_counter() - began:.1f} s)")
        have = engine.query("SELECT count() AS n FROM sends")[0]["n"]
        if have:
            print(f"reusing it: {have:,} sends (no write figures)")
        else:
            shape = Shape(args.emails, args.opens, seed=args.seed)
            print(f"filling through the loader: {args.emails:,} emails, about "
                  f"{args.opens:,} opens")
            print_write_times(fill(engine, shape, args.chunk_emails, args.bulk_every))
        describe(engine)
        sample = draw_sample(engine, args.seed)
        with through_socket(engine, data_dir) as remote:
            print("\nreads as loaded:")
            measure_reads(engine, remote, sample, args.rounds, args.queries, args.deep_page,
                          args.seed)
            if args.optimize:
                for table in (*TABLE_COLUMNS, *(target for _, target in VIEWS.values())):
                    engine.execute(f"OPTIMIZE TABLE {table} FINAL")
                print("\nreads after OPTIMIZE TABLE ... FINAL:")
                describe(engine)
                measure_reads(engine, remote, sample, args.rounds, args.queries,
                              args.deep_page, args.seed)
        print(f"\nload average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        engine.close()
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
