"""Raw ASGI error responses, for middleware that answers before any route runs, and the one
mapping from an unexpected exception to what the client sees."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from starlette.types import Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from switchboard.errors import ApiError, error_body
from switchboard.ids import new_id
from switchboard.outage import unavailable_dependency


@dataclass
class TooLarge(ApiError):
    """A request over a size limit (SPEC 6): 413 for a body, 431 for headers. Its code is
    INVALID_ARGUMENT, SPEC's code for a request that must change before it is sent again; the
    status names the limit. Always closes the connection: the rest is never read."""

    http_status: int = 413

    @property
    def status(self) -> int:
        return self.http_status


def body_too_large(limit: int) -> TooLarge:
    return TooLarge(
        "INVALID_ARGUMENT",
        f"The request body is larger than {limit} bytes (SWITCHBOARD_MAX_BODY_BYTES).",
        headers={"Connection": "close"},
        http_status=413,
    )


def headers_too_large(limit: int) -> TooLarge:
    return TooLarge(
        "INVALID_ARGUMENT",
        f"The request line and headers are larger than {limit} bytes.",
        headers={"Connection": "close"},
        http_status=431,
    )


def unavailable(dependency: str) -> ApiError:
    return ApiError(
        "UNAVAILABLE",
        f"The {dependency} is unavailable; nothing was changed. Retry shortly.",
        retry_after=1,
    )


def error_for_exception(error: BaseException) -> ApiError:
    """What a client sees for an exception no route handled: 503 when a dependency is down
    (SPEC 3: never a 500 for an outage), else a 500 that tells nothing of the bug."""
    dependency = unavailable_dependency(error)
    if dependency is not None:
        return unavailable(dependency)
    return ApiError("INTERNAL", "An internal error occurred.")


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", "req_unknown"))


def error_headers(error: ApiError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    headers.extend((k.lower().encode(), v.encode()) for k, v in error.headers.items())
    return headers


def error_bytes(error: ApiError, request_id: str) -> bytes:
    return orjson.dumps(error_body(error.error_code, error.message, request_id))


Header = tuple[bytes, bytes]


def raw_error(error: ApiError) -> tuple[list[Header], bytes, str]:
    """Headers (with Content-Length and X-Request-Id), body and a new request id of an error
    answered below the application, by the HTTP protocol itself."""
    request_id = new_id("req")
    body = error_bytes(error, request_id)
    headers = [
        *error_headers(error),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    return headers, body, request_id


def raw_response(status: int, headers: list[Header], body: bytes) -> bytes:
    """A whole HTTP/1.1 response as written to the socket."""
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return STATUS_LINE[status] + head + b"\r\n" + body


async def send_error(scope: Scope, send: Send, error: ApiError) -> None:
    """Sends the error envelope; on a WebSocket scope it is the HTTP response that replaces the
    upgrade (the ASGI denial-response extension), so the client sees a plain 401 or 404."""
    body = error_bytes(error, request_id_of(scope))
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
    # A known length, not chunked: the whole answer is one small body.
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
