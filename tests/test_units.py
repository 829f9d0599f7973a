"""Pure cores, tested without sockets: settings, ids, keys, envelopes, log redaction."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from switchboard.auth.keys import (
    MalformedAuthorization,
    bearer_credential,
    display_prefix,
    generate_key,
    hash_secret,
    looks_like_key,
)
from switchboard.auth.policy import query_tokens
from switchboard.config import Settings, SettingsError, load_settings
from switchboard.db.database import app_role_url
from switchboard.events import EventError, check_envelope, make_envelope, subject_for
from switchboard.ids import BASE62, KEY_BODY_LENGTH, is_id, iso_ms, new_id, parse_iso, random_base62
from switchboard.logs import RedactingFilter, redact


def test_settings_from_environment_and_flags() -> None:
    settings = load_settings(
        {
            "SWITCHBOARD_HEARTBEAT_INTERVAL": "2.5",
            "SWITCHBOARD_STREAM_BUFFER": "8",
            "SWITCHBOARD_WRITE_DEADLINE": "3",
            "SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE": "true",
            "SWITCHBOARD_DATABASE_URL": "postgresql://u:p@db/x",
            "SWITCHBOARD_DATA_DIR": "/tmp/sb",
            "SWITCHBOARD_DATABASE_POOL_SIZE": "12",
        }
    )
    assert settings.database_pool_size == 12
    assert settings.heartbeat_interval == 2.5 and settings.stream_buffer == 8
    assert settings.write_deadline == 3.0 and settings.webhook_allow_private is True
    assert settings.data_dir == Path("/tmp/sb") and not settings.embedded_database
    assert settings.embedded_nats
    assert settings.with_overrides(port=0, host=None).port == 0
    defaults = load_settings({})
    assert (defaults.heartbeat_interval, defaults.stream_buffer, defaults.write_deadline) == (
        30,
        64,
        10,
    )
    for name, value in (
        ("SWITCHBOARD_STREAM_BUFFER", "lots"),
        ("SWITCHBOARD_STREAM_BUFFER", "0"),
        ("SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE", "maybe"),
        ("SWITCHBOARD_LOG_FORMAT", "xml"),
        ("SWITCHBOARD_NATS_URL", "http://x"),
        ("SWITCHBOARD_DATABASE_POOL_SIZE", "2"),
    ):
        with pytest.raises(SettingsError, match=name.removeprefix("SWITCHBOARD_")[:6]):
            load_settings({name: value})


def test_ids_and_timestamps() -> None:
    ident = new_id("call")
    assert is_id(ident, "call") and not is_id(ident, "conv") and len(ident) >= 5 + 16
    assert new_id("call") != ident
    with pytest.raises(ValueError):
        new_id("bogus")
    # Every character of the alphabet is drawn, none far more often than the others.
    drawn = Counter("".join(random_base62(40) for _ in range(2000)))
    assert set(drawn) == set(BASE62) and max(drawn.values()) < 2 * min(drawn.values())
    assert len(random_base62(KEY_BODY_LENGTH)) == KEY_BODY_LENGTH
    stamp = iso_ms(parse_iso("2026-05-15T14:32:01.123456+02:00"))
    assert stamp == "2026-05-15T12:32:01.123Z"


def test_keys_are_long_random_and_parsed_strictly() -> None:
    key = generate_key("live")
    assert looks_like_key(key.secret) and key.secret.startswith("pk_live_")
    assert len(key.secret) == len("pk_live_") + 40
    assert key.display_prefix == display_prefix(key.secret) == key.secret[:16]
    assert key.secret_hash == hash_secret(key.secret) != hash_secret(generate_key("live").secret)
    assert generate_key("test").secret.startswith("pk_test_")
    assert bearer_credential("Bearer abc") == "abc"
    for bad in ("abc", "Basic abc", "Bearer", "Bearer a b"):
        with pytest.raises(MalformedAuthorization):
            bearer_credential(bad)
    assert query_tokens(b"a=1&token=x&token=") == ["x", ""]
    assert query_tokens(b"tokens=1") == []


def test_the_app_role_url_swaps_in_the_role_and_its_escaped_password() -> None:
    owner = "postgresql://owner:secret@db:5432/one?sslmode=require"
    url = app_role_url(owner, "p@ss/word")
    assert url == "postgresql://switchboard_app:p%40ss%2Fword@db:5432/one?sslmode=require"
    assert "secret" not in url


def test_envelopes_fit_the_catalogue() -> None:
    envelope = make_envelope(
        "call.barge_in",
        workspace_id="ws_1",
        channel="voice",
        call_id="call_1",
        payload={"turn_id": "trn_1", "interrupted_text": "I was say"},
    )
    assert list(envelope) == [
        "event_id",
        "event_type",
        "channel",
        "workspace_id",
        "agent_id",
        "call_id",
        "timestamp",
        "payload",
    ]
    assert subject_for(envelope) == "vb.ws_1.call.call_1.events"
    with pytest.raises(EventError, match="not in the catalogue"):
        check_envelope({**envelope, "event_type": "call.exploded"})
    with pytest.raises(EventError, match="interrupted_text"):
        check_envelope({**envelope, "payload": {"turn_id": "trn_1"}})
    with pytest.raises(EventError, match="conversation_id"):
        check_envelope({**envelope, "event_type": "message.sent", "channel": "sms"})


def test_redaction_scrubs_keys_stream_tokens_and_token_values() -> None:
    key = generate_key("live").secret
    text = f"GET /v1/x?token={key}&a=1 Authorization: Bearer {key} st_abcdefghijkl"
    cleaned = redact(text)
    assert key not in cleaned and "st_abcdefghijkl" not in cleaned
    assert "token=[redacted]&a=1" in cleaned
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "key %s", (key,), None)
    RedactingFilter().filter(record)
    assert key not in record.getMessage()


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


async def test_client_scripts_find_their_servers_as_the_cli_does() -> None:
    from switchboard.client import SwitchboardClient, server_urls
    from switchboard.client.environment import DEFAULT_URL

    assert server_urls() == server_urls("", " ") == [DEFAULT_URL]
    assert server_urls("http://a:1, http://b:2", "http://c:3") == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]
    env = {"SWITCHBOARD_URL": "http://a:1 http://b:2/", "SWITCHBOARD_API_KEY": "pk_live_x"}
    async with SwitchboardClient.from_environment(env) as sb:
        assert sb.base_urls == ("http://a:1", "http://b:2") and sb.api_key == "pk_live_x"
    async with SwitchboardClient.from_environment({"SWITCHBOARD_API_KEY": "k"}) as sb:
        assert sb.base_urls == (DEFAULT_URL,)
