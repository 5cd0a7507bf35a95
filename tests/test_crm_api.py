"""The CRM endpoints through the running stack: folder, a person's emails, erasure, and the
same answers on chDB and on a ClickHouse server."""

from __future__ import annotations

import random
import time
import uuid

from kafka import KafkaProducer

from opentrack.events import RawOpen
from tests.test_backbone import CHROME, OUTLOOK, load
from tests.topics import CHANGELOG, topic_records


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def get(stack, path: str, **params):
    return stack.http.get(f"{stack.base}{path}", params=params, timeout=30)


def test_folder_and_person_emails_through_the_stack(running_stack) -> None:
    profile, person = uid("fold"), uid("cand")
    emails = [uid("f") for _ in range(3)]
    urls = [running_stack.register(e, profile_id=profile, person_id=person)["pixel_url"]
            for e in emails]
    for url in urls:  # opened in order: the last one first in the folder
        load(url, CHROME)
        time.sleep(0.01)
    for e in emails:
        running_stack.wait_for(e, lambda s: s["opened"])
    time.sleep(2.5)  # the folder is a snapshot settled 2 s behind the clock
    folder = get(running_stack, "/v1/folders/opened", profile_id=profile, limit=2).json()
    assert [i["email_id"] for i in folder["items"]] == [emails[2], emails[1]]
    rest = get(running_stack, "/v1/folders/opened", profile_id=profile, limit=2,
               cursor=folder["next_cursor"]).json()
    assert [i["email_id"] for i in rest["items"]] == [emails[0]]
    assert rest["next_cursor"] is None
    mine = get(running_stack, f"/v1/people/candidate/{person}/emails").json()
    assert sorted(i["email_id"] for i in mine["items"]) == sorted(emails)
    assert all(i["opened"] for i in mine["items"])


def test_bad_parameters_are_400(running_stack) -> None:
    for path, params, field in [
        ("/v1/folders/opened", {"limit": "0"}, "limit"),
        ("/v1/folders/opened", {"limit": "501"}, "limit"),
        ("/v1/folders/opened", {"since": "monday"}, "since"),
        ("/v1/folders/opened", {"human_only": "maybe"}, "human_only"),
        ("/v1/folders/opened", {"cursor": "garbage"}, "cursor"),
        ("/v1/people/robot/x/emails", {}, "person_type"),
        ("/v1/people/contact/x/emails", {"cursor": "e30="}, "cursor"),
    ]:
        response = get(running_stack, path, **params)
        assert response.status_code == 400, (path, params)
        assert response.json()["field"] == field


def changelog_value(bootstrap: str, key: str) -> bytes | None:
    """The newest value of ``key`` in the worker's table changelog (None if never written)."""
    latest = None
    for record in topic_records(bootstrap, CHANGELOG):
        if record.key and key.encode() in record.key:
            latest = record.value
    return latest


def test_erasure_removes_everything_of_the_person(running_stack) -> None:
    person, other = uid("gone"), uid("kept")
    emails = [uid("er") for _ in range(2)]
    for e in emails:
        url = running_stack.register(e, person_type="contact", person_id=person)["pixel_url"]
        load(url, CHROME)
        load(url, OUTLOOK)
    running_stack.http.post(f"{running_stack.base}/v1/events/replies",
                            json={"email_id": emails[0], "at": "2026-01-05T10:00:00Z"}, timeout=10)
    kept = uid("keep")
    load(running_stack.register(kept, person_type="contact", person_id=other)["pixel_url"], CHROME)
    running_stack.wait_for(emails[0], lambda s: s["raw_load_count"] == 2 and s["replied"])
    running_stack.wait_for(emails[1], lambda s: s["raw_load_count"] == 2)
    running_stack.wait_for(kept, lambda s: s["opened"])

    response = running_stack.http.delete(f"{running_stack.base}/v1/people/contact/{person}",
                                         timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["complete"] is True and sorted(body["emails"]) == sorted(emails)
    assert body["removed_rows"]["sends"] == 2 and body["removed_rows"]["opens"] == 4
    assert body["removed_rows"]["engagement"] == 1

    for e in emails:
        assert running_stack.opens(e).status_code == 404
    assert get(running_stack, f"/v1/people/contact/{person}/emails").json()["items"] == []
    assert running_stack.opens(kept).json()["opened"] is True  # the other person is untouched
    # the stream state keeps nothing but the fact, and a late load is dropped
    time.sleep(1.5)
    for e in emails:
        assert changelog_value(running_stack.settings.bootstrap, e) == b'{"erased":true}'


SENT = "2026-01-05T09:00:00Z"


def drive_same_inputs(stacks, prefix: str) -> list[str]:
    """Register, load and reply identically on every stack; loads go straight to opens.raw
    with fixed ids and times, so both stacks see exactly the same events."""
    rnd = random.Random(42)
    emails = [f"{prefix}-{i}" for i in range(12)]
    base = 1_767_603_600_000 + 3_600_000
    loads = [RawOpen(uuid.UUID(int=rnd.getrandbits(128)).hex, rnd.choice(emails),
                     base + rnd.randrange(0, 86_400_000), rnd.choice([CHROME, OUTLOOK]),
                     rnd.choice(["198.51.100.0/24", "203.0.113.0/24"])) for _ in range(60)]
    for stack in stacks:
        for i, e in enumerate(emails):
            stack.register(e, sent_at=SENT, profile_id=prefix, person_id=f"{prefix}-p{i % 3}")
        producer = KafkaProducer(bootstrap_servers=stack.settings.bootstrap)
        for raw in loads:
            producer.send("opens.raw", key=raw.email_id.encode(), value=raw.to_bytes())
        producer.flush()
        producer.close()
        stack.http.post(f"{stack.base}/v1/events/replies",
                        json={"email_id": emails[0], "at": "2026-01-06T10:00:00Z"}, timeout=10)
    expected = {e: sum(1 for raw in loads if raw.email_id == e) for e in emails}
    for stack in stacks:
        for e in emails:
            stack.wait_for(e, lambda s, n=expected[e]: s["raw_load_count"] == n, timeout=90)
        stack.wait_for(emails[0], lambda s: s["replied"])
    return emails


def test_parity_chdb_and_clickhouse_server(running_stack, server_stack) -> None:
    prefix = uid("par")
    emails = drive_same_inputs([running_stack, server_stack], prefix)
    paths = [f"/v1/emails/{e}/opens" for e in emails]
    paths += [f"/v1/people/candidate/{prefix}-p{i}/emails" for i in range(3)]
    for path in paths:
        a, b = get(running_stack, path).json(), get(server_stack, path).json()
        assert a == b, path
    for human_only in ("true", "false"):
        pages = []
        for stack in (running_stack, server_stack):
            got, cursor = [], None
            while True:
                params = {"profile_id": prefix, "limit": 5, "human_only": human_only}
                if cursor:
                    params["cursor"] = cursor
                page = get(stack, "/v1/folders/opened", **params).json()
                got += page["items"]
                if not (cursor := page["next_cursor"]):
                    break
            pages.append(got)
        assert pages[0] == pages[1] and len(pages[0]) > 0


def test_clickhouse_outage_loses_and_doubles_nothing(server_stack) -> None:
    email = uid("chdown")
    url = server_stack.register(email)["pixel_url"]
    server_stack.wait_for(email, lambda s: True)
    agents = [f"Mozilla/5.0 client-{i} AppleWebKit/605.1.15 Version/17.0 Safari/605.1.15"
              for i in range(200)]
    sent = 0
    server_stack.clickhouse.stop()
    started = time.monotonic()
    try:
        while time.monotonic() - started < 20:  # loads keep coming while ClickHouse is down
            load(url, agents[sent % len(agents)])
            sent += 1
            time.sleep(0.1)
    finally:
        server_stack.clickhouse.start_again()
    state = server_stack.wait_for(email, lambda s: s["raw_load_count"] >= sent, timeout=120)
    time.sleep(2)
    state = server_stack.opens(email).json()
    assert state["raw_load_count"] == sent
    assert state["open_count"] == min(sent, len(agents))
    # every load is in the opens table exactly once, even before merges
    client = server_stack.clickhouse.client()
    total, distinct = client.execute(
        "SELECT count(), uniqExact(event_id) FROM opens FINAL WHERE email_id = %(e)s",
        {"e": email})[0]
    assert total == distinct == sent
