"""The web application: pixel, intake API, CRM reads, analytics, dashboards and health.

The app is assembled here, above the stages, so that no stage imports one downstream of it:
``ingest`` contributes the pixel (plain WSGI in front of Flask) and the intake blueprint,
``warehouse`` the CRM reads, ``dashboards`` the analytics API and the analysts' pages.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dashboards import api as analytics_api
from dashboards import pages as dashboard_pages
from ingest import intake, pixel
from ingest.metrics import API_REQUESTS
from ingest.publish import Publisher
from opentrack.health import Readiness
from opentrack.http import json_error
from opentrack.per_process import PerProcess
from opentrack.profiles import ProfileFollower, ProfileSwitches
from opentrack.settings import Settings
from opentrack.tokens import TokenSigner
from warehouse import api as crm_api
from warehouse.engines import reader_engine

MAX_BODY_BYTES = 2 * 1024 * 1024  # a batch of 1,000 sends fits comfortably


def create_app(settings: Settings | None = None, eager: bool = True) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("opentrack")
    app.config["OPENTRACK"] = settings
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.url_map.merge_slashes = False  # /o//x.gif must get the GIF, not a redirect
    app.url_map.strict_slashes = False

    app.extensions["opentrack.signer"] = TokenSigner(settings.secret, settings.previous_secrets)
    app.extensions["opentrack.publisher"] = PerProcess(
        lambda: Publisher(lambda: settings.bootstrap, settings.data_dir / "spool")
    )
    if eager:  # deliver what a killed predecessor left in the spool, without waiting for a load
        app.extensions["opentrack.publisher"]()
    app.extensions["opentrack.warehouse"] = PerProcess(
        lambda: reader_engine(settings.clickhouse_url, settings.warehouse_socket)
    )

    def follow_profiles() -> ProfileSwitches:
        follower = ProfileFollower(lambda: settings.bootstrap)
        follower.wait_caught_up(5)  # a new send must see the switches made before it
        return follower.switches

    app.extensions["opentrack.profiles"] = PerProcess(follow_profiles)
    app.extensions["opentrack.readiness"] = PerProcess(lambda: Readiness(settings))

    app.register_blueprint(intake.bp)
    app.register_blueprint(crm_api.bp)
    app.register_blueprint(analytics_api.bp)
    app.register_blueprint(dashboard_pages.bp)
    app.wsgi_app = pixel.pixel_in_front(app, app.wsgi_app)  # type: ignore[method-assign]

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        """Readiness: 200 when Kafka and the warehouse answer, else 503 saying which not."""
        ready, report = app.extensions["opentrack.readiness"]().report()
        return jsonify(report), 200 if ready else 503

    @app.get("/livez")
    def livez() -> Response:
        """Liveness: the process serves requests (the pixel works even with Kafka away)."""
        return jsonify({"status": "alive"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)

    @app.after_request
    def count_api(response: Response) -> Response:
        if request.path.startswith("/v1/"):
            route = request.url_rule.rule if request.url_rule else "unmatched"
            API_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
        return response

    @app.errorhandler(404)
    def not_found(_exc: Any) -> Response:
        return json_error(404, f"no such endpoint: {request.method} {request.path}")

    @app.errorhandler(405)
    def not_allowed(_exc: Any) -> Response:
        return json_error(405, f"{request.method} is not allowed on {request.path}")

    @app.errorhandler(413)
    def too_large(_exc: Any) -> Response:
        return json_error(413, f"request body larger than {MAX_BODY_BYTES} bytes")

    @app.errorhandler(400)
    def bad_request(_exc: Any) -> Response:
        return json_error(400, "malformed request")

    return app


def _registry() -> Any:
    """All worker processes' metrics when the server runs several (multiprocess mode)."""
    from prometheus_client import REGISTRY, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY
