"""Bind the pure classifier to the worker: rules loaded once, the scanner window from settings."""

from __future__ import annotations

from opentrack.events import RawOpen
from opentrack.settings import Settings
from streams import classify
from streams.state import Classifier, Verdict


def classifier_from_settings(settings: Settings) -> Classifier:
    rules = classify.Rules.load(settings.rules_path)
    seconds = settings.scanner_seconds

    def classify_raw(raw: RawOpen, sent_at: int | None) -> Verdict:
        v = classify.classify_load(
            classify.Load(raw.user_agent, raw.client, raw.received_at, sent_at), rules, seconds
        )
        return Verdict(v.load_class, v.reason, v.client_family, v.os_family, v.device_family)

    return classify_raw
