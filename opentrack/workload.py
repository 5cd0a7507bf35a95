"""A seeded, labelled workload: sends, pixel loads and engagements, every load with its truth.

Why: the classifier and the per-email state can only be judged against loads whose class is
known from how they were made. This module plays the world - recipients with their mail
setups and reading habits, and the machines that touch mail on the way - and records for
every load which class it truly is. ``opentrack demo`` sends it through the stack, and
``opentrack.accuracy`` compares the pipeline's verdicts and state with it.

The truth comes from the mechanism, never from the classifier: a load is ``machine``
because a scanner, a prefetcher or a bot made it, ``proxy`` because a person read the
mail through a provider's image proxy, ``human`` because a person's own client loaded it.
Agents are real-world strings (mail clients, browsers, provider proxies, bots, HTTP
libraries); the vendor-named scanner agents are illustrative, since most scanners hide
behind plain browser agents (which the generator uses for most of them).

Everything random comes from one ``random.Random(seed)``, event ids included, so a seed and a
start time give the same workload every time.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, TypeVar

from opentrack.events import Engagement, RawOpen, SendRegistered
from opentrack.truth import expected_state

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# --- real-world agents -----------------------------------------------------------------
MAC_MAIL = (  # Mail.app on macOS, and Apple's MPP proxy from 17/8
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
_YAHOO = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
_CHROME_WIN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{v}.0.0.0 Safari/537.36"
)
_BROWSERS = (
    _CHROME_WIN.format(v=126),
    _CHROME_WIN.format(v=125),
    _CHROME_WIN.format(v=126) + " Edg/126.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
)
_OUTLOOK = (
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17231; Pro)",
    "Mozilla/4.0 (compatible; ms-office; MSOffice 16)",
    "Mozilla/5.0 (compatible; MSIE 10.0; Windows NT 6.2; WOW64; Trident/6.0; .NET4.0E; "
    ".NET4.0C; Microsoft Outlook 15.0.5589; ms-office; MSOffice 15)",
)
_THUNDERBIRD = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.5.2",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:115.0) Gecko/20100101 Thunderbird/115.5.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.2",
)
_IOS_MAIL = tuple(
    f"Mozilla/5.0 ({device}; CPU {os} {version} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
    for device, os, version in (
        ("iPhone", "iPhone OS", "17_5_1"),
        ("iPhone", "iPhone OS", "16_7_8"),
        ("iPhone", "iPhone OS", "17_1_2"),
        ("iPad", "OS", "17_5"),
    )
)
_ANDROID_WEBVIEW = tuple(  # the Gmail app (and Outlook for Android) showing a non-Gmail account
    f"Mozilla/5.0 (Linux; Android {android}; {model} Build/{build}; wv) AppleWebKit/537.36 "
    f"(KHTML, like Gecko) Version/4.0 Chrome/{chrome} Mobile Safari/537.36"
    for android, model, build, chrome in (
        ("14", "Pixel 7", "UQ1A.231205.015", "120.0.6099.144"),
        ("14", "SM-S921B", "UP1A.231005.007", "125.0.6422.165"),
        ("13", "Pixel 6", "TQ3A.230901.001", "124.0.6367.82"),
    )
)
_OUTLOOK_MOBILE = (
    "Outlook-iOS/709.2226530.prod.iphone (4.2401.0)",
    "Outlook-iOS/723.4027091.prod.iphone (4.2420.0)",
)
# Illustrative: a vendor token inside the usual compatible-agent shape (see module docstring).
_NAMED_SCANNERS = (
    "Mozilla/5.0 (compatible; Barracuda Link Protection)",
    "Mozilla/5.0 (compatible; Mimecast URL Protect)",
    "Mozilla/5.0 (compatible; Proofpoint URL Defense)",
    "Mozilla/5.0 (compatible; Microsoft Defender for Office 365 SafeLinks)",
    "Mozilla/5.0 (compatible; Trend Micro Email Security)",
)
# Gmail's "false open" fetcher (GMass, ahoy_email #139): a stale Edge 12 agent with a suffix.
_GMAIL_FALSE_OPEN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
_SCRIPTS = (
    "curl/8.5.0",
    "python-requests/2.32.3",
    "Go-http-client/1.1",
    "okhttp/4.12.0",
    "Java/17.0.11",
    "Wget/1.21.4",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/126.0.6478.126 Safari/537.36",
)

# --- networks (blocks a source's anonymised /24 or /48 is drawn from) ---------------------
_HOME = (  # residential ISPs: Comcast, Deutsche Telekom, Orange, BT, and their IPv6
    "73.0.0.0/8", "79.192.0.0/10", "90.0.0.0/9", "86.128.0.0/10",
    "2601::/20", "2003::/19", "2a01:cb00::/24",
)
_MOBILE = ("172.56.0.0/13", "2607:fb90::/32", "2600:1000::/28", "2a01:598::/32")
_OFFICE = ("62.0.0.0/10", "195.0.0.0/10", "208.0.0.0/10", "2a00:1450:4000::/37")
_GOOGLE_PROXY = ("66.249.80.0/20", "66.102.0.0/20", "74.125.208.0/20")
_YAHOO_PROXY = ("98.136.0.0/14", "74.6.0.0/16", "67.195.0.0/16")
_APPLE = ("17.0.0.0/8",)
_SCANNER_NETS = (  # Microsoft EOP, Mimecast, Proofpoint, Barracuda
    "40.92.0.0/15", "52.100.0.0/14", "205.139.110.0/23", "148.163.128.0/19", "64.235.144.0/20",
)
_CLOUD = ("3.0.0.0/9", "34.64.0.0/10", "159.89.0.0/16", "2a01:4f8::/32")


T = TypeVar("T")


class Weighted(Generic[T]):
    """A fixed weighted choice; cumulative weights are computed once, picks are cheap."""

    def __init__(self, pairs: Sequence[tuple[float, T]]) -> None:
        self.items = tuple(item for _, item in pairs)
        self.cum_weights = tuple(itertools.accumulate(weight for weight, _ in pairs))

    def pick(self, rnd: random.Random) -> T:
        return rnd.choices(self.items, cum_weights=self.cum_weights)[0]


@dataclass(frozen=True, slots=True)
class Source:
    """A kind of loader: the class of its loads, the agents and networks it uses."""

    kind: str
    true_class: str
    agents: tuple[str, ...]
    networks: tuple[str, ...]
    roams: bool = False  # a fresh network per visit (proxies, mobile data), else one per device
    repeat_rate: float = 0.0  # chance that one visit loads the image twice within seconds


_DESKTOP_SOURCES = Weighted((  # (weight, source)
    (0.55, Source("desktop", "human", _OUTLOOK, _HOME, repeat_rate=0.35)),
    (0.25, Source("desktop", "human", (MAC_MAIL,), _HOME, repeat_rate=0.2)),
    (0.20, Source("desktop", "human", _THUNDERBIRD, _HOME, repeat_rate=0.15)),
))
_PHONE_SOURCES = Weighted((
    (0.45, Source("phone", "human", _IOS_MAIL, _MOBILE, roams=True, repeat_rate=0.2)),
    (0.35, Source("phone", "human", _ANDROID_WEBVIEW, _MOBILE, roams=True, repeat_rate=0.15)),
    (0.20, Source("phone", "human", _OUTLOOK_MOBILE, _MOBILE, roams=True, repeat_rate=0.15)),
))
WEBMAIL = Source("webmail", "human", _BROWSERS, _HOME, repeat_rate=0.15)
GMAIL = Source("gmail_proxy", "proxy", (GMAIL_PROXY,), _GOOGLE_PROXY, roams=True, repeat_rate=0.1)
YAHOO = Source(
    "yahoo_proxy", "proxy", (_YAHOO, f"Mozilla/5.0 (compatible; {_YAHOO})"), _YAHOO_PROXY,
    roams=True, repeat_rate=0.1,
)
GMAIL_PREFETCH = Source("gmail_prefetch", "machine", (GMAIL_PROXY,), _GOOGLE_PROXY, roams=True)
GMAIL_FALSE_OPEN = Source(
    "gmail_false_open", "machine", (_GMAIL_FALSE_OPEN,), _GOOGLE_PROXY, roams=True
)
APPLE_MPP = Source(  # iPhones send the bare agent, Macs mostly so too
    "apple_mpp", "machine", ("Mozilla/5.0",) * 3 + (MAC_MAIL,), _APPLE, roams=True
)
_SCANNER_SOURCES = Weighted((
    (0.8, Source("scanner", "machine", _BROWSERS, _SCANNER_NETS, roams=True)),
    (0.2, Source("scanner", "machine", _NAMED_SCANNERS, _SCANNER_NETS, roams=True)),
))
_CRAWLER_SOURCES = Weighted((  # each bot with its own network
    (0.3, Source(
        "crawler", "machine",
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",),
        ("66.249.64.0/19",), roams=True,
    )),
    (0.2, Source(
        "crawler", "machine",
        ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",),
        ("157.55.39.0/24", "40.77.167.0/24"), roams=True,
    )),
    (0.2, Source(
        "crawler", "machine",
        ("facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",),
        ("31.13.64.0/18", "2a03:2880::/32"), roams=True,
    )),
    (0.2, Source(
        "crawler", "machine", ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",),
        ("3.0.0.0/9",), roams=True,
    )),
    (0.1, Source(
        "crawler", "machine",
        ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",),
        ("54.36.148.0/22",), roams=True,
    )),
))
SCRIPT = Source("script", "machine", _SCRIPTS, _CLOUD, roams=True)
_SCRIPT_SOURCES = Weighted(((1.0, SCRIPT),))

# --- the mixture of mail setups, per person type ------------------------------------------
# Candidates use personal mailboxes (Gmail and Apple Mail dominate); contacts are mostly
# corporate, many behind a security gateway that fetches every mail's images on delivery.
SETUP_WEIGHTS: dict[str, dict[str, float]] = {
    "candidate": {
        "gmail": 0.33, "apple_mpp": 0.24, "phone": 0.12, "desktop": 0.09,
        "webmail": 0.08, "yahoo": 0.08, "corporate_scanned": 0.06,
    },
    "contact": {
        "corporate_scanned": 0.36, "desktop": 0.18, "gmail": 0.14, "apple_mpp": 0.12,
        "phone": 0.09, "webmail": 0.08, "yahoo": 0.03,
    },
}
_SETUPS = {
    person_type: Weighted([(w, setup) for setup, w in weights.items()])
    for person_type, weights in SETUP_WEIGHTS.items()
}
NEVER_READS = 0.15  # share of recipients who never read (images off, dead mailbox)
GMAIL_PREFETCH_RATE = 0.35  # Gmail mails fetched by Gmail itself at delivery
GMAIL_FALSE_OPEN_RATE = 0.03
MPP_PREFETCH_RATE = 0.97  # the rest: device offline long enough that nothing is fetched
MPP_REFETCH_RATE = 0.1
SCANNER_EXTRA_FETCH = 0.4  # gateways often detonate from several hosts
CRAWLER_RATE = 0.003  # per email: forwarded to a list archive, pasted into a chat ...
SCRIPT_RATE = 0.003
REOPEN_RATE = 0.3  # after each read, the chance of another one
MAX_READS = 5
REPLY_IF_READ, REPLY_IF_UNREAD = 0.16, 0.012
UNSUBSCRIBE_IF_READ, UNSUBSCRIBE_IF_UNREAD = 0.018, 0.004

# --- what is sent ---------------------------------------------------------------------------
PROFILES = ("recruiter-anna", "recruiter-ben", "recruiter-chloe", "client-services")


@dataclass(frozen=True, slots=True)
class Template:
    person_type: str | None  # None: used for both
    subjects: tuple[tuple[str, float], ...]  # (subject line, its effect on the open rate)
    open_factor: float
    reply_factor: float


TEMPLATES: dict[str, Template] = {
    "cand_intro": Template("candidate", (
        ("Your next role in data engineering?", 1.0),
        ("Quick question about your next move", 1.1),
        ("Open to a 15-minute chat this week?", 0.9),
    ), 1.0, 1.0),
    "cand_job_match": Template("candidate", (
        ("3 roles that match your profile", 1.05),
        ("A senior role we think you'd like", 1.0),
        ("New opening: Lead Engineer, remote", 0.95),
    ), 1.1, 0.9),
    "cand_interview": Template("candidate", (
        ("Interview invitation: next steps", 1.0),
        ("Your interview is confirmed", 1.1),
    ), 1.4, 1.6),
    "client_intro": Template("contact", (
        ("Hiring plans for the next quarter?", 1.0),
        ("Candidates for your open engineering roles", 1.1),
        ("Introducing our recruitment team", 0.85),
    ), 0.8, 0.7),
    "client_shortlist": Template("contact", (
        ("Shortlist: 4 candidates for your role", 1.1),
        ("A strong candidate for your Head of Data role", 1.0),
        ("Your shortlist is ready", 0.95),
    ), 1.2, 1.3),
    "follow_up": Template(None, (
        ("Following up on my last note", 1.0),
        ("Any thoughts?", 1.1),
        ("Should I close your file?", 1.2),
    ), 0.85, 0.9),
}
SEQUENCES: dict[str, tuple[str, ...]] = {  # sequence id -> template of each step
    "seq-candidate-outreach": ("cand_intro", "cand_job_match", "follow_up"),
    "seq-candidate-reengage": ("cand_job_match", "follow_up"),
    "seq-client-development": ("client_intro", "client_shortlist", "follow_up"),
}
# What a person of each type is enrolled in: a sequence, or a one-off send of a template.
ENROLMENTS: dict[str, Weighted[tuple[str | None, tuple[str, ...]]]] = {
    "candidate": Weighted((
        (0.40, ("seq-candidate-outreach", SEQUENCES["seq-candidate-outreach"])),
        (0.25, ("seq-candidate-reengage", SEQUENCES["seq-candidate-reengage"])),
        (0.20, (None, ("cand_interview",))),
        (0.15, (None, ("cand_job_match",))),
    )),
    "contact": Weighted((
        (0.65, ("seq-client-development", SEQUENCES["seq-client-development"])),
        (0.35, (None, ("client_shortlist",))),
    )),
}
CANDIDATE_SHARE = 0.7
STEP_OPEN_FACTOR = (1.0, 0.9, 0.8)
STEP_GAP_DAYS = (2.0, 4.0)


# --- the contract ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledLoad:
    """One pixel load with the truth about it (from how the generator made it)."""

    raw: RawOpen
    true_class: str  # "human" | "proxy" | "machine"
    kind: str  # what made it: "desktop", "gmail_prefetch", "repeat", "reopen", ...


@dataclass
class Workload:
    """Everything the CRM and the mail world produce, plus the setup of each recipient."""

    sends: list[SendRegistered]
    loads: list[LabelledLoad]  # sorted by received_at
    engagements: list[Engagement]
    setups: dict[str, str] = field(default_factory=dict)  # person_id -> mail setup

    def loads_by_email(self) -> dict[str, list[LabelledLoad]]:
        grouped: dict[str, list[LabelledLoad]] = defaultdict(list)
        for load in self.loads:
            grouped[load.raw.email_id].append(load)
        return grouped

    def truth(self, window_ms: int) -> dict[str, dict]:
        """email_id -> the state a perfect pipeline shows (classes from the generator)."""
        true_class = {load.raw.event_id: load.true_class for load in self.loads}
        by_email = self.loads_by_email()

        def is_machine(raw: RawOpen) -> bool:
            return true_class[raw.event_id] == "machine"

        return {
            send.email_id: expected_state(
                [load.raw for load in by_email.get(send.email_id, ())], window_ms, is_machine
            )
            for send in self.sends
        }


def generate(
    emails: int,
    days: float = 7.0,
    seed: int = 1,
    start_ms: int | None = None,
    scanner_seconds: float = 10.0,
) -> Workload:
    """``emails`` sends spread over ``days`` from ``start_ms`` and everything they cause.

    ``start_ms`` None means midnight UTC ``days`` (rounded up) before today, so that the
    workload ends around now and is the same for every call on one UTC day.
    ``scanner_seconds`` is how soon after sending the delivery-time fetchers (gateways,
    Gmail's prefetch) strike, as the pipeline's setting of the same name assumes.
    """
    if emails < 0 or days <= 0 or scanner_seconds < 0:
        raise ValueError("emails must be >= 0, days > 0, scanner_seconds >= 0")
    if start_ms is None:
        today = time.time_ns() // 1_000_000 // DAY_MS * DAY_MS
        start_ms = today - math.ceil(days) * DAY_MS
    world = _World(random.Random(seed), start_ms, start_ms + int(days * DAY_MS), scanner_seconds)
    return world.run(emails)


# --- the world ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Device:
    """One loader a recipient's mail meets: a source with its agent and (home) network."""

    source: Source
    user_agent: str
    network: str


@dataclass(frozen=True, slots=True)
class Recipient:
    person_type: str
    person_id: str
    setup: str
    propensity: float  # chance of reading one mail, before template and step effects
    readers: tuple[Device, ...] = ()  # where reads show up (first: the usual one); () = hidden
    scanner: Device | None = None
    gmail: bool = False
    mpp: Device | None = None


@dataclass(slots=True)
class _Visit:
    """A load about to be made."""

    at: int
    device: Device
    kind: str
    network: str | None = None  # None: the device's usual (or, if it roams, a fresh) one


@cache
def _block(cidr: str) -> tuple[int, int, int, int]:
    """(first address, random bits, shift, prefix length) of the /24s or /48s inside a block."""
    net = ipaddress.ip_network(cidr)
    prefix = 24 if net.version == 4 else 48
    return int(net.network_address), prefix - net.prefixlen, net.max_prefixlen - prefix, prefix


def random_prefix(rnd: random.Random, blocks: Sequence[str]) -> str:
    """An anonymised client network (as ingest writes it) inside one of ``blocks``."""
    first, bits, shift, prefix = _block(rnd.choice(blocks))
    value = first + (rnd.getrandbits(bits) << shift)
    if prefix == 24:  # formatted by hand: most prefixes are IPv4, and ipaddress is slow
        return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.0/24"
    return f"{ipaddress.IPv6Address(value)}/48"


def _lognormal(rnd: random.Random, median_ms: float, sigma: float, cap_ms: float) -> int:
    return int(min(rnd.lognormvariate(math.log(median_ms), sigma), cap_ms))


def _working_hours(at_ms: float) -> bool:
    day, ms_of_day = divmod(int(at_ms), DAY_MS)
    return (day + 3) % 7 < 5 and 7 * HOUR_MS <= ms_of_day < 18 * HOUR_MS  # 1970-01-01: Thu


class _World:
    """Draws recipients, sends, visits and engagements, in one fixed order of random calls."""

    def __init__(self, rnd: random.Random, start_ms: int, end_ms: int, scanner_seconds: float):
        self.rnd = rnd
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.scanner_ms = scanner_seconds * SECOND_MS
        self.sends: list[SendRegistered] = []
        self.loads: list[LabelledLoad] = []
        self.engagements: list[Engagement] = []

    def run(self, emails: int) -> Workload:
        people = [self._recipient(i) for i in range(max(1, emails // 2))]
        while len(self.sends) < emails:
            self._enrol(self.rnd.choice(people), emails - len(self.sends))
        self.sends.sort(key=lambda s: (s.sent_at, s.email_id))
        self.loads.sort(key=lambda load: (load.raw.received_at, load.raw.event_id))
        self.engagements.sort(key=lambda e: (e.at, e.event_id))
        setups = {person.person_id: person.setup for person in people}
        return Workload(self.sends, self.loads, self.engagements, setups)

    def _id(self) -> str:
        return uuid.UUID(int=self.rnd.getrandbits(128), version=4).hex

    def _device(self, source: Source, networks: Sequence[str] | None = None) -> Device:
        agent = self.rnd.choice(source.agents)
        return Device(source, agent, random_prefix(self.rnd, networks or source.networks))

    # -- recipients ---------------------------------------------------------------------
    def _recipient(self, number: int) -> Recipient:
        rnd = self.rnd
        person_type = "candidate" if rnd.random() < CANDIDATE_SHARE else "contact"
        setup = _SETUPS[person_type].pick(rnd)
        propensity = 0.0 if rnd.random() < NEVER_READS else rnd.betavariate(2.0, 2.0)
        person_id = f"{person_type}-{number:06d}"
        return Recipient(person_type, person_id, setup, propensity, **self._devices(setup))

    def _devices(self, setup: str) -> dict[str, Any]:
        """The devices of one mail setup: where reads show, and who fetches without a person."""
        rnd = self.rnd
        if setup == "desktop":
            desk = self._device(_DESKTOP_SOURCES.pick(rnd))
            return {"readers": (desk, *self._maybe_phone(0.35))}
        if setup == "phone":
            phone = self._device(_PHONE_SOURCES.pick(rnd))
            webmail = (self._device(WEBMAIL),) if rnd.random() < 0.2 else ()
            return {"readers": (phone, *webmail)}
        if setup == "webmail":
            return {"readers": (self._device(WEBMAIL), *self._maybe_phone(0.3))}
        if setup == "gmail":  # every Gmail client, phone included, loads through the proxy
            return {"readers": (self._device(GMAIL),), "gmail": True}
        if setup == "yahoo":
            return {"readers": (self._device(YAHOO),)}
        if setup == "apple_mpp":  # the person's own loads never reach us, only Apple's
            return {"mpp": self._device(APPLE_MPP)}
        desk = self._device(_DESKTOP_SOURCES.pick(rnd), _OFFICE)  # corporate_scanned
        scanner = self._device(_SCANNER_SOURCES.pick(rnd))
        return {"readers": (desk, *self._maybe_phone(0.4)), "scanner": scanner}

    def _maybe_phone(self, probability: float) -> tuple[Device, ...]:
        """A second device to read on, for some people."""
        if self.rnd.random() >= probability:
            return ()
        return (self._device(_PHONE_SOURCES.pick(self.rnd)),)

    # -- sends ----------------------------------------------------------------------------
    def _enrol(self, person: Recipient, room: int) -> None:
        """One sequence (or one-off) for a person; later steps stop at a reply or unsubscribe."""
        rnd = self.rnd
        sequence_id, steps = ENROLMENTS[person.person_type].pick(rnd)
        if person.person_type == "contact" and rnd.random() < 0.6:
            profile = PROFILES[-1]
        else:
            profile = rnd.choice(PROFILES[:-1])
        sent_at = self._send_time(self.start_ms, self.end_ms)
        for step, template_id in enumerate(steps[:room], start=1):
            if sent_at >= self.end_ms:
                return
            template = TEMPLATES[template_id]
            subject, subject_factor = rnd.choice(template.subjects)
            send = SendRegistered(
                email_id=self._id(), profile_id=profile, person_type=person.person_type,
                person_id=person.person_id, template_id=template_id, subject=subject,
                sent_at=sent_at, sequence_id=sequence_id,
                sequence_step=step if sequence_id else None, registered_at=sent_at,
            )
            self.sends.append(send)
            p_read = person.propensity * template.open_factor * subject_factor
            p_read *= STEP_OPEN_FACTOR[step - 1]
            stopped_at = self._deliver(person, send, min(p_read, 0.97), template.reply_factor)
            lo, hi = (sent_at + int(d * DAY_MS) for d in STEP_GAP_DAYS)
            sent_at = self._send_time(lo, hi)
            if stopped_at is not None and stopped_at < sent_at:
                return

    def _send_time(self, lo: float, hi: float) -> int:
        """Mostly in working hours (UTC weekdays 7-18): up to four tries at landing there."""
        at = self.rnd.uniform(lo, hi)
        for _ in range(3):
            if _working_hours(at):
                break
            at = self.rnd.uniform(lo, hi)
        return int(at)

    # -- what one send causes ------------------------------------------------------------
    def _deliver(
        self, person: Recipient, send: SendRegistered, p_read: float, reply_factor: float
    ) -> int | None:
        """Make the loads and engagements of one send; return when the person replied or
        unsubscribed (which ends the sequence), if they did."""
        visits = self._machine_visits(person, send.sent_at)
        reads = self._reads(send.sent_at) if self.rnd.random() < p_read else []
        for number, read_at in enumerate(reads):
            if person.readers:
                visits.extend(self._reader_visit(person.readers, read_at, first=number == 0))
        for visit in visits:
            self._load(send.email_id, visit)
        return self._engage(send, reads[0] if reads else None, reply_factor)

    def _machine_visits(self, person: Recipient, sent_at: int) -> list[_Visit]:
        rnd = self.rnd
        visits = []
        if person.scanner is not None:
            visits.append(_Visit(self._at_delivery(sent_at), person.scanner, "scanner"))
            while rnd.random() < SCANNER_EXTRA_FETCH and len(visits) < 3:
                visits.append(_Visit(self._at_delivery(sent_at), person.scanner, "scanner"))
        if person.gmail and rnd.random() < GMAIL_PREFETCH_RATE:
            prefetcher = Device(GMAIL_PREFETCH, GMAIL_PROXY, "")
            visits.append(_Visit(self._at_delivery(sent_at), prefetcher, "gmail_prefetch"))
        if person.gmail and rnd.random() < GMAIL_FALSE_OPEN_RATE:
            fetcher = Device(GMAIL_FALSE_OPEN, _GMAIL_FALSE_OPEN, "")
            visits.append(_Visit(self._soon_after(sent_at), fetcher, "gmail_false_open"))
        if person.mpp is not None and rnd.random() < MPP_PREFETCH_RATE:
            visits.append(_Visit(self._soon_after(sent_at), person.mpp, "apple_mpp"))
            if rnd.random() < MPP_REFETCH_RATE:
                later = sent_at + _lognormal(rnd, 8 * HOUR_MS, 1.0, 7 * DAY_MS)
                visits.append(_Visit(later, person.mpp, "apple_mpp"))
        for rate, sources in ((CRAWLER_RATE, _CRAWLER_SOURCES), (SCRIPT_RATE, _SCRIPT_SOURCES)):
            if rnd.random() < rate:
                device = self._device(sources.pick(rnd))
                at = sent_at + rnd.randint(MINUTE_MS, 3 * DAY_MS)
                visits.append(_Visit(at, device, device.source.kind))
        return visits

    def _at_delivery(self, sent_at: int) -> int:
        """Inside the scanner window: gateways and Gmail fetch while delivering."""
        return sent_at + int(self.rnd.uniform(0.05, 0.95) * self.scanner_ms)

    def _soon_after(self, sent_at: int) -> int:
        """Minutes after delivery: Apple's background prefetch, Gmail's false-open fetcher."""
        return sent_at + _lognormal(self.rnd, 3 * MINUTE_MS, 1.0, 2 * DAY_MS)

    def _reads(self, sent_at: int) -> list[int]:
        """When a person reads one mail: first after minutes to days, then maybe again."""
        reads = [sent_at + _lognormal(self.rnd, 90 * MINUTE_MS, 1.9, 14 * DAY_MS)]
        while len(reads) < MAX_READS and self.rnd.random() < REOPEN_RATE:
            reads.append(reads[-1] + _lognormal(self.rnd, 5 * HOUR_MS, 1.3, 7 * DAY_MS))
        return reads

    def _reader_visit(self, readers: tuple[Device, ...], at: int, first: bool) -> list[_Visit]:
        """A read on one of the person's devices, and the client's repeated load, if any."""
        rnd = self.rnd
        device = readers[0] if len(readers) == 1 or rnd.random() < 0.75 else rnd.choice(readers)
        visit = _Visit(at, device, device.source.kind if first else "reopen")
        if rnd.random() >= device.source.repeat_rate:
            return [visit]
        visit.network = self._network(device)
        repeat_at = at + rnd.randint(300, 15 * SECOND_MS)
        return [visit, _Visit(repeat_at, device, "repeat", visit.network)]

    def _network(self, device: Device) -> str:
        if device.source.roams or not device.network:
            return random_prefix(self.rnd, device.source.networks)
        return device.network

    def _load(self, email_id: str, visit: _Visit) -> None:
        raw = RawOpen(
            event_id=self._id(), email_id=email_id, received_at=visit.at,
            user_agent=visit.device.user_agent,
            client=visit.network or self._network(visit.device),
        )
        self.loads.append(LabelledLoad(raw, visit.device.source.true_class, visit.kind))

    def _engage(self, send: SendRegistered, read_at: int | None, reply_factor: float) -> int | None:
        """Replies come mostly from readers, some hours after reading; unsubscribes soon after
        reading, or straight from the inbox list without opening. Returns when, if any."""
        rnd = self.rnd
        base = read_at if read_at is not None else send.sent_at
        p_reply = REPLY_IF_READ * reply_factor if read_at is not None else REPLY_IF_UNREAD
        p_unsubscribe = UNSUBSCRIBE_IF_READ if read_at is not None else UNSUBSCRIBE_IF_UNREAD
        if rnd.random() < p_reply:
            kind, at = "reply", base + _lognormal(rnd, 3 * HOUR_MS, 1.2, 10 * DAY_MS)
        elif rnd.random() < p_unsubscribe:
            kind, at = "unsubscribe", base + _lognormal(rnd, 2 * MINUTE_MS, 1.0, DAY_MS)
        else:
            return None
        at = max(at, base + 1)
        self.engagements.append(Engagement(self._id(), send.email_id, kind, at))
        return at
