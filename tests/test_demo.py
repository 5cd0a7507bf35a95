"""`opentrack demo`: the plan keeps what the pipeline decides on, and the command run against
the real stack fills the dashboards (checked through the analytics API and the pages)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from opentrack.demo import MARGIN_MS, DemoResult, plan
from opentrack.settings import Settings
from opentrack.workload import generate

DEMO_SEED = 12  # 200 emails with every kind of load, replies and unsubscribes
DEMO_EMAILS = 200


def planning_settings(**extra: str) -> Settings:
    return Settings.from_env({"OPENTRACK_SECRET": "s", "OPENTRACK_API_KEY": "k",
                              "OPENTRACK_DATA_DIR": "/nonexistent", **extra})


def test_the_plan_keeps_what_the_pipeline_decides_on() -> None:
    """Same client inside or outside the dedup window, load inside or outside the scanner
    window: as simulated, with a margin on the compressed clock; the state each email would
    show is the simulated one."""
    settings = planning_settings(OPENTRACK_PROXY_HOPS="1")
    window_ms, scanner_ms = 60_000, 10_000
    workload = generate(2000, days=7, seed=5, scanner_seconds=10)
    plans = plan(workload, settings)
    pairs = flipped = 0
    for email in plans:
        offsets = [step.offset_ms for step in email.steps]
        assert offsets == sorted(offsets)
        loads = [(step.offset_ms, step.load) for step in email.steps if step.load]
        for i, (at_i, load_i) in enumerate(loads):
            sim_offset = load_i.raw.received_at - email.send.sent_at
            if email.delivered_now:
                flipped += (abs(at_i - scanner_ms) < MARGIN_MS
                            or (sim_offset <= scanner_ms) != (at_i <= scanner_ms))
            for at_j, load_j in loads[:i]:
                if (load_i.raw.user_agent, load_i.raw.client) != (
                        load_j.raw.user_agent, load_j.raw.client):
                    continue
                pairs += 1
                gap = at_i - at_j
                assert not window_ms - MARGIN_MS <= gap < window_ms + MARGIN_MS
                sim_gap = load_i.raw.received_at - load_j.raw.received_at
                flipped += (sim_gap >= window_ms) != (gap >= window_ms)
    assert pairs > 100 and flipped <= 0.01 * pairs
    assert 0.1 < sum(e.delivered_now for e in plans) / len(plans) < 0.5
    # what each email would show if every load arrived exactly when planned
    for email in plans:
        email.sent_at = 0 if email.delivered_now else email.send.sent_at
        email.sent_loads = [(email.sent_at + s.offset_ms, s.load) for s in email.steps if s.load]
    planned = DemoResult(plans).as_sent(settings).truth(window_ms)
    simulated = workload.truth(window_ms)
    fields = ("opened", "open_count", "raw_load_count")
    same = sum(all(planned[e][f] == simulated[e][f] for f in fields) for e in simulated)
    assert same >= 0.995 * len(simulated)


def test_demo_fills_the_dashboards(running_stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opentrack.cli", "demo", "--emails", str(DEMO_EMAILS),
         "--days", "7", "--seed", str(DEMO_SEED), "--concurrency", "8", "--wait", "120"],
        env=running_stack.stack.env, capture_output=True, text=True, timeout=540,
    )
    assert out.returncode == 0, out.stdout + out.stderr + running_stack.log_tails()
    assert "the pipeline has processed every load" in out.stdout, out.stdout
    assert f"{running_stack.base}/dashboards/templates" in out.stdout

    workload = generate(DEMO_EMAILS, days=7, seed=DEMO_SEED,
                        scanner_seconds=running_stack.settings.scanner_seconds)
    http, base = running_stack.http, running_stack.base

    def compare(by: str) -> dict[str, dict]:
        response = http.get(f"{base}/v1/analytics/compare", params={"by": by}, timeout=30)
        assert response.status_code == 200, response.text
        return {row["key"]: row for row in response.json()["rows"]}

    by_template = compare("template")
    sent = Counter(send.template_id for send in workload.sends)
    for template, count in sent.items():  # no other test uses these templates
        assert by_template[template]["sent"] == count, template
    demo_rows = [by_template[t] for t in sent]
    assert sum(row["human_opens"] for row in demo_rows) > 0
    assert sum(row["machine_opens"] for row in demo_rows) > 0
    assert sum(row["replies"] for row in demo_rows) == sum(
        e.kind == "reply" for e in workload.engagements)
    assert sum(row["unsubscribes"] for row in demo_rows) == sum(
        e.kind == "unsubscribe" for e in workload.engagements)
    by_subject = compare("subject")
    assert {send.subject for send in workload.sends} <= set(by_subject)
    by_sequence = compare("sequence")
    assert {send.sequence_id for send in workload.sends if send.sequence_id} <= set(by_sequence)
    assert len(compare("sequence_step")) >= 3

    timing = http.get(f"{base}/v1/analytics/timing", timeout=30).json()["rows"]
    assert sum(row["sent"] for row in timing) >= DEMO_EMAILS
    follow_ups = http.get(f"{base}/v1/analytics/follow-ups", timeout=30)
    assert follow_ups.status_code == 200 and follow_ups.json()["rows"]

    # the analysts' pages show the demo's templates
    import requests

    browser = requests.Session()
    login = browser.post(f"{base}/dashboards/login",
                         data={"api_key": running_stack.settings.api_key}, timeout=30)
    assert login.status_code == 200, login.text[:300]
    page = browser.get(f"{base}/dashboards/templates", timeout=60)
    assert page.status_code == 200 and "cand_intro" in page.text
