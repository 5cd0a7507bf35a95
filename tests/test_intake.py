"""The intake API end to end: tracking off and on, batches, replies and unsubscribes."""

from __future__ import annotations

import time
import uuid

import requests

from tests.test_backbone import CHROME, OUTLOOK, load


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def set_tracking(stack, profile_id: str, enabled: bool) -> None:
    response = stack.http.put(f"{stack.base}/v1/profiles/{profile_id}/tracking",
                              json={"enabled": enabled}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == {"profile_id": profile_id, "enabled": enabled}


def test_tracking_off_and_on_again(running_stack) -> None:
    profile = uid("prof")
    email = uid("trk")
    url = running_stack.register(email, profile_id=profile)["pixel_url"]
    load(url, CHROME)
    running_stack.wait_for(email, lambda s: s["raw_load_count"] == 1)

    set_tracking(running_stack, profile, False)
    time.sleep(0.5)  # every web process follows the switch
    off = running_stack.register(uid("trk-off"), profile_id=profile)
    assert off["tracking"] is False and off["pixel_url"] is None and off["pixel_html"] is None
    load(url, OUTLOOK)  # after the switch: dropped by the worker

    set_tracking(running_stack, profile, True)
    time.sleep(0.5)
    assert running_stack.register(uid("trk-on"), profile_id=profile)["tracking"] is True
    load(url, "Thunderbird/128.0 (X11; Linux x86_64)")  # counted again
    state = running_stack.wait_for(email, lambda s: s["raw_load_count"] >= 2)
    time.sleep(1)
    state = running_stack.opens(email).json()
    assert state["raw_load_count"] == 2 and state["open_count"] == 2


def test_batch_registration_is_all_or_nothing(running_stack) -> None:
    ids = [uid("batch") for _ in range(3)]
    body = {"emails": [{"email_id": e, "profile_id": "p1", "person_type": "contact",
                        "person_id": "k", "template_id": "t", "subject": "s",
                        "sent_at": "2026-01-05T09:00:00Z"} for e in ids]}
    body["emails"][2]["sent_at"] = "yesterday"
    bad = running_stack.http.post(f"{running_stack.base}/v1/emails/batch", json=body, timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "emails[2].sent_at"
    body["emails"][2]["sent_at"] = "2026-01-05T09:00:00+01:00"
    good = running_stack.http.post(f"{running_stack.base}/v1/emails/batch", json=body, timeout=10)
    assert good.status_code == 201
    assert [r["email_id"] for r in good.json()["emails"]] == ids
    for email in ids:
        running_stack.wait_for(email, lambda s: True)
    # the rejected first attempt wrote nothing: the third send has the corrected time
    assert running_stack.opens(ids[2]).json()["sent_at"] == "2026-01-05T08:00:00.000Z"
    too_many = {"emails": body["emails"] * 334}
    response = running_stack.http.post(f"{running_stack.base}/v1/emails/batch", json=too_many,
                                       timeout=10)
    assert response.status_code == 400 and response.json()["field"] == "emails"


def test_registering_twice_is_one_send(running_stack) -> None:
    email = uid("twice")
    first = running_stack.register(email)
    second = running_stack.register(email)
    assert first == second
    running_stack.wait_for(email, lambda s: True)
    rows = running_stack.opens(email).json()
    assert rows["email_id"] == email


def test_replies_and_unsubscribes_are_counted_once_per_report(running_stack) -> None:
    email = uid("eng")
    running_stack.register(email)
    base = running_stack.base
    for _ in range(2):  # a retried report is the same event
        r = running_stack.http.post(f"{base}/v1/events/replies",
                                    json={"email_id": email, "at": "2026-01-05T10:00:00Z"},
                                    timeout=10)
        assert r.status_code == 202
    running_stack.http.post(f"{base}/v1/events/replies",
                            json={"email_id": email, "at": "2026-01-06T10:00:00Z"}, timeout=10)
    running_stack.http.post(f"{base}/v1/events/unsubscribes",
                            json={"email_id": email, "at": "2026-01-06T11:00:00Z"}, timeout=10)
    state = running_stack.wait_for(email, lambda s: s["replies"] == 2 and s["unsubscribed"])
    assert state["replied"] is True and state["unsubscribes"] == 1
    bad = running_stack.http.post(f"{base}/v1/events/replies", json={"email_id": email},
                                  timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "at"


def test_request_body_size_is_limited(running_stack) -> None:
    response = running_stack.http.post(
        f"{running_stack.base}/v1/emails/batch", data=b"x" * (3 * 1024 * 1024),
        headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert "error" in response.json()


def test_profile_tracking_needs_a_boolean(running_stack) -> None:
    r = running_stack.http.put(f"{running_stack.base}/v1/profiles/p1/tracking",
                               json={"enabled": "no"}, timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "enabled"
    r = requests.put(f"{running_stack.base}/v1/profiles/p1/tracking", json={"enabled": False},
                     timeout=10)
    assert r.status_code == 401
