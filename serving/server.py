"""Serve a registered model over HTTP: MLflow's own scoring app (/invocations, /ping, /health, /version) behind a
request-body limit enforced before the body is held in memory or parsed.

    python -m serving.server -m models:/deepfake-detector@champion -h 127.0.0.1 -p 5001     (make serve)

`mlflow models serve` reads and parses a body of any size before the model sees it; the model's own limits
(DFSWEEP_MAX_REQUEST_ROWS and DFSWEEP_MAX_REQUEST_MB, serving/image_inputs.py) apply to the images it decodes.
Here a body over DFSWEEP_MAX_BODY_MB megabytes (default 1.5 x DFSWEEP_MAX_REQUEST_MB + 1: room for base64 and
JSON around the image data) is answered 413 at once: from its Content-Length when the client sends one, else as
soon as the streamed bytes pass the limit, so a server holds at most the limit of any request body.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

if __package__ in (None, ""):  # python serving/server.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import ArgumentParser  # noqa: E402
from core.errors import UserError, error_line  # noqa: E402

BODY_ENV = "DFSWEEP_MAX_BODY_MB"
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def max_body_bytes() -> int:
    """The body limit in bytes from DFSWEEP_MAX_BODY_MB, else 1.5 x DFSWEEP_MAX_REQUEST_MB + 1 MB."""
    from serving.image_inputs import DEFAULT_MB, MB_ENV

    try:
        body = os.environ.get(BODY_ENV)
        mb = float(body) if body else 1.5 * float(os.environ.get(MB_ENV) or DEFAULT_MB) + 1
    except ValueError:
        raise UserError(f"{BODY_ENV} and {MB_ENV} must be numbers of megabytes") from None
    if mb <= 0:
        raise UserError(f"{BODY_ENV} must be > 0 (got {mb:g})")
    return int(mb * 1024 * 1024)


class BodyLimit:
    """ASGI middleware: an HTTP request whose body exceeds `limit` bytes gets 413 and never reaches `app`. The body
    is read here (at most `limit` bytes kept) and replayed to `app` in one message."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, int(length))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send, None)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: the client's disconnect, as the app would see it
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, length: int | None) -> None:
        size = f" ({length / 1024 / 1024:.1f} MB)" if length is not None else ""
        message = (f"request body too large{size}: the limit is {self.limit / 1024 / 1024:.1f} MB ({BODY_ENV}); "
                   "send fewer or smaller images per request")
        body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def build_app(model_uri: str, limit: int | None = None) -> BodyLimit:
    """MLflow's scoring app for `model_uri` (any MLflow model URI) inside BodyLimit."""
    from mlflow.pyfunc import scoring_server

    return BodyLimit(scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri)),
                     max_body_bytes() if limit is None else limit)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-m", "--model-uri", required=True, help="e.g. models:/deepfake-detector@champion or runs:/<id>/model")
    p.add_argument("-h", "--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=5001)
    a = p.parse_args(argv)
    try:
        limit = max_body_bytes()
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    import uvicorn
    from mlflow.exceptions import MlflowException

    from core.tracking import setup_cli

    setup_cli()
    try:
        app = build_app(a.model_uri, limit)
    except (MlflowException, OSError) as e:  # no such model, alias or artifact: name it, no traceback
        print(f"{error_line(e)} (--model_uri {a.model_uri})", file=sys.stderr)
        return 2
    uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    return 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
