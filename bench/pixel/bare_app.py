"""The pixel without OpenTrack: a bare Flask app answering /o/<anything> with the same GIF
bytes and headers, so the benchmark can tell the server's cost from the pipeline's.

``gunicorn bare_app:app`` serves it for (b); ``python bare_app.py`` serves it for (e) with
exactly the Granian arguments of ``opentrack web`` (see ``serve_like_opentrack_web``).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response

from ingest.pixel import GIF, NO_CACHE  # the very bytes and headers OpenTrack sends


def create_app() -> Flask:
    app = Flask("bare_pixel")

    @app.route("/o/<path:rest>", methods=["GET", "HEAD"])
    def pixel(rest: str) -> Response:
        return Response(GIF, status=200, headers=NO_CACHE)

    return app


app = create_app()


def serve_like_opentrack_web() -> None:
    """Run ``opentrack web`` itself with only the application swapped for this one.

    Copying its Granian arguments here would drift when they change; intercepting the
    ``Granian`` constructor keeps workers, threads, log level and the rest identical.
    """
    import granian

    from opentrack import cli

    real = granian.Granian

    def swapped(target: str, *args: Any, **kwargs: Any) -> Any:
        return real("bare_app:create_app", *args, **kwargs)

    granian.Granian = swapped  # type: ignore[misc]
    cli.main(["web"])


if __name__ == "__main__":
    serve_like_opentrack_web()
