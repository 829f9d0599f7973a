"""The ASGI application: routes, error mapping to the SPEC envelope, gateway middleware, OpenAPI."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from switchboard import __version__
from switchboard.api.deps import Services
from switchboard.api.early_refusal import EarlyRefusal
from switchboard.api.limits import WorkspaceLimits
from switchboard.api.middleware import (
    Authentication,
    BodyLimit,
    RequestContext,
    StreamDispatch,
    WriteDeadline,
)
from switchboard.api.models import ErrorBody
from switchboard.api.responses import error_for_exception, error_headers
from switchboard.api.routes import (
    agents,
    calls,
    conversations,
    health,
    keys,
    messages,
    streams,
    webhooks,
    workspace,
)
from switchboard.errors import ApiError, error_body

# The dashboard loads only its own files and talks only to this server.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ConsoleFiles(StaticFiles):
    """The console's modules and styles, revalidated on every load (a 304 by ETag when they
    have not changed), so a browser never runs an upgraded page with a stale module."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED"),
        (404, "NOT_FOUND"),
        (413, "INVALID_ARGUMENT: the body is over SWITCHBOARD_MAX_BODY_BYTES"),
        (431, "INVALID_ARGUMENT: the request head is over SWITCHBOARD_MAX_HEADER_BYTES"),
        (
            429,
            "RATE_LIMITED: the workspace is over SWITCHBOARD_WORKSPACE_RATE_PER_MINUTE requests "
            "a minute, or sends them faster than its burst allowance "
            "(SWITCHBOARD_WORKSPACE_BURST_SECONDS of that rate at once), or is over "
            "SWITCHBOARD_WORKSPACE_MAX_STREAMS open streams, across all replicas; see "
            "Retry-After and X-RateLimit-Limit / -Remaining / -Reset",
        ),
        (500, "INTERNAL: a bug; the body never carries a stack trace"),
        (503, "UNAVAILABLE: a dependency is down and nothing was changed; see Retry-After"),
        (504, "DEADLINE_EXCEEDED"),
    )
}


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


RESUME_PARAMETERS = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "The `id:` of the last frame received: the stream first sends every "
        "durable frame after it (SPEC 5.4). EventSource sends it by itself on a reconnect.",
    },
    _query("last_event_id", "The same cursor, for a first connection."),
]


def _stream_operation(
    summary: str,
    description: str,
    token: bool,
    param: str | None,
    extra: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = (
        [{"name": param, "in": "path", "required": True, "schema": {"type": "string"}}]
        if param
        else []
    )
    parameters.extend(extra or [])
    if token:
        parameters.append(
            {
                "name": "token",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "API key or stream token, for clients that cannot set headers.",
            }
        )
    return {
        "get": {
            "tags": ["streams"],
            "summary": summary,
            "description": description,
            "parameters": parameters,
            "responses": {
                "200": {"description": "The stream.", "content": {"text/event-stream": {}}},
                "101": {"description": "Switching Protocols (WebSocket)."},
                "204": {"description": "The call has already ended."},
                **{str(k): {"description": v["description"]} for k, v in ERROR_RESPONSES.items()},
            },
        }
    }


STREAM_PATHS: dict[str, Any] = {
    "/v1/calls/{call_id}/transcript/stream": _stream_operation(
        "Live call transcript (SSE)",
        "Unnamed events with `id:` and one `data:` line per turn, partial or final; "
        "`event: end` when the call ends; 204 if it already has (without a cursor or "
        "`from=start`); `event: gap`, `event: reset`; terminal `event: error`; "
        "`: keep-alive` comments.",
        True,
        "call_id",
        [
            *RESUME_PARAMETERS,
            _query("from", "`start`: every final turn so far, the turn in flight, then live."),
        ],
    ),
    "/v1/conversations/{conversation_id}/stream": _stream_operation(
        "Live conversation events (SSE)",
        "One envelope per event as unnamed SSE events with `id:` cursors; `event: gap`, "
        "`event: reset`. Authorization header only.",
        False,
        "conversation_id",
        RESUME_PARAMETERS,
    ),
    "/v1/calls/{call_id}/stream": _stream_operation(
        "Live call events (WebSocket)",
        "Upgrade to a WebSocket: one JSON envelope per text frame; send "
        '`{"action": "send_dtmf", "digits": "12#", "request_id": "r1"}` and receive a '
        "`command.result`. Close codes 1000, 1003, 1008, 1009, 1011, 1012. Without a cursor "
        "the call's events so far are replayed first. `listen` / `unlisten` turn the call's "
        "live audio on and off: binary frames of 640 bytes, 20 ms of 16 kHz mono signed "
        "16-bit little-endian PCM each.",
        True,
        "call_id",
        [_query("last_event_id", "The event_id of the last envelope received: resume after it.")],
    ),
    "/v1/events/stream": _stream_operation(
        "Every event of the workspace (SSE)",
        "One envelope per event, calls and conversations, as unnamed SSE events with cursors; "
        "resume, `gap`, `reset`, heartbeats as for the other streams. Authorization header "
        "only.",
        False,
        None,
        [
            *RESUME_PARAMETERS,
            _query(
                "event_types",
                "Comma-separated event types; a trailing `*` matches a prefix "
                "(`call.initiated,message.*`).",
            ),
        ],
    ),
}


def error_response(request: Request, error: ApiError) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id", "req_unknown")
    headers = {k.decode(): v.decode() for k, v in error_headers(error) if k != b"content-type"}
    return JSONResponse(
        error_body(error.error_code, error.message, request_id), error.status, headers
    )


def _field_message(error: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ())]
    field = ".".join(location[1:]) if len(location) > 1 else (location[0] if location else "body")
    if error.get("type") == "string_pattern_mismatch":
        if field.endswith("_number"):
            return f"{field}: must be an E.164 phone number such as +14155550123"
        if field.endswith("_id"):
            prefix = str(error.get("ctx", {}).get("pattern", "^x_"))[1:].split("_")[0]
            return f"{field}: must be an id of the form {prefix}_..."
    if error.get("type") == "json_invalid":
        return "body: is not valid JSON"
    if location == ["body"] and error.get("type") in ("model_attributes_type", "dict_type"):
        return "body: must be a JSON object (send Content-Type: application/json)"
    if error.get("type") == "extra_forbidden":
        return f"{field}: is not a field of this request"
    return f"{field}: {error.get('msg', 'is invalid')}"


def _http_error(request: Request, exc: HTTPException) -> ApiError:
    if exc.status_code in (404, 405):
        # No route for this path or method: a 404 either way, so the surface is not enumerable.
        return ApiError("NOT_FOUND", f"No route {request.method} {request.url.path}.")
    if exc.status_code == 400:
        # The framework could not read the body: not UTF-8, nested past the parser's depth,
        # a number too long to convert. (Valid JSON of the wrong shape is a validation error.)
        return ApiError("INVALID_ARGUMENT", "body: could not be decoded; send a UTF-8 JSON object.")
    if exc.status_code < 500:
        return ApiError("INVALID_ARGUMENT", f"The request was refused ({exc.status_code}).")
    return ApiError("INTERNAL", "An internal error occurred.")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [_field_message(dict(e)) for e in exc.errors()[:3]]
        return error_response(request, ApiError("INVALID_ARGUMENT", "; ".join(problems)))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(request, _http_error(request, exc))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The framework re-raises after this answer, so RequestContext (outermost) still sees
        # the exception: it logs an outage once through its OutageLog, a bug with its traceback.
        return error_response(request, error_for_exception(exc))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def create_app(services: Services) -> ASGIApp:
    """The whole HTTP surface, wrapped in the gateway middleware (outermost first: request id
    and the last word on errors, body limit, write deadline, authentication)."""
    app = FastAPI(
        title="Switchboard",
        version=__version__,
        description="Live streams, webhooks and REST for calls and conversations.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # A body sent without a Content-Type is read as JSON: curl users forget the header.
        strict_content_type=False,
        # Paths are exact: /v1/calls/ is a 404 envelope like any unknown path, not a redirect
        # whose Location echoes the request's path back.
        redirect_slashes=False,
        # FastAPI's OpenTelemetry hooks asked, on every request, whether a provider had been
        # configured since (environment lookups, a tenth of a small request's CPU); nothing
        # here configures one, and /metrics is our own (docs/decisions.md).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.services = services
    for module in (workspace, keys, agents, calls, conversations, messages, streams, webhooks):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.include_router(health.router)
    stream_routes = streams.stream_routes(services)
    app.router.routes.extend(stream_routes)
    install_error_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "pk_live_... key"}
            }
            schema["paths"].update(STREAM_PATHS)
            for path, operations in schema["paths"].items():
                if path.startswith("/v1"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    web = Path(__file__).resolve().parent.parent / "web"
    app.mount("/web", ConsoleFiles(directory=web), name="web")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(web / "index.html", headers=DASHBOARD_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # for pages that do not name theirs (/docs)
        return FileResponse(web / "favicon.svg", media_type="image/svg+xml")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(openapi()))

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        # Under `serve --workers N`, the sum over every process of the serve.
        siblings = services.siblings
        text = await siblings.render() if siblings is not None else services.metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    limiter = WorkspaceLimits(
        StreamDispatch(app, list(stream_routes)), services.limits, services.metrics
    )
    gateway = RequestContext(
        BodyLimit(
            WriteDeadline(
                Authentication(limiter, services.authenticator, services.metrics),
                services.settings.write_deadline,
            ),
            services.settings.max_body_bytes,
        ),
        bus_connected=lambda: services.bus.connected,
    )
    # What the HTTP protocol refuses itself, before this stack (api/early_refusal.py).
    gateway.early_refusal = EarlyRefusal(services.authenticator, limiter, services.metrics)
    return gateway


def render_docs(schema: dict[str, Any]) -> str:
    """A self-contained reference page (no CDN, so it works offline and behind firewalls)."""
    rows = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            summary = html.escape(operation.get("summary", ""))
            detail = html.escape(operation.get("description", "")).replace("\n", "<br>")
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code>"
                f"</td><td><b>{summary}</b><br>{detail}</td></tr>"
            )
    return (
        "<!doctype html><meta charset=utf-8><title>Switchboard API</title>"
        "<style>body{font:15px system-ui;margin:2em}td{padding:.4em;vertical-align:top;"
        "border-bottom:1px solid #ddd}</style>"
        f"<h1>Switchboard API {html.escape(schema['info']['version'])}</h1>"
        "<p>Every <code>/v1</code> route takes <code>Authorization: Bearer &lt;key&gt;</code>. "
        "Machine-readable: <a href=/openapi.json>/openapi.json</a>.</p>"
        f"<table>{''.join(rows)}</table>"
    )
