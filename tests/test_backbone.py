"""End to end through the running stack: pixel → Kafka → Faust worker → ClickHouse → CRM API."""

from __future__ import annotations

import time
import uuid

import requests
from kafka import KafkaProducer

from ingest.pixel import GIF
from opentrack.events import RawOpen, now_ms

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/131.0.0.0 Safari/537.36")
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17231; Pro)"


def load(url: str, agent: str) -> requests.Response:
    response = requests.get(url, headers={"User-Agent": agent}, timeout=10)
    assert response.status_code == 200
    assert response.content == GIF
    assert response.headers["Content-Type"] == "image/gif"
    assert "no-store" in response.headers["Cache-Control"]
    return response


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_opens_travel_the_whole_pipeline(running_stack) -> None:
    email_id = unique_id("bb")
    registration = running_stack.register(email_id)
    url = registration["pixel_url"]
    assert registration["tracking"] is True and url.endswith(".gif")
    assert url in registration["pixel_html"]

    for _ in range(3):  # one client, three image loads within a second
        load(url, CHROME)
    time.sleep(0.05)
    load(url, OUTLOOK)  # another client
    last_load_ms = now_ms()

    state = running_stack.wait_for(email_id, lambda s: s["raw_load_count"] == 4)
    assert state["opened"] is True
    assert state["open_count"] == 2
    assert state["human_open_count"] == 2 and state["machine_open_count"] == 0
    assert state["first_opened_at"] < state["last_opened_at"]
    # the last counted load is the Outlook one, the most recent of all
    assert state["last_opened_at"] == state["last_human_opened_at"]
    assert abs(_ms(state["last_opened_at"]) - last_load_ms) < 2000
    assert state["template_id"] == "t1" and state["person_type"] == "candidate"


def test_forged_and_truncated_tokens_get_the_gif_and_count_nothing(running_stack) -> None:
    email_id = unique_id("forged")
    url = running_stack.register(email_id)["pixel_url"]
    load(url, CHROME)
    running_stack.wait_for(email_id, lambda s: s["raw_load_count"] == 1)
    token = url.rsplit("/", 1)[1][: -len(".gif")]
    kid, encoded, mac = token.split(".")
    base = running_stack.base
    for bad in (f"{token[:-3]}.gif", f"{kid}.{encoded}.gif", f"{kid}.{encoded}.{mac[::-1]}.gif",
                "x.gif", f"{token}", f"{token}.gif/extra"):
        load(f"{base}/o/{bad}", OUTLOOK)
    # a valid load afterwards proves the forged ones had their chance to arrive first
    other = unique_id("marker")
    load(running_stack.register(other)["pixel_url"], CHROME)
    running_stack.wait_for(other, lambda s: s["raw_load_count"] == 1)
    time.sleep(1)
    assert running_stack.opens(email_id).json()["raw_load_count"] == 1


def test_the_same_event_id_twice_changes_nothing(running_stack) -> None:
    email_id = unique_id("dup")
    running_stack.register(email_id)
    producer = KafkaProducer(bootstrap_servers=running_stack.settings.bootstrap)
    event = RawOpen(uuid.uuid4().hex, email_id, now_ms(), CHROME, "198.51.100.0/24")
    for _ in range(2):
        producer.send("opens.raw", key=email_id.encode(), value=event.to_bytes())
    producer.flush()
    state = running_stack.wait_for(email_id, lambda s: s["raw_load_count"] >= 1)
    marker = RawOpen(uuid.uuid4().hex, email_id, now_ms() + 120_000, OUTLOOK, "203.0.113.0/24")
    producer.send("opens.raw", key=email_id.encode(), value=marker.to_bytes())
    producer.flush()
    producer.close()
    state = running_stack.wait_for(email_id, lambda s: s["open_count"] == 2)
    assert state["raw_load_count"] == 2


def test_unknown_email_is_404_and_the_api_needs_the_key(running_stack) -> None:
    response = running_stack.opens("never-registered")
    assert response.status_code == 404 and "error" in response.json()
    anonymous = requests.get(f"{running_stack.base}/v1/emails/x/opens", timeout=10)
    assert anonymous.status_code == 401 and "API key" in anonymous.json()["error"]
    wrong = requests.get(f"{running_stack.base}/v1/emails/x/opens",
                         headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    unauth_post = requests.post(f"{running_stack.base}/v1/emails", json={}, timeout=10)
    assert unauth_post.status_code == 401
    assert requests.get(f"{running_stack.base}/healthz", timeout=10).status_code == 200


def test_bad_registration_is_a_400_naming_the_field(running_stack) -> None:
    response = running_stack.http.post(
        f"{running_stack.base}/v1/emails",
        json={"email_id": "ok-1", "profile_id": "p", "person_type": "robot", "person_id": "c",
              "template_id": "t", "subject": "s", "sent_at": "2026-01-01T00:00:00Z"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["field"] == "person_type"


def _ms(iso: str) -> int:
    from opentrack.times import parse_time

    return parse_time(iso, "t")
