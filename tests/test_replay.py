"""`opentrack replay` against the running stack: idempotent replays, reclassification with
changed rules, a rebuild from scratch, a warehouse rebuilt by a reload without the worker,
and a range Kafka no longer holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from opentrack import events
from opentrack.events import RawOpen, now_ms
from opentrack.kafka_local import LocalKafka
from opentrack.replay import CLOCK_MARGIN_MS, plan, plan_reload, topics_for
from opentrack.times import iso
from opentrack.topics import ensure_topics
from tests.conftest import stack_env
from tests.test_backbone import CHROME, load
from warehouse.engines import ServerEngine, reader_engine
from warehouse.loader import rows_by_table, write_batch
from warehouse.reload import TableWriter

TEST_AGENT = "OpenTrackReplayTestClient/1.0 (X11; Linux x86_64)"


def replay(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opentrack.cli", "replay", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def warehouse_snapshot(stack) -> dict:
    """Everything the CRM and the analysts read: states (but revision), opens, sends."""
    engine = reader_engine(stack.settings.clickhouse_url, stack.settings.warehouse_socket)
    states = {r.pop("email_id"): r for r in engine.query(
        "SELECT email_id, opened, open_count, human_open_count, machine_open_count, "
        "raw_load_count, first_opened_at, last_opened_at, last_human_opened_at "
        "FROM email_state FINAL")}
    opens = {r.pop("event_id"): r for r in engine.query(
        "SELECT event_id, email_id, load_class, reason, counted FROM opens FINAL")}
    sends = engine.query("SELECT count() AS n FROM sends FINAL")[0]["n"]
    engagement = engine.query("SELECT count() AS n FROM engagement FINAL")[0]["n"]
    return {"states": states, "opens": opens, "sends": sends, "engagement": engagement}


def facts_snapshot(stack) -> dict:
    """The per-email facts the comparisons read (``warehouse.facts``)."""
    engine = reader_engine(stack.settings.clickhouse_url, stack.settings.warehouse_socket)
    return {r.pop("email_id"): r for r in engine.query("SELECT * FROM email_facts FINAL")}


def settled_snapshot(stack, timeout: float = 180) -> dict:
    """The warehouse once the pipeline has caught up (two snapshots 3 s apart agree), so
    that what earlier tests still had in flight is not taken for a change by the replay."""
    deadline = time.monotonic() + timeout
    previous = warehouse_snapshot(stack)
    while time.monotonic() < deadline:
        time.sleep(3)
        current = warehouse_snapshot(stack)
        if current == previous:
            return current
        previous = current
    raise AssertionError("the pipeline did not settle")


def some_traffic(stack) -> list[str]:
    emails = [f"rp-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    for i, e in enumerate(emails):
        url = stack.register(e)["pixel_url"]
        load(url, CHROME)
        load(url, TEST_AGENT if i % 2 else CHROME)
    for e in emails:
        stack.wait_for(e, lambda s: s["raw_load_count"] >= 1)
    return emails


def test_replay_everything_twice_changes_nothing(running_stack) -> None:
    some_traffic(running_stack)
    before = settled_snapshot(running_stack)
    env = running_stack.stack.env
    dry = replay(env, "--from-beginning", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "opens.raw" in dry.stdout and "nothing was re-processed" in dry.stdout
    for _ in range(2):
        result = replay(env, "--from-beginning", "--into", "all")
        assert result.returncode == 0, result.stderr + result.stdout
        assert "changed states: 0, changed open rows: 0" in result.stdout, result.stdout
        assert warehouse_snapshot(running_stack) == before


def test_reclassify_with_a_new_rule_changes_exactly_the_affected_loads(
    running_stack, tmp_path: Path
) -> None:
    started = iso(now_ms() - 1000)
    emails = some_traffic(running_stack)
    states = {e: running_stack.wait_for(e, lambda s: s["raw_load_count"] == 2) for e in emails}
    affected = [e for i, e in enumerate(emails) if i % 2]
    rules = tmp_path / "rules.toml"
    packaged = Path(__import__("streams").__file__).with_name("rules.toml").read_text()
    rules.write_text('[[rules]]\nname = "replay_test_client"\nverdict = "machine"\n'
                     f'ua_contains = ["OpenTrackReplayTestClient"]\n\n{packaged}')
    stack = running_stack.stack
    worker = stack.child("worker")
    try:
        worker.stop()
        stack.env["OPENTRACK_RULES"] = str(rules)
        worker.start(stack.env, stack.log_dir)
        result = replay(stack.env, "--from-time", started, "--into", "all", "--reclassify")
        assert result.returncode == 0, result.stderr + result.stdout
        assert f"loads that changed class: {len(affected)}" in result.stdout, result.stdout
        for e in emails:
            state = running_stack.opens(e).json()
            if e in affected:  # one of the two opens is now a machine's
                assert state["machine_open_count"] == 1
                assert state["human_open_count"] == states[e]["human_open_count"] - 1
            else:
                assert state == states[e]
    finally:
        worker.stop()
        stack.env.pop("OPENTRACK_RULES", None)
        worker.start(stack.env, stack.log_dir)
    # the packaged rules again: replaying restores the original verdicts
    result = replay(stack.env, "--from-time", started, "--into", "all", "--reclassify")
    assert f"loads that changed class: {len(affected)}" in result.stdout, result.stdout
    for e in emails:
        assert running_stack.opens(e).json() == states[e]


def test_range_no_longer_retained_is_a_clear_error(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka").start()
    try:
        ensure_topics(broker.bootstrap, 4)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i in range(40):
            raw = RawOpen(uuid.uuid4().hex, f"old-{i}", now_ms(), CHROME, "198.51.100.0/24")
            producer.send("opens.raw", key=raw.email_id.encode(), value=raw.to_bytes(),
                          partition=0)
        producer.flush()
        producer.close()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.delete_records({TopicPartition("opens.raw", 0): 25})  # retention took them
        admin.close()
        env = stack_env(tmp_path / "data", broker.bootstrap)
        for args in (["--from-beginning"], ["--from-offsets", "0:10"],
                     ["--from-time", "2020-01-01T00:00:00Z"]):
            result = replay(env, *args, "--dry-run")
            assert result.returncode == 3, (args, result.stdout, result.stderr)
            assert "no longer retained" in result.stderr or "oldest record kept" in result.stderr
        ok = replay(env, "--from-offsets", "0:25", "--dry-run")
        assert ok.returncode == 0 and "15" in ok.stdout
    finally:
        broker.stop()


def test_rebuild_from_scratch_equals_the_original(running_stack) -> None:
    """Empty warehouse and empty stream state, processed again from the beginning."""
    some_traffic(running_stack)
    before = settled_snapshot(running_stack)
    stack = running_stack.stack
    for name in ("web", "worker", "loader"):
        stack.child(name).stop()
    data = running_stack.settings.data_dir
    shutil.rmtree(data / "warehouse")
    shutil.rmtree(data / "streams", ignore_errors=True)
    admin = KafkaAdminClient(bootstrap_servers=running_stack.settings.bootstrap)
    admin.delete_groups(["opentrack-streams", "opentrack-warehouse"])
    admin.delete_topics([t for t in admin.list_topics() if t.startswith("opentrack-streams-")])
    admin.close()
    time.sleep(2)
    for child in stack.children:
        child.start(stack.env, stack.log_dir)
    stack.wait_ready()
    deadline = time.monotonic() + 300
    after = None
    while time.monotonic() < deadline:
        after = warehouse_snapshot(running_stack)
        if after == before:
            break
        time.sleep(3)
    assert after == before


def test_warehouse_replay_rebuilds_a_lost_warehouse_without_the_worker(running_stack) -> None:
    """The warehouse is lost while the loader's offsets say everything was loaded: a
    warehouse replay reloads the worker's outputs from Kafka, equal to the original, and
    a second one changes nothing."""
    some_traffic(running_stack)
    before = settled_snapshot(running_stack)
    facts_before = facts_snapshot(running_stack)
    stack = running_stack.stack
    loader = stack.child("loader")
    loader.stop()
    shutil.rmtree(running_stack.settings.data_dir / "warehouse")
    loader.start(stack.env, stack.log_dir)
    stack.wait_ready()
    assert warehouse_snapshot(running_stack)["states"] == {}  # nothing is loaded again
    dry = replay(stack.env, "--from-beginning", "--into", "warehouse", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "a warehouse reload (no worker)" in dry.stdout and "email_state" in dry.stdout
    first = replay(stack.env, "--from-beginning", "--into", "warehouse")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "reloaded the warehouse from" in first.stdout, first.stdout
    assert warehouse_snapshot(running_stack) == before
    assert facts_snapshot(running_stack) == facts_before
    again = replay(stack.env, "--from-beginning", "--into", "warehouse")
    assert again.returncode == 0, again.stderr + again.stdout
    assert "changed states: 0, changed open rows: 0" in again.stdout, again.stdout
    assert warehouse_snapshot(running_stack) == before


def test_warehouse_replay_on_a_clickhouse_server_restores_deleted_rows(server_stack) -> None:
    """With OPENTRACK_CLICKHOUSE_URL the replay runs the reload itself, through the row
    builders, on ClickHouse 18.16: deleted rows come back, nothing else changes."""
    emails = some_traffic(server_stack)
    before = settled_snapshot(server_stack)
    engine = ServerEngine(server_stack.settings.clickhouse_url)
    for table in ("opens", "email_state"):
        engine.execute(f"ALTER TABLE {table} DELETE WHERE email_id IN %(ids)s",
                       {"ids": tuple(emails)})
    deadline = time.monotonic() + 60  # 18.16 runs mutations in the background only
    while engine.query("SELECT count() AS n FROM system.mutations WHERE is_done = 0")[0]["n"]:
        assert time.monotonic() < deadline, "the deletes did not finish"
        time.sleep(0.2)
    assert warehouse_snapshot(server_stack) != before
    result = replay(server_stack.stack.env, "--from-beginning", "--into", "warehouse")
    assert result.returncode == 0, result.stderr + result.stdout
    opens = sum(1 for row in before["opens"].values() if row["email_id"] in emails)
    assert f"changed states: {len(emails)}, changed open rows: {opens}," in result.stdout, (
        result.stdout)
    assert warehouse_snapshot(server_stack) == before


def _send(email_id: str, **fields) -> bytes:
    return events.SendRegistered(email_id, "p1", "candidate", f"c-{email_id}", "t1",
                                 "Hé\n\"quoted\"", 1000, **fields).to_bytes()


def _messages(prefix: str) -> list[dict[str, list]]:
    """Two batches of every fast topic, the values all OpenTrack producers write, and then
    what none does (missing fields, nulls, wrong types, not JSON): a rows' mirror test."""
    a, b, gone = f"{prefix}a", f"{prefix}b", f"{prefix}gone"
    good = {
        events.TOPIC_SENDS: [_send(a), _send(b, sequence_id="s", sequence_step=2,
                                              tracking=False), _send(gone), None],
        events.TOPIC_OPENS_PROCESSED: [
            events.ProcessedOpen(f"{prefix}e1", a, 5, "human", "", True, "fp").to_bytes(),
            events.ProcessedOpen(f"{prefix}e2", a, 6, "machine", "apple_mpp", False, "fp",
                                 "Mail", "Mac OS X", "Mac", 3).to_bytes(),
            events.ProcessedOpen(f"{prefix}e3", gone, 6, "machine", "x", False, "fp").to_bytes(),
        ],
        events.TOPIC_EMAIL_STATE: [
            events.EmailState(a).to_bytes(),
            events.EmailState(b, True, 2, 1, 1, 3, 10, 20, 15, 4, 10).to_bytes(),
            events.EmailState(gone, revision=3).to_bytes(),
        ],
        events.TOPIC_ENGAGEMENT: [
            events.Engagement(f"{prefix}r1", b, "reply", 30).to_bytes(),
            events.Engagement(f"{prefix}u1", b, "unsubscribe", 31).to_bytes(),
            events.Engagement(f"{prefix}r2", gone, "reply", 32).to_bytes(),
        ],
    }
    odd = {
        events.TOPIC_SENDS: [
            _send(f"{prefix}c"), b'{"email_id":"%sd","profile_id":"p"}' % prefix.encode(),
            b"not json",
        ],
        events.TOPIC_OPENS_PROCESSED: [
            events.ProcessedOpen(f"{prefix}e4", a, 5, "proxy", "", True, "fp").to_bytes(),
            b'{"event_id":"%se5","email_id":"%sa","received_at":1.5,"load_class":"human",'
            b'"reason":"","counted":true,"fingerprint":"f"}' % (prefix.encode(), prefix.encode()),
        ],
        events.TOPIC_EMAIL_STATE: [
            b'{"email_id":"%sc","revision":"x"}' % prefix.encode(),
            b'{"email_id":"%sd","opened":1}' % prefix.encode(), b'{"email_id":null}',
        ],
        events.TOPIC_ENGAGEMENT: [
            events.Engagement(f"{prefix}r3", a, "reply", 40).to_bytes(),
            events.Engagement(f"{prefix}f1", a, "forward", 41).to_bytes(),
        ],
    }
    computed = {events.TOPIC_SENDS: [  # registered_at is computed when missing: now
        b'{"email_id":"%se","profile_id":"p","person_type":"contact","person_id":"x",'
        b'"template_id":"t","subject":"s","sent_at":1}' % prefix.encode()]}
    return [good, odd, computed]


@pytest.mark.parametrize("warehouse_engine", ["chdb"], indirect=True)
def test_reload_fast_path_writes_what_the_row_builders_write(warehouse_engine) -> None:
    """The reload's fast path (the JSON straight into ClickHouse) against the loader's row
    builders, on the same messages under two id prefixes: the same rows in every table."""
    engine = warehouse_engine
    run = uuid.uuid4().hex[:6]
    fast, builders = f"fast{run}-", f"rows{run}-"
    engine.insert("erased_emails", ["email_id", "erased_at"],
                  [(f"{fast}gone", 1), (f"{builders}gone", 1)])
    writer = TableWriter(engine, {f"{fast}gone"}, fast=True)
    try:
        for batch in _messages(fast):
            for topic, values in batch.items():
                writer.write(topic, values)
        writer.refresh_facts()
    finally:
        writer.close()
    assert writer.result.fallback_batches == 5  # all but the first batch
    for batch in _messages(builders):
        for topic, values in batch.items():
            present = [(topic, v) for v in values if v is not None]
            write_batch(engine, rows_by_table(present, {f"{builders}gone"}))

    def rows(table: str, prefix: str) -> list[str]:
        found = engine.query(f"SELECT * FROM {table} FINAL WHERE startsWith(email_id, %(p)s)",
                             {"p": prefix})
        for row in found:
            row.pop("registered_at", None)  # "now" for the send that lacks it
            row.pop("version", None)  # of the facts: registered_at is in it
        return sorted(repr(sorted(r.items())).replace(prefix, "<id>-") for r in found)

    for table in ("sends", "sends_by_person", "opens", "email_state", "engagement",
                  "email_facts"):
        assert rows(table, fast) == rows(table, builders), table
        assert rows(table, fast), table
    assert not [t for t in engine.query("SHOW TABLES") if t["name"].startswith("reload_")]


def test_reload_leaves_loads_older_than_processed_keeps_to_the_worker(tmp_path: Path) -> None:
    """opens.processed keeps 7 days: raw loads whose processed records retention deleted
    are planned through the worker, the rest (and the compacted states) as a reload."""
    broker = LocalKafka(tmp_path / "kafka").start()
    try:
        ensure_topics(broker.bootstrap, 4)
        now = now_ms()
        old, recent = now - 3 * 3600_000, now - 600_000
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i in range(20):
            at = old if i < 10 else recent
            raw = RawOpen(uuid.uuid4().hex, f"ret-{i}", at, CHROME, "198.51.100.0/24")
            producer.send(events.TOPIC_OPENS_RAW, key=raw.email_id.encode(),
                          value=raw.to_bytes(), partition=0, timestamp_ms=at)
            # when the worker made it: the recent loads' records well after the margin
            made = old + 1000 if i < 10 else recent - 5 * CLOCK_MARGIN_MS
            producer.send(events.TOPIC_OPENS_PROCESSED, key=raw.email_id.encode(),
                          value=b"{}", partition=0, timestamp_ms=made)
            producer.send(events.TOPIC_EMAIL_STATE, key=raw.email_id.encode(), value=b"{}",
                          partition=0, timestamp_ms=made)
        producer.flush()
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        try:
            raw_plan = plan(consumer, topics_for("warehouse"))
            whole = plan_reload(consumer, raw_plan)
            assert whole.through_worker == [] and whole.since_ms is None
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
            admin.delete_records({TopicPartition(events.TOPIC_OPENS_PROCESSED, 0): 10})
            admin.close()
            cut = plan_reload(consumer, raw_plan)
        finally:
            consumer.close()
        assert [(r.topic, r.partition, r.start, r.end) for r in cut.through_worker] == [
            (events.TOPIC_OPENS_RAW, 0, 0, 10)]
        spans = {(r.topic, r.partition): (r.start, r.end) for r in cut.spans if r.count}
        assert spans == {(events.TOPIC_OPENS_PROCESSED, 0): (10, 20),
                         (events.TOPIC_EMAIL_STATE, 0): (0, 20)}
    finally:
        broker.stop()
