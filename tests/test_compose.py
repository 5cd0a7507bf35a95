"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from opentrack.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opentrack", "ingest", "streams", "warehouse", "dashboards")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def strings_in_code(pattern: str) -> set[str]:
    """What ``pattern``'s group matches anywhere in the packages' Python sources."""
    found: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found.update(re.findall(pattern, path.read_text()))
    return found


def settings_read_by_code() -> set[str]:
    return strings_in_code(r"\"(OPENTRACK_[A-Z_]+)\"")


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


# --- observability: Prometheus and Grafana (profile "observability") -----------------------
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "opentrack.json"
WORKER_METRICS = ("opentrack_worker_events_total", "opentrack_worker_loads_total",
                  "opentrack_worker_processing_seconds", "opentrack_worker_consumer_lag")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def metrics_defined_in_code() -> set[str]:
    return strings_in_code(r"[\"'](opentrack_[a-z0-9_]+)[\"']")


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert exprs, "the dashboard has no queries"
    referenced = set()
    for expr in exprs:
        for name in re.findall(r"\b(opentrack_[a-z0-9_]+)", expr):
            for suffix in HISTOGRAM_SERIES:
                name = name.removesuffix(suffix)
            referenced.add(name)
    return referenced


def test_observability_services_are_optional_and_start_in_order() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
        assert "healthcheck" in services[name], name
    assert services["prometheus"]["depends_on"]["web"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("web", "worker", "loader"):
        assert "profiles" not in services[name]
        assert "healthcheck" in services[name], name
        for dependency in ("kafka", "clickhouse"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{service} mounts missing {source}"


def test_workers_scale_and_the_web_runs_several_processes() -> None:
    services = compose()["services"]
    for name in ("worker", "loader"):  # `--scale name=N` needs no fixed name or host port
        assert "container_name" not in services[name] and "ports" not in services[name]
    web_env = services["web"]["environment"]
    assert int(web_env["OPENTRACK_WEB_WORKERS"]) > 1
    assert int(services["worker"]["environment"]["OPENTRACK_PARTITIONS"]) >= 4


def test_prometheus_scrapes_every_process_where_it_serves_metrics() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("web", "worker", "loader"):
        (discovery,) = jobs[f"opentrack-{name}"]["dns_sd_configs"]
        assert discovery["names"] == [name]
        env = services[name]["environment"]
        listen = env["OPENTRACK_LISTEN"] if name == "web" else env["OPENTRACK_METRICS_LISTEN"]
        assert int(listen.rsplit(":", 1)[1]) == discovery["port"], name


def test_grafana_provisioning_parses_and_matches_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "opentrack.yml").read_text())[
        "providers"]
    grafana = compose()["services"]["grafana"]
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro")
               for v in grafana["volumes"]), "the dashboards folder is not mounted where read"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", ())}
    assert uids == {source["uid"]}


def test_every_metric_on_the_dashboard_is_defined_in_the_code() -> None:
    missing = dashboard_metrics() - metrics_defined_in_code()
    assert not missing, f"not defined anywhere: {sorted(missing)}"
    assert "opentrack_warehouse_query_seconds" in dashboard_metrics()


def test_the_worker_metrics_are_on_the_dashboard() -> None:
    assert set(WORKER_METRICS) <= dashboard_metrics() & metrics_defined_in_code()


def test_loaders_start_after_one_migration() -> None:
    """Several loaders starting together would each rebuild the tables of a migration."""
    services = compose()["services"]
    assert services["migrate"]["command"] == ["opentrack", "migrate"]
    assert services["migrate"]["restart"] == "no"
    needs = services["loader"]["depends_on"]
    assert needs["migrate"] == {"condition": "service_completed_successfully"}
    assert needs["kafka"]["condition"] == needs["clickhouse"]["condition"] == "service_healthy"


def test_the_migrate_command_brings_a_warehouse_to_the_latest_version(tmp_path) -> None:
    """In its own process: chDB holds one warehouse per process, and the tests' own is open."""
    import os
    import subprocess
    import sys

    from warehouse.schema import LATEST

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENTRACK_")}
    env.update(OPENTRACK_DATA_DIR=str(tmp_path), OPENTRACK_SECRET="s" * 32,
               OPENTRACK_API_KEY="k" * 32)

    def run() -> str:
        done = subprocess.run([sys.executable, "-m", "opentrack.cli", "migrate"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stdout

    applied = ", ".join(str(v) for v in range(1, LATEST + 1))
    assert f"schema version {LATEST}; applied now: {applied}" in run()
    assert "applied now: none" in run()
