"""A small falcon WSGI app served by hio's HTTP server (topologies/http.toml and
https.toml), and the same app for gunicorn (bench/services.py): ``nodes.web:app``.

``GET /hello`` says hello (with the replica that answered, in a header);
``GET /items/N`` returns a small JSON document; ``GET /boom`` raises, to show a
500 that does not stop the replica.
"""

from __future__ import annotations

from typing import Any

import falcon

from hiocluster.service import WsgiService


class _Hello:
    def __init__(self, greeting: str, replica: str) -> None:
        self.greeting, self.replica = greeting, replica

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.set_header("X-Replica", self.replica)
        resp.text = f"{self.greeting}\n"


class _Items:
    def on_get(self, req: falcon.Request, resp: falcon.Response, number: int) -> None:
        resp.media = {"item": number, "square": number * number}


class _Boom:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise RuntimeError("boom: this handler always raises")


def make_app(greeting: str = "hello", replica: str = "-") -> Any:
    """The falcon app."""
    app = falcon.App()
    app.add_route("/hello", _Hello(greeting, replica))
    app.add_route("/items/{number:int}", _Items())
    app.add_route("/boom", _Boom())
    return app


#: For gunicorn: ``gunicorn nodes.web:app``.
app = make_app()


class Web(WsgiService):
    """The app, on hio's WSGI server; params: ``greeting``."""

    def app(self) -> Any:
        return make_app(str(self.params.get("greeting", "hello")), str(self.replica))
