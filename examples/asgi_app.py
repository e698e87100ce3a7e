"""A plain ASGI model server reporting its requests through `agent.hooks`, no proxy needed.

    pip install ".[examples]"      # uvicorn
    TELEMETRY_ENDPOINT_NAME=demo TELEMETRY_FILE_SINK=/tmp/calls.jsonl \
      telemetry-agent run -- uvicorn examples.asgi_app:app --port 8080

`GET /ping` answers 200; `POST /invocations` takes rows of 3 features (`[[1, 2, 3], ...]`)
and returns the linear model's predictions (examples/model.py). `hooks.ASGIMiddleware`
counts every `/invocations` request with its status and times the whole request
(ContainerLatency); the `@hooks.inference` function is the model's part (ModelLatency). The
same two lines fit a FastAPI or Starlette app: `app = hooks.ASGIMiddleware(app)` and
`@hooks.inference` on the function that runs the model (an `async def` stays a coroutine
function, so frameworks still await it).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from agent import hooks
from examples.model import LinearModel

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MODEL = LinearModel()


@hooks.inference
async def predict(rows: list[list[float]]) -> list[float]:
    """The model's part of a request: timed as ModelLatency."""
    return MODEL.predict(rows)


async def _body(receive: Receive) -> bytes:
    """The whole request body."""
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def model_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The model server: /ping and /invocations, as SageMaker calls them."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    if path == "/ping" and method == "GET":
        await _reply(send, 200, b"{}")
    elif path == "/invocations" and method == "POST":
        try:
            rows = json.loads(await _body(receive))
            answer = {"predictions": await predict(rows)}
        except (ValueError, TypeError):
            await _reply(send, 400, b'{"error": "expected rows of 3 numbers"}')
            return
        await _reply(send, 200, json.dumps(answer).encode())
    else:
        await _reply(send, 404, b'{"error": "not found"}')


app = hooks.ASGIMiddleware(model_app)
