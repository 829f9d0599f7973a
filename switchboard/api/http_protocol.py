"""uvicorn's HTTP/1.1 (httptools) and WebSocket (websockets sans-I/O) protocols with what the
gateway needs below the ASGI application: a 16 KiB limit on a request's head, enforced before
the parser has buffered more (SPEC 6: 431), and the error envelope with an `X-Request-Id` on
every answer this layer gives itself (malformed HTTP, a refused WebSocket handshake), where
uvicorn would send plain text, hang, or log an ERROR for an ordinary refusal.

Why the head limit is here: httptools (llhttp) has none, and it joins the pieces of a header
value it receives across reads by concatenation, so a single huge header costs quadratic time
before any application code could see it. Bytes are therefore counted as they are fed to the
parser, and the parser is never fed more than the limit while a head is incomplete."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request, Response

from switchboard.api.affinity import Handoffs
from switchboard.api.early_refusal import EarlyRefusal
from switchboard.api.responses import headers_too_large, raw_error, raw_response
from switchboard.errors import ApiError

MAX_HEAD_BYTES = 16 * 1024  # request line and headers, in total (SPEC 6)
# After its head, a message must keep the parser making progress (body bytes, chunk
# boundaries): this many bytes fed without any is an endless trailer or chunk extension, which
# the parser would buffer by concatenation just like a header.
MAX_STALLED_BYTES = 16 * 1024

access_log = logging.getLogger("switchboard.access")

NOT_HTTP = ApiError("INVALID_ARGUMENT", "The request is not valid HTTP/1.1.")


def refusal_parts(status: int, error: ApiError) -> tuple[list[tuple[bytes, bytes]], bytes, str]:
    """Headers, body and request id of an error response that closes the connection."""
    headers, body, request_id = raw_error(error)
    if not any(name == b"connection" for name, _ in headers):
        headers.append((b"connection", b"close"))
    return headers, body, request_id


def refusal(status: int, error: ApiError) -> tuple[bytes, str]:
    """The raw bytes of an error response that closes the connection, and its request id."""
    headers, body, request_id = refusal_parts(status, error)
    return raw_response(status, headers, body), request_id


def log_refusal(method: str, path: str, status: int, request_id: str) -> None:
    """The access-log line of an answer given below the application (same shape as its own)."""
    access_log.info("%s %s %s", method, path, status, extra={"request_id": request_id})


# A scope extension of ours: {"abort": transport.abort}, so a stream can drop a connection whose
# client has stopped reading (a close would wait behind the bytes it does not read).
CONNECTION_EXTENSION = "switchboard.connection"


def with_abort(scope: Any, transport: asyncio.Transport, protocol: Any) -> None:
    """Lets a stream reach its connection: to drop it at once (`abort`), and to write frames
    straight into it (`protocol`, see live/direct.py)."""
    scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = {
        "abort": transport.abort,
        "protocol": protocol,
    }


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, counting a request's head as it is fed to the parser, and
    refusing a workspace over its request limits as soon as the head is parsed when the
    answer is certain (api/early_refusal.py)."""

    max_head_bytes = MAX_HEAD_BYTES
    max_stalled_bytes = MAX_STALLED_BYTES
    early_refusal: EarlyRefusal | None = None  # set by the server's configuration
    handoffs: Handoffs | None = None  # set under `serve --workers N` (api/affinity.py)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: Any = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # the parser is between messages or inside a head
        self._head_bytes = 0
        self._stalled_bytes = 0
        self._done = False  # refused or upgraded: this protocol reads no more
        self._lost: list[Callable[[], object]] | None = None
        self._answered_early = False  # the message being parsed was refused at its head
        # What the connection has sent, kept until its first request's head is parsed: a
        # stream another worker owns is passed to it with these bytes (api/affinity.py).
        self._first_bytes: list[bytes] | None = None
        self._passed = False  # the connection went to its stream's owner: nothing more here
        # Set on a connection another worker passed here: what that worker had read from it.
        self.adopted: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        adopted, self.adopted = self.adopted, None
        if adopted is not None:
            # Parsed as if read here, before anything read from the socket now; never passed
            # on again, even if the workers' counts disagreed for a moment.
            self.data_received(adopted)
        elif self.handoffs is not None:
            self._first_bytes = []

    def when_lost(self, callback: Callable[[], object]) -> None:
        """Runs `callback` once the connection is lost (at once if it is already): how a stream
        learns its client left without a task of its own waiting on `receive`."""
        if self.transport.is_closing() or (self.cycle is not None and self.cycle.disconnected):
            callback()
            return
        if self._lost is None:
            self._lost = []
        self._lost.append(callback)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        callbacks, self._lost = self._lost, None
        for callback in callbacks or ():
            callback()

    def hand_over(self, protocol: asyncio.Protocol) -> tuple[bool, bool]:
        """Gives the connection of a response under way to `protocol` (a live SSE stream's
        own, live/sse_connection.py) and lets the request's ASGI call return quietly: the cycle
        counts as complete (uvicorn would otherwise close the connection and log an unfinished
        response), and this protocol leaves the server's connections, since it will never see
        `connection_lost` now (the drain ends those streams itself). Returns whether the body
        is chunked and whether the client is behind (writing paused)."""
        cycle = self.cycle
        chunked, paused = bool(cycle.chunked_encoding), bool(cycle.flow.write_paused)
        cycle.response_complete = True
        cycle.keep_alive = False
        self._done = True
        self.connections.discard(self)
        self.transport.set_protocol(protocol)
        return chunked, paused

    def data_received(self, data: bytes) -> None:
        if self._first_bytes is not None:
            self._first_bytes.append(data)
        self._unset_keepalive_if_required()
        while data and not self._done:
            if self._in_head:
                room = self.max_head_bytes - self._head_bytes
                if room <= 0:
                    self._refuse(431, headers_too_large(self.max_head_bytes))
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
                self._stalled_bytes += len(piece)  # the parser's callbacks reset it
            self._feed(piece)
            if not self._in_head and self._stalled_bytes > self.max_stalled_bytes:
                self._refuse(431, headers_too_large(self.max_stalled_bytes))

    def _feed(self, piece: bytes) -> None:
        # uvicorn's own data_received, less its warning per malformed request (an anonymous
        # client could fill the log with them) and with the envelope instead of plain text.
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            if self._passed:
                return
            if self._should_upgrade():
                self.handle_websocket_upgrade()
        except httptools.HttpParserError:
            self._refuse(400, NOT_HTTP)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, NOT_HTTP)

    def _refuse(self, status: int, error: ApiError) -> None:
        self._done = True
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete
        if answering and (cycle.response_started or self._in_head):
            # A response (to this request, or to one pipelined before it) is on its way:
            # nothing can be said after it, so the connection is cut.
            self.transport.close()
            return
        raw, request_id = refusal(status, error)
        self.transport.write(raw)
        self.transport.close()
        method = self.scope.get("method", "-") if self.scope else "-"
        log_refusal(method, "-", status, request_id)

    # Parser callbacks: where a head ends and where a message makes progress.

    def on_headers_complete(self) -> None:
        if self._passed:
            return  # a request pipelined behind the one passed on: the owner parses it
        self._in_head = False
        self._stalled_bytes = 0
        if self._answer_early():
            self._first_bytes = None
            return
        if self._first_bytes is not None and self._pass_to_owner():
            return
        with_abort(self.scope, self.transport, self)
        super().on_headers_complete()
        if self.parser.should_upgrade() and not self._should_upgrade():
            # An upgrade we do not speak (h2c, say) is answered as plain HTTP/1.1, but the
            # parser stops at an upgrade, so the connection cannot carry another request.
            self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self._passed:
            return
        self._stalled_bytes = 0
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._stalled_bytes = 0

    def on_chunk_complete(self) -> None:
        self._stalled_bytes = 0

    def _answer_early(self) -> bool:
        """Writes the 429 of a request refused at its head, if it is one; then the connection
        goes on as after any response (kept alive, or closed if the client asked)."""
        refuser = self.early_refusal
        cycle = self.cycle
        if refuser is None or (cycle is not None and not cycle.response_complete):
            return False  # a response is under way: this request must wait its turn
        if self.parser.should_upgrade() or b"?" in self.url or b"%" in self.url:
            return False
        try:
            path = httptools.parse_url(self.url).path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return False
        http_version = self.parser.get_http_version()
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        raw = refuser.answer(
            self.parser.get_method().decode("ascii"),
            path,
            self.headers,
            self.server_state.default_headers,
            close=(b"connection", b"close") in self.headers,
        )
        if raw is None:
            return False
        self._answered_early = True
        self.transport.write(raw)
        if keep_alive:
            self.on_response_complete()
        else:
            self.server_state.total_requests += 1
            self._done = True  # nothing after this request is read
            self.transport.close()
        return True

    def _pass_to_owner(self) -> bool:
        """Passes the connection to the worker that owns the stream its first request opens,
        if another does and can take it now (api/affinity.py); True when it went."""
        read, self._first_bytes = self._first_bytes, None
        handoffs = self.handoffs
        if read is None or handoffs is None:
            return False
        owner = handoffs.owner(self.url)
        if owner is None:
            return False
        socket = self.transport.get_extra_info("socket")
        if socket is None or not handoffs.send(owner, socket.fileno(), b"".join(read)):
            return False
        # The owner has its own descriptor of the socket now: this one reads nothing more and
        # lets go of it quietly (closing a descriptor the owner shares sends nothing).
        self._passed = self._done = True
        self.transport.pause_reading()
        self.connections.discard(self)
        self.transport.abort()
        return True

    def on_message_complete(self) -> None:
        if self._passed:
            return
        if self._answered_early:
            self._answered_early = False  # it was answered at its head: no cycle waits on it
        else:
            super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._stalled_bytes = 0

    def handle_websocket_upgrade(self) -> None:
        # The handshake is parsed again by `websockets`, whose limits are per line and on the
        # number of headers; a head within ours but over those would make it wait forever.
        request_line = len(self.scope["method"]) + len(self.url) + len(" HTTP/1.1")
        longest = max([request_line, *(len(n) + len(v) + 2 for n, v in self.headers)])
        if longest > MAX_LINE_LENGTH - 2 or len(self.headers) > MAX_NUM_HEADERS:
            self._refuse(431, headers_too_large(self.max_head_bytes))
            return
        self._done = True
        super().handle_websocket_upgrade()


class HandedOver:
    """What a server protocol keeps as its transport once its connection was handed over:
    whatever it would still write or close goes nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, with three answers made ordinary:

    - a handshake `websockets` refuses (no Sec-WebSocket-Key, a version other than 13, a method
      other than GET) gets the error envelope instead of plain text;
    - a request `websockets` cannot even parse gets a 400 envelope instead of no answer at all;
    - an upgrade the application refuses with the denial response (401, 404) is complete:
      uvicorn counts only an accepted or closed handshake as complete, and logged each denial
      as an ERROR ("ASGI callable returned without completing handshake")."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: Any = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        accept = self.conn.accept

        def accept_or_refuse(request: Request) -> Response:
            response = accept(request)
            if response.status_code == 101:
                return response
            if response.status_code >= 500:  # websockets failed itself (and logged why)
                error = ApiError("INTERNAL", "An internal error occurred.")
                return self._envelope_response(500, error, request.method, request.path)
            reason = response.body.decode(errors="replace").strip().splitlines()[0]
            error = ApiError("INVALID_ARGUMENT", f"Not a WebSocket handshake: {reason}")
            return self._envelope_response(400, error, request.method, request.path)

        # One refusal shape for the whole server: uvicorn calls `conn.accept` itself.
        self.conn.accept = accept_or_refuse  # type: ignore[method-assign]

    def hand_over(self, protocol: asyncio.Protocol) -> bool:
        """Gives an accepted connection to `protocol` (the call WebSocket's own,
        live/ws_connection.py), if the client has sent nothing since its handshake (it may not
        before the answer; anything it did would be half-parsed here): the keep-alive stops,
        this protocol leaves the server's connections (it will never see `connection_lost`
        now), and the transport it keeps is a stub, so that the ASGI call may return without
        uvicorn closing the connection."""
        if self.conn.reader.buffer or not self.queue.empty() or not self.handshake_complete:
            return False
        self.stop_keepalive()
        self.connections.discard(self)
        transport = self.transport
        self.transport = HandedOver()  # type: ignore[assignment]
        transport.set_protocol(protocol)
        return True

    def _envelope_response(self, status: int, error: ApiError, method: str, path: str) -> Response:
        raw_headers, body, request_id = refusal_parts(status, error)
        headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers])
        log_refusal(method, path.partition("?")[0], status, request_id)
        return Response(status, HTTPStatus(status).phrase, headers, body)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # `websockets` could not parse the request (a non-ASCII path, a Transfer-Encoding):
            # it gives up silently, and uvicorn would wait for a request that never comes.
            self._refuse_unparsed()

    def handle_connect(self, event: Request) -> None:
        try:
            super().handle_connect(event)
            if hasattr(self, "scope"):  # not when the handshake was refused
                # The application task is scheduled, not started: it sees the extension.
                with_abort(self.scope, self.transport, self)
        except UnicodeError:
            # uvicorn re-encodes the path as ASCII; `websockets` let a non-ASCII one through.
            self._refuse_unparsed()

    def _refuse_unparsed(self) -> None:
        if self.transport.is_closing():
            return
        raw, request_id = refusal(400, NOT_HTTP)
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(raw)
        self.transport.close()
        log_refusal("-", "-", 400, request_id)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get(
            "more_body", False
        ):
            self.handshake_complete = True  # the denial response is a complete answer
