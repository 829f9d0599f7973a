"""The WebSocket wire (RFC 6455) as the call stream's own connection reads and writes it, once it
has taken the socket over from the server (live/ws_connection.py): pure, no I/O.

What a client sends is read as the server read it before: masked frames only, no extensions
(none is negotiated), messages of at most `max_size` bytes assembled from their fragments,
text that must be UTF-8, control frames answered in the close codes the RFC names."""

from __future__ import annotations

from dataclasses import dataclass

try:
    from websockets.speedups import apply_mask  # the same C routine the server used
except ImportError:  # pragma: no cover - the pure-Python build of websockets
    from websockets.utils import apply_mask

TEXT, BINARY, CONTINUATION = 0x1, 0x2, 0x0
CLOSE, PING, PONG = 0x8, 0x9, 0xA


class WireFault(Exception):
    """The client broke the protocol: the connection is closed with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message: `text` for a text message, None for binary data."""

    text: str | None


@dataclass(frozen=True, slots=True)
class Control:
    opcode: int  # CLOSE, PING or PONG
    payload: bytes


def frame(opcode: int, payload: bytes) -> bytes:
    """A server-to-client frame (FIN, the opcode, no mask)."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        head = bytes((first, size))
    elif size < 1 << 16:
        head = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + size.to_bytes(8, "big")
    return head + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; None: without a status (the answer to a close that had none)."""
    if code is None:
        return frame(CLOSE, b"")
    return frame(CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])


def close_code(payload: bytes) -> int | None:
    """The status of a client's close frame, None if it had none. Raises WireFault for a status
    a peer may not send, or a one-byte payload."""
    if not payload:
        return None
    if len(payload) == 1:
        raise WireFault(1002, "a close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise WireFault(1002, f"close code {code} may not be sent")
    return code


class FrameReader:
    """Buffers what the client sends and returns its messages and control frames one by one."""

    __slots__ = ("_opcode", "_parts", "_size", "buffer", "max_size")

    def __init__(self, max_size: int) -> None:
        self.buffer = bytearray()
        self.max_size = max_size
        self._opcode: int | None = None  # of the message being assembled from fragments
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> Message | Control | None:
        """The next complete message or control frame, None until more bytes arrive."""
        while True:
            buf = self.buffer
            if len(buf) < 2:
                return None
            first, second = buf[0], buf[1]
            fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
            if first & 0x70:
                raise WireFault(1002, "reserved bits set")
            if not second & 0x80:
                raise WireFault(1002, "a client frame must be masked")
            at = 2
            if length == 126:
                if len(buf) < 4:
                    return None
                length, at = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return None
                length, at = int.from_bytes(buf[2:10], "big"), 10
            if opcode >= CLOSE:
                if opcode not in (CLOSE, PING, PONG):
                    raise WireFault(1002, f"unknown opcode {opcode}")
                if not fin or length > 125:
                    raise WireFault(1002, "a control frame must be whole and short")
            elif opcode not in (TEXT, BINARY, CONTINUATION):
                raise WireFault(1002, f"unknown opcode {opcode}")
            elif self._size + length > self.max_size:
                raise WireFault(1009, f"a message over {self.max_size} bytes")
            end = at + 4 + length
            if len(buf) < end:
                return None
            payload = apply_mask(bytes(buf[at + 4 : end]), bytes(buf[at : at + 4]))
            del buf[:end]
            if opcode >= CLOSE:
                return Control(opcode, payload)
            if opcode == CONTINUATION:
                if self._opcode is None:
                    raise WireFault(1002, "a continuation with no message to continue")
            elif self._opcode is not None:
                raise WireFault(1002, "a new message before the last one ended")
            else:
                self._opcode = opcode
            self._parts.append(payload)
            self._size += length
            if fin:
                return self._whole()

    def _whole(self) -> Message:
        data = b"".join(self._parts)
        opcode = self._opcode
        self._opcode, self._parts, self._size = None, [], 0
        if opcode == BINARY:
            return Message(None)
        try:
            return Message(data.decode())
        except UnicodeDecodeError:
            raise WireFault(1007, "text that is not UTF-8") from None
