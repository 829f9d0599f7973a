"""Raw ASGI error responses, for middleware that answers before any route runs."""

from __future__ import annotations

import orjson
from starlette.types import Scope, Send

from switchboard.errors import ApiError, error_body


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", "req_unknown"))


def error_headers(error: ApiError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    headers.extend((k.lower().encode(), v.encode()) for k, v in error.headers.items())
    return headers


async def send_error(scope: Scope, send: Send, error: ApiError) -> None:
    """Sends the error envelope; on a WebSocket scope it is the HTTP response that replaces the
    upgrade (the ASGI denial-response extension), so the client sees a plain 401 or 404."""
    body = orjson.dumps(error_body(error.error_code, error.message, request_id_of(scope)))
    headers = error_headers(error)
    if scope["type"] == "websocket":
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": error.status,
                    "headers": headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
