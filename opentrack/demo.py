"""`opentrack demo`: the labelled workload sent through the public endpoints of a running stack.

Times. The intake API takes the CRM's times (``sent_at`` of a send, ``at`` of a reply or an
unsubscribe), so those are the simulated ones, spread over the simulated days. The pixel
stamps each load with its arrival (by design: nobody can backdate an open), so the loads of
the simulated days arrive while the demo runs. What the pipeline decides from load times
is kept as simulated by playing each email's loads on a compressed clock:

- a load within ``OPENTRACK_SCANNER_SECONDS`` of its send must arrive that soon after the
  send, so an email with such a load (a security gateway, Gmail's prefetch) is registered
  when the demo delivers it: its ``sent_at`` is that moment, not the simulated one;
- loads of the same client (agent and network as the pipeline will see them) less than
  ``OPENTRACK_DEDUP_WINDOW`` apart stay that far apart, loads further apart stay at least
  the window apart; every other gap shrinks to about a second;
- every such relation keeps a margin from its threshold, so network jitter cannot flip it.

``EmailPlan.as_sent`` gives the loads and the send with the times they really had, for
comparing the stack's counts with the truth (``Workload.truth`` on what was sent).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import requests

from opentrack.events import Engagement, RawOpen, SendRegistered
from opentrack.settings import Settings
from opentrack.times import iso
from opentrack.workload import LabelledLoad, Workload, generate
from streams.state import client_fingerprint

SHORT_GAP_MS = 1_000  # what a gap no pipeline rule depends on shrinks to
MIN_GAP_MS = 50  # loads of one email never closer than this: their order survives
MARGIN_MS = 2_000  # distance kept from the dedup window and the scanner window
FIRST_STEP_MS = 200  # from the registration to the email's first load or engagement
DASHBOARD_PAGES = ("", "templates", "subjects", "sequences", "follow-ups", "timing")
ACCEPT_IMAGES = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"


@dataclass(frozen=True)
class Step:
    """One request of an email's life, ``offset_ms`` after the email's registration."""

    offset_ms: int
    load: LabelledLoad | None = None
    engagement: Engagement | None = None


@dataclass
class EmailPlan:
    """A send and what follows it, on the demo's compressed clock."""

    send: SendRegistered
    delivered_now: bool  # sent_at is the moment of registration (delivery-time loads)
    steps: list[Step]
    # filled while playing: the real sent_at and the real time of each load sent
    sent_at: int | None = None
    pixel_url: str | None = None
    sent_loads: list[tuple[int, LabelledLoad]] = field(default_factory=list)

    def as_sent(
        self, client_seen: Callable[[str], str], stamps: list[int] | None = None,
    ) -> tuple[SendRegistered, list[LabelledLoad]]:
        """The send and its loads with the times they were sent at, and the client network
        the stack sees (``client_seen`` of the simulated one). ``stamps``, the times the pixel
        gave this email's loads, replace the player's clock when there is one per load: an
        email's loads are sent one after another, so they are in the same order."""
        send = replace(self.send, sent_at=self.sent_at or self.send.sent_at)
        times = [at for at, _ in self.sent_loads]
        if stamps is not None and len(stamps) == len(times):
            times = sorted(stamps)
        loads = [
            LabelledLoad(replace(load.raw, received_at=at, client=client_seen(load.raw.client)),
                         load.true_class, load.kind)
            for at, (_, load) in zip(times, self.sent_loads, strict=True)
        ]
        return send, loads


def plan_email(
    send: SendRegistered,
    loads: list[LabelledLoad],
    engagements: list[Engagement],
    window_ms: int,
    scanner_ms: int,
    same_client: Callable[[RawOpen], str],
) -> EmailPlan:
    """Place an email's loads and engagements on the compressed clock (module docstring)."""
    events = sorted(
        [(load.raw.received_at, 0, load) for load in loads]
        + [(e.at, 1, e) for e in engagements],
        key=lambda item: (item[0], item[1]),
    )
    delivered_now = any(
        load.raw.received_at - send.sent_at <= scanner_ms + MARGIN_MS for load in loads
    )
    in_window_scale = max(scanner_ms - MARGIN_MS, 0) / scanner_ms if scanner_ms else 0.0
    offsets: list[int] = []
    previous_sim = send.sent_at
    for sim_at, _, _ in events:
        sim_offset = sim_at - send.sent_at
        gap = sim_at - previous_sim
        if delivered_now and sim_offset <= scanner_ms:
            at = int(sim_offset * in_window_scale)
        elif not offsets:
            at = FIRST_STEP_MS
        elif gap < window_ms - MARGIN_MS:
            at = offsets[-1] + gap
        elif gap < window_ms:
            at = offsets[-1] + window_ms - MARGIN_MS
        elif gap < window_ms + MARGIN_MS:
            at = offsets[-1] + window_ms + MARGIN_MS
        else:
            at = offsets[-1] + SHORT_GAP_MS
        if offsets:
            at = max(at, offsets[-1] + MIN_GAP_MS)
        if delivered_now and sim_offset > scanner_ms:
            at = max(at, scanner_ms + MARGIN_MS)
        offsets.append(at)
        previous_sim = sim_at
    _keep_clients_apart(events, offsets, window_ms, same_client)
    steps = [
        Step(at, load=item) if kind == 0 else Step(at, engagement=item)
        for at, (_, kind, item) in zip(offsets, events, strict=True)
    ]
    return EmailPlan(send, delivered_now, steps)


def _keep_clients_apart(
    events: list[tuple[int, int, Any]], offsets: list[int], window_ms: int,
    same_client: Callable[[RawOpen], str],
) -> None:
    """Delay loads so that two loads of one client are less than the window apart on both
    clocks, or at least the window apart on both, always with a margin from the window.

    A delay is added before a load and moves everything after it. Gaps only grow, so a pair
    once at least the window apart stays so; a pair pushed into the margin by an earlier
    delay is moved past it (a rare, small departure from the simulation)."""
    low, high = window_ms - MARGIN_MS, window_ms + MARGIN_MS
    seen: list[tuple[int, int, str]] = []  # (index, sim time, client) of the loads so far
    for k, (sim_at, kind, item) in enumerate(events):
        if kind != 0:
            continue
        client = same_client(item.raw)
        moved = True
        while moved:
            moved = False
            for j, sim_j, client_j in seen:
                if client_j != client:
                    continue
                real_gap = offsets[k] - offsets[j]
                apart = sim_at - sim_j >= window_ms
                if (apart and real_gap < high) or low <= real_gap < high:
                    for i in range(k, len(offsets)):
                        offsets[i] += high - real_gap
                    moved = True
                    break
        seen.append((k, sim_at, client))


def plan(workload: Workload, settings: Settings) -> list[EmailPlan]:
    """Every email of the workload on the compressed clock, with the stack's windows."""
    window_ms = int(settings.dedup_window * 1000)
    scanner_ms = int(settings.scanner_seconds * 1000)
    same_client = client_as_seen(settings)
    loads = workload.loads_by_email()
    engagements: dict[str, list[Engagement]] = {}
    for engagement in workload.engagements:
        engagements.setdefault(engagement.email_id, []).append(engagement)
    return [
        plan_email(send, loads.get(send.email_id, []), engagements.get(send.email_id, []),
                   window_ms, scanner_ms, same_client)
        for send in workload.sends
    ]


def client_as_seen(settings: Settings) -> Callable[[RawOpen], str]:
    """The client fingerprint the stack will compute for a simulated load: with
    ``OPENTRACK_PROXY_HOPS`` 0 the stack ignores X-Forwarded-For, and every load comes from
    the demo's own address, so only the agent tells clients apart."""
    if settings.proxy_hops > 0:
        return lambda raw: client_fingerprint(raw.user_agent, raw.client)
    return lambda raw: client_fingerprint(raw.user_agent, "")


def address_in(prefix: str, rnd: random.Random) -> str:
    """A host address inside an anonymised network (``a.b.c.0/24`` or ``x::/48``)."""
    network = ipaddress.ip_network(prefix, strict=False)
    host = rnd.randrange(1, min(network.num_addresses - 1, 1 << 32))
    return str(network.network_address + host)


def forwarded_for(address: str, proxy_hops: int) -> str:
    """X-Forwarded-For as ``proxy_hops`` trusted proxies would have written it: the client
    is the ``proxy_hops``-th entry from the right."""
    return ", ".join([address] + ["10.0.0.1"] * (proxy_hops - 1))


# --- playing the plan ----------------------------------------------------------------------
@dataclass
class DemoResult:
    plans: list[EmailPlan]
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_sent(
        self, settings: Settings, stamps: dict[str, list[int]] | None = None,
    ) -> Workload:
        """What was sent, as a workload: its ``truth`` is what the stack must show.

        The player's clock is read before each request, the pixel stamps the load when it
        answers; on a loaded machine the two can be seconds apart, enough to move a load
        across a dedup or scanner window. A test that wants exact counts passes the pixel's
        ``stamps`` (email id -> the ``received_at`` of its loads in ``opens.raw``)."""
        def seen(client: str) -> str:
            return client if settings.proxy_hops > 0 else ""

        sends, loads = [], []
        for email in self.plans:
            send, sent = email.as_sent(seen, (stamps or {}).get(email.send.email_id))
            sends.append(send)
            loads.extend(sent)
        loads.sort(key=lambda load: (load.raw.received_at, load.raw.event_id))
        return Workload(sends, loads, [])


class Player:
    """Plays the plans against the stack with ``concurrency`` threads: each email's requests
    in order, each when its clock says; a request that starts late delays the rest of its
    email alike, so the gaps the pipeline judges never shrink."""

    def __init__(self, settings: Settings, concurrency: int, person_prefix: str,
                 seed: int) -> None:
        self.settings = settings
        self.base = settings.public_url
        self.concurrency = concurrency
        self.person_prefix = person_prefix
        self.rnd = random.Random(seed)
        self._local = threading.local()
        self._ready = threading.Condition()
        self._due: list[tuple[float, int, int, int]] = []  # (when, serial, email, step)
        self._in_flight = 0
        self._serial = 0

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return session

    def play(self, plans: list[EmailPlan], tick: Callable[[], None]) -> DemoResult:
        result = DemoResult(plans)
        started = time.monotonic()
        clocks = [started] * len(plans)  # when each email's step offsets count from
        self._due = [(started, n, n, -1) for n in range(len(plans))]
        self._serial = len(plans)
        heapq.heapify(self._due)

        def work() -> None:
            while (job := self._next()) is not None:
                when, n, index = job
                email = plans[n]
                late = time.monotonic() - when
                if late > 0.05:  # keep the email's gaps: everything after moves alike
                    clocks[n] += late
                try:
                    if index < 0:
                        clocks[n] = self._register(email)
                    else:
                        self._step(email, email.steps[index])
                except Exception as exc:  # the demo goes on; failures are counted and shown
                    with self._ready:
                        result.failures += 1
                        if len(result.errors) < 5:
                            result.errors.append(f"{type(exc).__name__}: {exc}")
                    if index < 0:
                        email.sent_at = None
                tick()
                follow = index + 1 if email.sent_at is not None else len(email.steps)
                with self._ready:
                    result.requests += 1
                    self._in_flight -= 1
                    if follow < len(email.steps):
                        self._serial += 1
                        at = clocks[n] + email.steps[follow].offset_ms / 1000
                        heapq.heappush(self._due, (at, self._serial, n, follow))
                    self._ready.notify_all()

        threads = [threading.Thread(target=work, name=f"demo-{i}", daemon=True)
                   for i in range(self.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result.seconds = time.monotonic() - started
        return result

    def _next(self) -> tuple[float, int, int] | None:
        """The next due request (waiting for it), or None when everything has been sent."""
        with self._ready:
            while True:
                if not self._due:
                    if not self._in_flight:
                        return None
                    self._ready.wait()
                    continue
                when, _, n, index = self._due[0]
                wait = when - time.monotonic()
                if wait <= 0:
                    heapq.heappop(self._due)
                    self._in_flight += 1
                    return when, n, index
                self._ready.wait(wait)

    def _register(self, email: EmailPlan) -> float:
        """POST /v1/emails; returns the monotonic time the email's clock starts at."""
        send = email.send
        started = time.monotonic()
        sent_at = int(time.time() * 1000) if email.delivered_now else send.sent_at
        body = {
            "email_id": send.email_id, "profile_id": send.profile_id,
            "person_type": send.person_type,
            "person_id": f"{self.person_prefix}{send.person_id}",
            "template_id": send.template_id, "subject": send.subject, "sent_at": iso(sent_at),
            "sequence_id": send.sequence_id, "sequence_step": send.sequence_step,
        }
        response = self.session().post(f"{self.base}/v1/emails", json=body, timeout=30)
        if response.status_code != 201:
            raise RuntimeError(f"POST /v1/emails: {response.status_code} {response.text[:200]}")
        email.sent_at = sent_at
        email.pixel_url = response.json().get("pixel_url")
        return started

    def _step(self, email: EmailPlan, step: Step) -> None:
        if step.load is not None:
            if not email.pixel_url:  # tracking is off for this profile: no pixel, no loads
                return
            headers = {"User-Agent": step.load.raw.user_agent, "Accept": ACCEPT_IMAGES}
            if self.settings.proxy_hops > 0:
                with self._ready:
                    address = address_in(step.load.raw.client, self.rnd)
                headers["X-Forwarded-For"] = forwarded_for(address, self.settings.proxy_hops)
            at = int(time.time() * 1000)
            response = self.session().get(email.pixel_url, headers=headers, timeout=30)
            if response.status_code != 200:
                raise RuntimeError(f"pixel: {response.status_code}")
            email.sent_loads.append((at, step.load))
            return
        engagement = step.engagement
        assert engagement is not None and email.sent_at is not None
        shifted = email.sent_at + (engagement.at - email.send.sent_at)
        at = min(shifted, int(time.time() * 1000))
        path = "replies" if engagement.kind == "reply" else "unsubscribes"
        response = self.session().post(
            f"{self.base}/v1/events/{path}",
            json={"email_id": engagement.email_id, "at": iso(at)}, timeout=30,
        )
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/events/{path}: {response.status_code}")


def wait_for_pipeline(player: Player, plans: list[EmailPlan], timeout: float,
                      sample: int = 50) -> bool:
    """Until the emails whose loads were sent last show every one of them (or ``timeout``):
    then the dashboards show the whole demo."""
    sent = [e for e in plans if e.sent_loads]
    sent.sort(key=lambda e: max(at for at, _ in e.sent_loads), reverse=True)
    pending = {e.send.email_id: len(e.sent_loads) for e in sent[:sample]}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for email_id, loads in list(pending.items()):
            response = player.session().get(f"{player.base}/v1/emails/{email_id}/opens",
                                              timeout=10)
            if response.status_code == 200 and response.json()["raw_load_count"] >= loads:
                del pending[email_id]
        if pending:
            time.sleep(0.5)
    return not pending


def run_demo(settings: Settings, emails: int, days: float, seed: int, concurrency: int,
             wait: float, echo: Callable[[str], None]) -> DemoResult:
    """Generate, plan, play with a progress bar, wait for the pipeline, say where to look."""
    from tqdm import tqdm

    workload = generate(emails, days=days, seed=seed, scanner_seconds=settings.scanner_seconds)
    plans = plan(workload, settings)
    total = sum(1 + len(email.steps) for email in plans)
    longest = max((email.steps[-1].offset_ms for email in plans if email.steps), default=0)
    echo(f"demo (seed {seed}): {len(workload.sends)} emails over {days:g} simulated days, "
         f"{len(workload.loads)} pixel loads, {len(workload.engagements)} replies and "
         f"unsubscribes; {total} requests to {settings.public_url}, about "
         f"{longest / 1000:.0f}s (the dedup window keeps some loads apart)")
    if settings.proxy_hops == 0:
        echo("note: OPENTRACK_PROXY_HOPS is 0, so the stack ignores X-Forwarded-For and every "
             "load comes from this machine's address; set it to 1 on the stack to see the "
             "demo's networks (Apple's, Google's, scanners')")
    player = Player(settings, concurrency, person_prefix=f"demo-{seed}-", seed=seed)
    with tqdm(total=total, unit="req", desc="demo", smoothing=0.1) as bar:
        lock = threading.Lock()

        def tick() -> None:
            with lock:
                bar.update(1)

        result = player.play(plans, tick)
    echo(f"sent {result.requests - result.failures} requests in {result.seconds:.0f}s, "
         f"{result.failures} failed"
         + (f" (first: {result.errors[0]})" if result.errors else ""))
    if wait > 0:
        if wait_for_pipeline(player, plans, wait):
            echo("the pipeline has processed every load")
        else:
            echo(f"warning: the pipeline had not processed every load after {wait:.0f}s")
    pages = "\n".join(f"  {settings.public_url}/dashboards/{page}" for page in DASHBOARD_PAGES)
    echo(f"Dashboards (log in with the API key):\n{pages}\n"
         f"API: {settings.public_url}/v1/analytics/compare?by=template")
    return result
