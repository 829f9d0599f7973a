"""The WebSocket wire as the call stream's own connection reads it (live/ws_wire.py): pure."""

from __future__ import annotations

import os

import pytest

from switchboard.live.ws_wire import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    Control,
    FrameReader,
    Message,
    WireFault,
    close_code,
    close_frame,
    frame,
)


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """A frame as a client sends it: masked with a random key."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        head = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_all(reader: FrameReader) -> list[Message | Control]:
    events: list[Message | Control] = []
    while (event := reader.next()) is not None:
        events.append(event)
    return events


def test_messages_and_control_frames_are_read_across_any_split() -> None:
    wire = (
        client_frame(TEXT, b'{"type":"send_dtmf"}')
        + client_frame(PING, b"hi")
        + client_frame(TEXT, "é".encode() * 100)
        + client_frame(BINARY, b"\x00\x01")
    )
    for step in (1, 3, 7, len(wire)):
        reader = FrameReader(16 * 1024)
        events: list[Message | Control] = []
        for at in range(0, len(wire), step):
            reader.feed(wire[at : at + step])
            events.extend(read_all(reader))
        assert events == [
            Message('{"type":"send_dtmf"}'),
            Control(PING, b"hi"),
            Message("é" * 100),
            Message(None),
        ]
        assert not reader.buffer


def test_a_fragmented_message_is_assembled_with_control_frames_between() -> None:
    reader = FrameReader(16 * 1024)
    reader.feed(
        client_frame(TEXT, b"hel", fin=False)
        + client_frame(PING, b"")
        + client_frame(CONTINUATION, b"lo")
    )
    assert read_all(reader) == [Control(PING, b""), Message("hello")]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (client_frame(TEXT, b"x", masked=False), 1002),
        (bytes((0x80 | 0x40 | TEXT, 0x80)) + b"\x00" * 4, 1002),  # a reserved bit
        (client_frame(0x3, b""), 1002),  # an unknown data opcode
        (client_frame(0xB, b""), 1002),  # an unknown control opcode
        (client_frame(PING, b"x" * 126), 1002),  # a control frame too long
        (client_frame(PING, b"", fin=False), 1002),  # a fragmented control frame
        (client_frame(CONTINUATION, b"x"), 1002),  # nothing to continue
        (client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"), 1002),
        (client_frame(TEXT, b"\xff\xfe"), 1007),
        (client_frame(TEXT, b"x" * 20_000), 1009),
        (
            client_frame(TEXT, b"x" * 10_000, fin=False) + client_frame(CONTINUATION, b"x" * 7_000),
            1009,
        ),
    ],
)
def test_what_breaks_the_protocol_is_a_fault_with_its_close_code(wire: bytes, code: int) -> None:
    reader = FrameReader(16 * 1024)
    reader.feed(wire)
    with pytest.raises(WireFault) as fault:
        read_all(reader)
    assert fault.value.code == code


def test_an_oversized_message_is_refused_from_its_header_before_its_body_arrives() -> None:
    reader = FrameReader(16 * 1024)
    reader.feed(client_frame(TEXT, b"x" * 20_000)[:20])
    with pytest.raises(WireFault) as fault:
        reader.next()
    assert fault.value.code == 1009


def test_close_codes_a_client_may_and_may_not_send() -> None:
    assert close_code(b"") is None
    assert close_code((1000).to_bytes(2, "big") + b"bye") == 1000
    assert close_code((4000).to_bytes(2, "big")) == 4000
    for bad in (b"\x03", (1005).to_bytes(2, "big"), (999).to_bytes(2, "big")):
        with pytest.raises(WireFault):
            close_code(bad)


def test_server_frames_are_unmasked_with_the_length_encoding_their_size_needs() -> None:
    assert frame(TEXT, b"hi") == b"\x81\x02hi"
    assert frame(TEXT, b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert frame(BINARY, b"x" * 70_000)[:2] == b"\x82\x7f"
    assert close_frame(1008, "key revoked") == b"\x88\x0d\x03\xf0key revoked"
    assert close_frame(None) == bytes((0x80 | CLOSE, 0))
