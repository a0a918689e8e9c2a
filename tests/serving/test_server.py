"""The HTTP server's body limit: a body over DFSWEEP_MAX_BODY_MB is refused with 413 before the model (or
MLflow's JSON parsing) sees it, whether the client states its length or streams it."""
from __future__ import annotations

import asyncio
import json

import pytest

from serving.server import BODY_ENV, BodyLimit, main, max_body_bytes
from serving.image_inputs import MB_ENV


seen: list[bytes] = []  # the bodies the inner app received


def _call(app, scope: dict, chunks: list[bytes]) -> tuple[list[dict], list[bytes]]:
    """Run the ASGI app on one request sent as `chunks`; returns what it sent and the bodies the inner app got."""
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    incoming.append({"type": "http.disconnect"})
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, seen


async def inner(scope, receive, send) -> None:
    """Echo app: reads the whole body like MLflow's does, answers 200 with its length."""
    body, more = b"", True
    while more:
        m = await receive()
        body += m.get("body", b"")
        more = m.get("more_body", False)
    seen.append(body)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _scope(length: int | None) -> dict:
    headers = [(b"content-type", b"application/json")] + ([(b"content-length", str(length).encode())] if length is not None else [])
    return {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()


def test_body_within_the_limit_reaches_the_app_whole() -> None:
    sent, got = _call(BodyLimit(inner, 100), _scope(None), [b"a" * 40, b"b" * 60])
    assert sent[0]["status"] == 200 and got == [b"a" * 40 + b"b" * 60]


def test_stated_length_over_the_limit_is_refused_unread() -> None:
    sent, got = _call(BodyLimit(inner, 100), _scope(101), [b"x" * 101])
    assert sent[0]["status"] == 413 and got == []
    msg = json.loads(sent[1]["body"])["message"]
    assert "too large" in msg and BODY_ENV in msg


def test_streamed_body_over_the_limit_is_refused_without_a_length() -> None:
    sent, got = _call(BodyLimit(inner, 100), _scope(None), [b"x" * 60, b"y" * 60, b"z" * 1000])
    assert sent[0]["status"] == 413 and got == []


def test_other_scopes_pass_through() -> None:
    calls = []

    async def app(scope, receive, send) -> None:
        calls.append(scope["type"])

    asyncio.run(BodyLimit(app, 1)({"type": "lifespan"}, None, None))
    assert calls == ["lifespan"]


def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BODY_ENV, raising=False)
    monkeypatch.delenv(MB_ENV, raising=False)
    assert max_body_bytes() == int(97 * 1024 * 1024)  # 1.5 x the 64 MB image-data limit + 1 MB
    monkeypatch.setenv(MB_ENV, "10")
    assert max_body_bytes() == 16 * 1024 * 1024
    monkeypatch.setenv(BODY_ENV, "2")
    assert max_body_bytes() == 2 * 1024 * 1024


def test_bad_limit_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(BODY_ENV, "lots")
    assert main(["-m", "models:/x@champion"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BODY_ENV in err


def test_unknown_model_exits_2_with_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["-m", "models:/no-such-model@champion", "-p", "1"]) == 2
    err = capsys.readouterr().err.strip()  # MLflow may log the new store's creation first
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error:") and "no-such-model" in last
