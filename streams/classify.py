"""Classify one tracking-pixel load as ``human``, ``proxy`` or ``machine``.

The rules are data (``streams/rules.toml``) so that signatures can be reviewed and changed
without touching code; this module only compiles them and evaluates them in order. It is
pure: the only I/O is reading the packaged rule file, once.

Speed: pixel loads repeat a small set of user agents and client networks, so everything
derived from the agent (ua-parser result, which rules its agent matchers accept) and from
the network (which network rules contain it) is computed once and cached; a classification
is then a couple of cache hits and a short loop.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from ua_parser import parse

__all__ = [
    "DEFAULT_SCANNER_SECONDS",
    "LOAD_CLASSES",
    "Load",
    "Rule",
    "Rules",
    "Verdict",
    "classify_load",
]

# Delivery-time fetchers hit the pixel within seconds of the send: Google Workspace 4 s
# after sending (gophish #3086), Gmail "within seconds" (gophish #1390), "almost the exact
# time the e-mail is dispatched" (Mautic #10409). Mautic's own 2 s default is reported to
# miss gateways (Mautic #16263); OpenAEV (PR #7471) uses 10 s. sent_at is the CRM's clock,
# before the MTA queue and delivery, which pushes scanner fetches later still. A person
# rarely notices and opens a new mail within 10 s, and if one does, the email still shows
# as opened (as a machine open). Hence 10 s rather than 5.
DEFAULT_SCANNER_SECONDS: float = 10.0

LOAD_CLASSES: tuple[str, ...] = ("human", "proxy", "machine")
_RULE_VERDICTS = frozenset({"proxy", "machine"})
_RULE_KEYS = frozenset(
    {
        "name",
        "verdict",
        "ua_contains",
        "ua_regex",
        "ua_exact",
        "ua_empty",
        "device_family",
        "networks",
        "within_scanner_seconds",
    }
)
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_EMPTY_AGENTS = frozenset({"", "-"})
_UNKNOWN = "Other"
_CACHE_SIZE = 16_384

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Load:
    """What the classifier sees of one pixel load."""

    user_agent: str
    client_network: str  # "17.58.101.0/24", "2a01:111:f400::/48", a single address, or ""
    received_at: int  # epoch milliseconds, UTC
    sent_at: int | None  # the send's sent_at in epoch ms, None if not known


@dataclass(frozen=True, slots=True)
class Verdict:
    """The class of one load, why, and what ua-parser made of its agent."""

    load_class: str  # "human" | "proxy" | "machine"
    reason: str  # the rule name; "" for human
    client_family: str
    os_family: str
    device_family: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule; string matchers are stored casefolded for case-insensitive tests."""

    name: str
    verdict: str
    ua_contains: tuple[str, ...] = ()
    ua_regex: tuple[re.Pattern[str], ...] = ()
    ua_exact: frozenset[str] = frozenset()
    ua_empty: bool = False
    device_family: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()
    within_scanner_seconds: bool = False

    @property
    def has_agent_matchers(self) -> bool:
        """Whether the rule looks at the agent (if not, every agent keeps it as a candidate)."""
        agent_matchers = (self.ua_contains, self.ua_regex, self.ua_exact, self.device_family)
        return self.ua_empty or any(agent_matchers)

    def matches_agent(self, agent: str, folded: str, device_family: str) -> bool:
        """All agent matchers present in the rule accept this (stripped) agent."""
        if self.ua_empty and folded not in _EMPTY_AGENTS:
            return False
        if self.ua_exact and folded not in self.ua_exact:
            return False
        if self.ua_contains and not any(token in folded for token in self.ua_contains):
            return False
        if self.ua_regex and not any(pattern.search(agent) for pattern in self.ua_regex):
            return False
        return not self.device_family or device_family.casefold() in self.device_family

    def contains_network(self, network: Network) -> bool:
        """The client's (anonymised) network lies inside one of the rule's networks."""
        # Same IP version is checked first; mypy cannot narrow the union, hence the ignore.
        return any(
            network.version == rule_net.version and network.subnet_of(rule_net)  # type: ignore[arg-type]
            for rule_net in self.networks
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Rule:
        """Validate and compile one ``[[rules]]`` table; mistakes fail loudly at load time."""
        name = data.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"rule name must be snake_case text, got {name!r}")
        unknown = set(data) - _RULE_KEYS
        if unknown:
            raise ValueError(f"rule {name}: unknown keys {sorted(unknown)}")
        verdict = data.get("verdict")
        if verdict not in _RULE_VERDICTS:
            raise ValueError(f"rule {name}: verdict must be one of {sorted(_RULE_VERDICTS)}")
        for flag in ("ua_empty", "within_scanner_seconds"):
            if flag in data and data[flag] is not True:
                raise ValueError(f"rule {name}: {flag} can only be true (omit it otherwise)")
        try:
            rule = cls(
                name=name,
                verdict=verdict,
                ua_contains=tuple(s.casefold() for s in _strings(data, "ua_contains")),
                ua_regex=tuple(re.compile(s, re.IGNORECASE) for s in _strings(data, "ua_regex")),
                ua_exact=frozenset(s.strip().casefold() for s in _strings(data, "ua_exact")),
                ua_empty="ua_empty" in data,
                device_family=frozenset(s.casefold() for s in _strings(data, "device_family")),
                networks=tuple(ipaddress.ip_network(s) for s in _strings(data, "networks")),
                within_scanner_seconds="within_scanner_seconds" in data,
            )
        except (re.error, ValueError) as exc:
            raise ValueError(f"rule {name}: {exc}") from exc
        if not (rule.has_agent_matchers or rule.networks or rule.within_scanner_seconds):
            raise ValueError(f"rule {name}: has no matcher, it would match every load")
        return rule


def _strings(data: Mapping[str, Any], key: str) -> list[str]:
    """A matcher's list of strings; an empty or mistyped list is a config error."""
    if key not in data:
        return []
    value = data[key]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{key} must be a non-empty list of strings")
    return value


@dataclass(frozen=True, slots=True)
class _AgentProfile:
    """Everything derived from one user agent: families and the rules still in play."""

    human: Verdict
    candidates: tuple[tuple[int, Rule, Verdict], ...]  # (position, rule, verdict if it hits)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_agent(agent: str) -> tuple[str, str, str]:
    """ua-parser's (client, os, device) families; cached because parsing dominates the cost."""
    result = parse(agent)
    return (
        result.user_agent.family if result.user_agent else _UNKNOWN,
        result.os.family if result.os else _UNKNOWN,
        result.device.family if result.device else _UNKNOWN,
    )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_network(text: str) -> Network | None:
    """The client's network from an anonymised prefix or a plain address; None if unusable.

    Unknown ("") or non-address values (e.g. a keyed hash) simply match no network rule.
    An IPv4-mapped IPv6 address (``::ffff:17.1.2.3``) is treated as the IPv4 it carries.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except (ValueError, TypeError):
        return None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96), strict=False)
    return network


class Rules:
    """An ordered, compiled rule set; the first matching rule decides a load's verdict."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        names = [rule.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate rule names: {duplicates}")
        self._rules = tuple(rules)
        # Per-instance caches: they depend on this rule set, not just on their argument.
        self._cached_profile = functools.lru_cache(maxsize=_CACHE_SIZE)(self._profile)
        self._cached_network_hits = functools.lru_cache(maxsize=_CACHE_SIZE)(self._network_hits)

    @classmethod
    def from_toml(cls, text: str) -> Rules:
        """Compile rules from TOML text holding an array of ``[[rules]]`` tables."""
        data = tomllib.loads(text)
        tables = data.get("rules")
        if not isinstance(tables, list) or not tables:
            raise ValueError("rules file must hold at least one [[rules]] table")
        return cls([Rule.from_mapping(table) for table in tables])

    @classmethod
    def load(cls, path: str | Path | None = None) -> Rules:
        """Rules from ``path``, or the packaged ``streams/rules.toml`` (read once) if None."""
        if path is None:
            return _packaged_rules()
        return cls.from_toml(Path(path).read_text(encoding="utf-8"))

    @property
    def names(self) -> tuple[str, ...]:
        """Rule names in evaluation order (they are the possible reasons)."""
        return tuple(rule.name for rule in self._rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def _profile(self, agent: str) -> _AgentProfile:
        """Pre-evaluate every agent matcher once per distinct agent."""
        families = _parse_agent(agent)
        device_family = families[2]
        stripped = agent.strip()
        folded = stripped.casefold()
        candidates = tuple(
            (position, rule, Verdict(rule.verdict, rule.name, *families))
            for position, rule in enumerate(self._rules)
            if not rule.has_agent_matchers or rule.matches_agent(stripped, folded, device_family)
        )
        human = Verdict("human", "", *families)
        return _AgentProfile(human=human, candidates=candidates)

    def _network_hits(self, client_network: str) -> frozenset[int]:
        """Positions of the network rules that contain this client network."""
        network = _parse_network(client_network)
        if network is None:
            return frozenset()
        return frozenset(
            position
            for position, rule in enumerate(self._rules)
            if rule.networks and rule.contains_network(network)
        )


@functools.cache
def _packaged_rules() -> Rules:
    """The rule file shipped inside the ``streams`` package, compiled once per process."""
    text = (files("streams") / "rules.toml").read_text(encoding="utf-8")
    return Rules.from_toml(text)


def classify_load(
    load: Load, rules: Rules, scanner_seconds: float = DEFAULT_SCANNER_SECONDS
) -> Verdict:
    """Return the verdict of the first rule that matches ``load``, else ``human``.

    Timing: a load is "within the scanner window" when sent_at is known and
    ``|received_at - sent_at| <= scanner_seconds``. The window is symmetric on purpose: a
    load stamped slightly *before* sent_at is clock skew between the CRM and the pixel edge
    (nothing can load a pixel of a mail not yet sent), so it is treated as a delivery-time
    load too. A load further before sent_at than the window is bad data and gets no timing
    rule. A negative or NaN ``scanner_seconds`` disables the timing rules.
    """
    profile = rules._cached_profile(load.user_agent or "")
    if not profile.candidates:
        return profile.human
    within = False
    if load.sent_at is not None:
        within = abs(load.received_at - load.sent_at) <= scanner_seconds * 1000
    hits: frozenset[int] | None = None
    for position, rule, verdict in profile.candidates:
        if rule.within_scanner_seconds and not within:
            continue
        if rule.networks:
            if hits is None:
                hits = rules._cached_network_hits(load.client_network or "")
            if position not in hits:
                continue
        return verdict
    return profile.human
