"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from opentrack.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opentrack", "ingest", "streams", "warehouse", "dashboards")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def settings_read_by_code() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"\"(OPENTRACK_[A-Z_]+)\"", path.read_text()))
    return names


def test_compose_parses_and_has_the_production_shape() -> None:
    services = compose()["services"]
    assert {"kafka", "clickhouse", "web", "worker", "loader"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name in ("kafka", "clickhouse", "web"):
        assert "healthcheck" in services[name], name


def test_every_service_command_exists_in_the_cli() -> None:
    runner = CliRunner()
    for name, service in compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "opentrack":
            continue
        result = runner.invoke(main, [*command[1:], "--help"])
        assert result.exit_code == 0, f"{name}: `{' '.join(command)}` is not a command"


def test_every_setting_passed_is_read_by_the_code() -> None:
    read = settings_read_by_code()
    for name, service in compose()["services"].items():
        for key in service.get("environment") or {}:
            if key.startswith("OPENTRACK_"):
                assert key in read, f"{name} passes {key}, which no code reads"
