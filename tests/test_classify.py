"""Tests for streams.classify: every rule in streams/rules.toml with real agents, the rule
engine's semantics (order, AND, networks, timing), and properties over arbitrary input.

Agents are real captures or library defaults unless marked "illustrative": security
scanners mostly hide behind browser agents, so their vendor-token rules are tested with
agents built around the vendor name the rule looks for.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.classify import (
    DEFAULT_SCANNER_SECONDS,
    LOAD_CLASSES,
    Load,
    Rules,
    Verdict,
    classify_load,
)

RULES = Rules.load()
RULES_TEXT = (files("streams") / "rules.toml").read_text(encoding="utf-8")
SENT_AT = 1_700_000_000_000  # 2023-11-14T22:13:20Z, epoch ms
SECOND = 1_000
MINUTE = 60 * SECOND
WINDOW = int(DEFAULT_SCANNER_SECONDS * SECOND)
HOME = "198.51.100.0/24"  # an ordinary client prefix (RFC 5737 TEST-NET-2)
APPLE = "17.58.101.0/24"  # inside Apple's 17.0.0.0/8

# --- real agents -------------------------------------------------------------------------
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
YAHOO_PROXY_WRAPPED = f"Mozilla/5.0 (compatible; {YAHOO_PROXY})"
HEY_PROXY = (
    "hey.com/imageproxy Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/134.0.0.0 Safari/537.36"
)
GMAIL_FALSE_OPEN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
YANDEX_PROXY = "Mozilla/5.0 (compatible; YandexImageResizer/2.0; +http://yandex.com/bots)"
BARE_MOZILLA = "Mozilla/5.0"
MAC_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
OUTLOOK_DESKTOP = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17231; Pro)"
OUTLOOK_WORD_ENGINE = "Mozilla/4.0 (compatible; ms-office; MSOffice 16)"
OUTLOOK_2013 = (
    "Mozilla/5.0 (compatible; MSIE 10.0; Windows NT 6.2; WOW64; Trident/6.0; .NET4.0E; "
    ".NET4.0C; Microsoft Outlook 15.0.5589; ms-office; MSOffice 15)"
)
OUTLOOK_IOS = "Outlook-iOS/709.2226530.prod.iphone (4.2401.0)"
THUNDERBIRD = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:115.0) Gecko/20100101 Thunderbird/115.5.0"
)
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
SAFARI_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15"
)
ANDROID_GMAIL_APP = (  # Gmail app showing a non-Gmail (IMAP/Exchange) account: WebView loads
    "Mozilla/5.0 (Linux; Android 14; Pixel 7 Build/UQ1A.231205.015; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/120.0.6099.144 Mobile Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
FACEBOOK = "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)"
HEADLESS_CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/120.0.6099.109 Safari/537.36"
)
SCRIPTED = (
    "curl/8.4.0",
    "Wget/1.21.4",
    "python-requests/2.31.0",
    "Python-urllib/3.11",
    "Python/3.11 aiohttp/3.9.1",
    "python-httpx/0.25.2",
    "Go-http-client/1.1",
    "Java/17.0.9",
    "okhttp/4.12.0",
    "libwww-perl/6.72",
    "axios/1.6.2",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "PostmanRuntime/7.36.0",
    "Apache-HttpClient/4.5.14 (Java/17.0.9)",
    HEADLESS_CHROME,
)
# --- illustrative scanner agents (vendor token + the shape scanners usually have) -------
SCANNERS = {
    "scanner_barracuda": "Mozilla/5.0 (compatible; Barracuda Link Protection)",
    "scanner_mimecast": "Mozilla/5.0 (compatible; Mimecast URL Protect)",
    "scanner_proofpoint": "Mozilla/5.0 (compatible; Proofpoint URL Defense)",
    "scanner_microsoft": "Mozilla/5.0 (compatible; Microsoft Defender for Office 365 SafeLinks)",
    "scanner_symantec": "Mozilla/5.0 (compatible; Symantec MessageLabs Email Security.cloud)",
    "scanner_trendmicro": "Mozilla/5.0 (compatible; Trend Micro Email Security)",
    "scanner_cisco": "Mozilla/5.0 (compatible; Cisco IronPort Email Security)",
    "scanner_sophos": "Mozilla/5.0 (compatible; Sophos Email Scanner)",
    "scanner_forcepoint": "Mozilla/5.0 (compatible; Forcepoint Email Security)",
    "scanner_trellix": "Mozilla/5.0 (compatible; Trellix FireEye Email Security)",
}


@dataclass(frozen=True)
class Case:
    """One load and the (class, reason) it must get."""

    id: str
    agent: str
    expected: tuple[str, str]
    network: str = HOME
    delay_ms: int | None = 10 * MINUTE  # received_at - sent_at; None: sent_at unknown

    def load(self) -> Load:
        if self.delay_ms is None:
            return Load(self.agent, self.network, SENT_AT + 10 * MINUTE, None)
        return Load(self.agent, self.network, SENT_AT + self.delay_ms, SENT_AT)


HUMAN = ("human", "")
MACHINE_DELIVERY = ("machine", "delivery_scan")

CASES: list[Case] = [
    # provider proxies
    Case("gmail_proxy", GMAIL_PROXY, ("proxy", "gmail_proxy"), "66.249.88.0/24"),
    Case("gmail_prefetch_at_delivery", GMAIL_PROXY, ("machine", "gmail_prefetch"), delay_ms=SECOND),
    Case("gmail_proxy_no_sent_at", GMAIL_PROXY, ("proxy", "gmail_proxy"), delay_ms=None),
    Case("gmail_false_open", GMAIL_FALSE_OPEN, ("machine", "gmail_false_open")),
    Case("yahoo_proxy", YAHOO_PROXY, ("proxy", "yahoo_proxy")),
    Case("yahoo_proxy_wrapped", YAHOO_PROXY_WRAPPED, ("proxy", "yahoo_proxy")),
    Case("hey_proxy", HEY_PROXY, ("proxy", "hey_proxy")),
    Case("yahoo_proxy_at_delivery", YAHOO_PROXY, MACHINE_DELIVERY, delay_ms=2 * SECOND),
    Case("yandex_proxy", YANDEX_PROXY, ("proxy", "yandex_proxy")),
    # Apple Mail Privacy Protection
    Case("apple_mpp_bare", BARE_MOZILLA, ("machine", "apple_mpp"), APPLE),
    Case("apple_mpp_mac_agent", MAC_MAIL, ("machine", "apple_mpp"), "17.120.0.0/16"),
    Case("apple_mpp_single_address", BARE_MOZILLA, ("machine", "apple_mpp"), "17.1.2.3"),
    Case("apple_mpp_beats_timing", BARE_MOZILLA, ("machine", "apple_mpp"), APPLE, SECOND),
    Case("bare_agent_elsewhere", BARE_MOZILLA, ("machine", "bare_agent")),
    Case("bare_agent_unknown_net", BARE_MOZILLA, ("machine", "bare_agent"), ""),
    Case("bare_agent_wider_prefix", BARE_MOZILLA, ("machine", "bare_agent"), "16.0.0.0/7"),
    Case("mac_mail_app_elsewhere", MAC_MAIL, HUMAN),
    Case("stripped_webkit_from_microsoft", MAC_MAIL, HUMAN, "40.94.89.0/24"),  # warmbly #569
    Case("iphone_mail_from_apple_net", IPHONE_MAIL, HUMAN, APPLE),
    Case("safari_from_apple_net", SAFARI_MAC, HUMAN, APPLE),
    # people
    Case("iphone_mail", IPHONE_MAIL, HUMAN),
    Case("outlook_desktop", OUTLOOK_DESKTOP, HUMAN),
    Case("outlook_word_engine", OUTLOOK_WORD_ENGINE, HUMAN),
    Case("outlook_2013", OUTLOOK_2013, HUMAN),
    Case("outlook_ios", OUTLOOK_IOS, HUMAN),
    Case("thunderbird", THUNDERBIRD, HUMAN),
    Case("chrome_webmail", CHROME_WINDOWS, HUMAN, "2a01:4f8:1c0c::/48"),
    Case("android_gmail_app", ANDROID_GMAIL_APP, HUMAN),
    Case("human_no_sent_at", CHROME_WINDOWS, HUMAN, delay_ms=None),
    # timing
    Case("delivery_scan_1s", CHROME_WINDOWS, MACHINE_DELIVERY, delay_ms=SECOND),
    Case("delivery_scan_at_send", OUTLOOK_DESKTOP, MACHINE_DELIVERY, delay_ms=0),
    Case("delivery_scan_clock_skew", CHROME_WINDOWS, MACHINE_DELIVERY, delay_ms=-2 * SECOND),
    Case("delivery_scan_edge", THUNDERBIRD, MACHINE_DELIVERY, delay_ms=WINDOW),
    Case("skew_edge", THUNDERBIRD, MACHINE_DELIVERY, delay_ms=-WINDOW),
    Case("just_after_window", THUNDERBIRD, HUMAN, delay_ms=WINDOW + 1),
    Case("just_before_window", THUNDERBIRD, HUMAN, delay_ms=-WINDOW - 1),
    Case("long_before_send", CHROME_WINDOWS, HUMAN, delay_ms=-10 * MINUTE),
    Case("crawler_in_window_is_delivery_scan", GOOGLEBOT, MACHINE_DELIVERY, delay_ms=SECOND),
    # bots and scripts
    Case("googlebot", GOOGLEBOT, ("machine", "crawler")),
    Case("bingbot", BINGBOT, ("machine", "crawler")),
    Case("facebook_preview", FACEBOOK, ("machine", "crawler")),
    *(Case(f"scripted:{agent}", agent, ("machine", "scripted_client")) for agent in SCRIPTED),
    Case("scripted_in_window", "curl/8.4.0", ("machine", "scripted_client"), delay_ms=0),
    Case("empty_agent", "", ("machine", "empty_agent")),
    Case("blank_agent", "   ", ("machine", "empty_agent")),
    Case("dash_agent", "-", ("machine", "empty_agent")),
    # security scanners
    *(Case(name, agent, ("machine", name)) for name, agent in SCANNERS.items()),
    Case("scanner_network_v4", CHROME_WINDOWS, ("machine", "scanner_network"), "192.0.2.0/24"),
    Case("scanner_network_v6", CHROME_WINDOWS, ("machine", "scanner_network"), "2001:db8:1::/48"),
    Case("scanner_network_address", CHROME_WINDOWS, ("machine", "scanner_network"), "192.0.2.7"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case: Case) -> None:
    verdict = classify_load(case.load(), RULES)
    assert (verdict.load_class, verdict.reason) == case.expected


def test_every_rule_is_exercised() -> None:
    """A rule nobody tests is a rule nobody knows still works: each must win some case."""
    names = {table["name"] for table in tomllib.loads(RULES_TEXT)["rules"]}
    reasons = {classify_load(case.load(), RULES).reason for case in CASES}
    assert names - reasons == set()
    assert set(RULES.names) == names


def test_packaged_rules_are_loaded_once() -> None:
    assert Rules.load() is RULES


def test_rules_load_from_path(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "x"\nverdict = "machine"\nua_contains = ["curl"]\n')
    assert Rules.load(path).names == ("x",)


def test_verdict_carries_ua_parser_families() -> None:
    assert classify_load(Load(OUTLOOK_DESKTOP, HOME, SENT_AT, None), RULES) == Verdict(
        "human", "", "Outlook", "Windows", "Other"
    )
    iphone = classify_load(Load(IPHONE_MAIL, HOME, SENT_AT, None), RULES)
    assert (iphone.os_family, iphone.device_family) == ("iOS", "iPhone")
    empty = classify_load(Load("", "", SENT_AT, None), RULES)
    assert (empty.client_family, empty.os_family, empty.device_family) == ("Other",) * 3


def test_scanner_seconds_is_a_parameter() -> None:
    load = Load(CHROME_WINDOWS, HOME, SENT_AT + 20 * SECOND, SENT_AT)
    assert classify_load(load, RULES).load_class == "human"
    assert classify_load(load, RULES, scanner_seconds=30).reason == "delivery_scan"
    at_send = Load(CHROME_WINDOWS, HOME, SENT_AT, SENT_AT)
    assert classify_load(at_send, RULES, scanner_seconds=-1).load_class == "human"


# --- rule engine semantics on small rule sets --------------------------------------------

ENGINE_RULES = Rules.from_toml(
    """
    [[rules]]
    name = "both"
    verdict = "machine"
    ua_contains = ["Probe"]
    networks = ["10.0.0.0/8", "fd00::/8"]

    [[rules]]
    name = "probe"
    verdict = "proxy"
    ua_regex = ['^probe/\\d+$']

    [[rules]]
    name = "spider"
    verdict = "machine"
    device_family = ["spider"]
    """
)


@pytest.mark.parametrize(
    ("agent", "network", "reason"),
    [
        ("probe/1", "10.1.2.0/24", "both"),  # first match wins over "probe"
        ("probe/1", "fd00:1::/48", "both"),
        ("probe/1", "::ffff:10.1.2.3", "both"),  # IPv4-mapped address counts as IPv4
        ("probe/1", "11.0.0.0/24", "probe"),  # AND: agent alone is not enough for "both"
        ("probe/1", "10.0.0.0/7", "probe"),  # prefix wider than the rule's network
        ("probe/1", "k:3f9a1c", "probe"),  # a keyed hash is no network
        ("PROBE/1", "", "probe"),  # regexes are case-insensitive
        ("probe/1 extra", "", ""),  # the regex is anchored at both ends
        (GOOGLEBOT, "10.0.0.0/24", "spider"),  # device family compared ignoring case
        (CHROME_WINDOWS, "10.0.0.0/24", ""),
    ],
)
def test_engine_semantics(agent: str, network: str, reason: str) -> None:
    assert classify_load(Load(agent, network, SENT_AT, None), ENGINE_RULES).reason == reason


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('name = "a"\nverdict = "human"\nua_empty = true', "verdict"),
        ('name = "a"\nverdict = "machine"', "no matcher"),
        ('name = "a"\nverdict = "machine"\nua_contain = ["x"]', "unknown keys"),
        ('name = "a"\nverdict = "machine"\nua_regex = ["("]', "rule a"),
        ('name = "a"\nverdict = "machine"\nnetworks = ["17.0.0.1/8"]', "host bits"),
        ('name = "a"\nverdict = "machine"\nua_contains = []', "non-empty"),
        ('name = "a"\nverdict = "machine"\nua_empty = false', "only be true"),
        ('name = "A b"\nverdict = "machine"\nua_empty = true', "snake_case"),
    ],
)
def test_bad_rules_fail_at_load(body: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rules.from_toml(f"[[rules]]\n{body}\n")


def test_duplicate_rule_names_fail() -> None:
    table = '[[rules]]\nname = "a"\nverdict = "machine"\nua_empty = true\n'
    with pytest.raises(ValueError, match="duplicate"):
        Rules.from_toml(table * 2)


def test_empty_rule_file_fails() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Rules.from_toml("")


# --- properties ----------------------------------------------------------------------------

KNOWN_AGENTS = [case.agent for case in CASES]
agents = st.one_of(
    st.text(),
    st.sampled_from(KNOWN_AGENTS),
    st.builds(str.__add__, st.sampled_from(KNOWN_AGENTS), st.text(max_size=20)),
)
networks = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", HOME, APPLE, "192.0.2.0/24", "2001:db8::/48", "::ffff:17.0.0.1"]),
    st.builds(
        lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda address, prefix: str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
    st.ip_addresses().map(str),
)
times = st.integers(-(2**63), 2**63)
near_times = st.integers(SENT_AT - MINUTE, SENT_AT + MINUTE)
loads = st.builds(
    Load,
    user_agent=agents,
    client_network=networks,
    received_at=st.one_of(times, near_times),
    sent_at=st.one_of(st.none(), times, st.just(SENT_AT)),
)


@given(loads)
def test_any_load_gets_a_well_formed_verdict(load: Load) -> None:
    verdict = classify_load(load, RULES)
    assert verdict.load_class in LOAD_CLASSES
    if verdict.load_class == "human":
        assert verdict.reason == ""
    else:
        assert verdict.reason in RULES.names
    assert all((verdict.client_family, verdict.os_family, verdict.device_family))


@given(loads)
def test_no_timing_reason_without_sent_at(load: Load) -> None:
    unknown = Load(load.user_agent, load.client_network, load.received_at, None)
    assert classify_load(unknown, RULES).reason not in {"delivery_scan", "gmail_prefetch"}


@given(loads)
def test_caches_do_not_change_verdicts(load: Load) -> None:
    """A fresh rule set (cold caches) decides exactly like the long-lived one."""
    fresh = Rules.from_toml(RULES_TEXT)
    assert classify_load(load, fresh) == classify_load(load, RULES)
