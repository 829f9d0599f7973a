"""The app's routes as the router itself lists them, so tests cover new routes automatically."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fastapi.routing import APIRoute
from starlette.routing import Route, WebSocketRoute

_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")


def fastapi_app(asgi: Any) -> Any:
    """Unwraps the gateway middleware around the FastAPI app."""
    while not hasattr(asgi, "routes"):
        asgi = asgi.app
    return asgi


def routes(asgi: Any) -> Iterator[tuple[str, str, list[str]]]:
    """(method, path template, parameter names) for every HTTP and WebSocket route."""
    yield from _walk(fastapi_app(asgi).routes)


def _walk(route_list: list[Any]) -> Iterator[tuple[str, str, list[str]]]:
    for route in route_list:
        included = getattr(route, "original_router", None)  # FastAPI's include_router wrapper
        if included is not None:
            yield from _walk(included.routes)
        elif isinstance(route, WebSocketRoute):
            yield "WS", route.path, _PARAM.findall(route.path)
        elif isinstance(route, APIRoute | Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield method, route.path, _PARAM.findall(route.path)


def fill(path: str, ids: dict[str, str]) -> str:
    return _PARAM.sub(lambda m: ids[m.group(1)], path)
