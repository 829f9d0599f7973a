"""One typed settings object, read from `SWITCHBOARD_*` environment variables and CLI flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LOG_FORMATS = ("console", "json")
MIN_POOL_SIZE = 3


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".switchboard")
    database_url: str | None = None
    nats_url: str | None = None
    heartbeat_interval: float = 30.0
    stream_buffer: int = 64
    write_deadline: float = 10.0
    webhook_allow_private: bool = False
    log_format: str = "console"
    log_level: str = "info"
    # Upper bound on how long any replica may trust a cached key lookup, even if it missed a
    # revocation announcement on the bus (issue 2: "any cache lives at most 60 s").
    key_cache_ttl: float = 60.0
    # Seconds that shutdown waits for open requests before it cuts them.
    shutdown_grace: float = 5.0
    # Seconds over which a shutdown ends the open streams, in batches, so that their clients
    # do not all reconnect elsewhere in the same instant (SPEC 5.4, 6).
    drain_seconds: float = 5.0
    # Largest request body; a bigger one is refused with 413 before it is buffered (SPEC 6).
    max_body_bytes: int = 1048576
    # Largest request line and headers together; more is refused with 431 before it is parsed.
    max_header_bytes: int = 16384
    # How long durable frames stay resumable (SPEC 5.4): older cursors get `reset`; transcript
    # turns are kept this long.
    history_hours: float = 24.0
    # How many NATS servers keep each JetStream stream (1 for one server; 3 on a cluster, so a
    # lost node loses nothing and the streams stay writable).
    stream_replicas: int = 1
    # Per-workspace quotas across every replica and worker (SPEC 6, "Limits"): open streams,
    # and requests in each wall-clock minute; over either, 429 RATE_LIMITED.
    workspace_max_streams: int = 1000
    workspace_rate_per_minute: int = 20000
    # How much of the minute's quota a workspace may send at once, in seconds of its average
    # rate (a token bucket shared the same way); the rest comes at that rate, so one workspace
    # cannot spend its minute in seconds and crowd out the others (docs/decisions.md).
    workspace_burst_seconds: float = 2.0
    # Connections each process keeps to Postgres at most. Streams need the database only at
    # their open, and a request holds a connection for one short transaction; past a few per
    # core, more connections only queue inside Postgres, and each costs a backend process
    # (about 1.4 MiB) that an open storm would otherwise leave behind (docs/decisions.md).
    database_pool_size: int = 8
    # Under `serve --workers N`, a call's or conversation's streams are all served by one
    # worker, which the others pass their connections to (api/affinity.py); false serves each
    # stream where the kernel placed it.
    stream_affinity: bool = True
    # The application role's password; unset, a random one kept in the database is used.
    app_role_password: str | None = field(default=None, repr=False)

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_nats(self) -> bool:
        return self.nats_url is None

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the non-None overrides applied (CLI flags beat the environment)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


ENV_PREFIX = "SWITCHBOARD_"


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def _parse_positive(name: str, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be greater than zero, not {raw!r}")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; an invalid value raises SettingsError naming it."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for spec in fields(Settings):
        name = ENV_PREFIX + spec.name.upper()
        raw = source.get(name)
        if raw is None or raw == "":
            continue
        if spec.type in ("int",):
            values[spec.name] = _parse_positive(name, raw, int)
        elif spec.type in ("float",):
            values[spec.name] = _parse_positive(name, raw, float)
        elif spec.type == "bool":
            values[spec.name] = _parse_bool(name, raw)
        elif spec.type == "Path":
            values[spec.name] = Path(raw)
        else:
            values[spec.name] = raw
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if settings.log_format not in LOG_FORMATS:
        raise SettingsError(f"SWITCHBOARD_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    if not 0 <= settings.port <= 65535:
        raise SettingsError("port must be between 0 and 65535")
    nats_urls = settings.nats_url.split(",") if settings.nats_url is not None else []
    for name, url, schemes in (
        ("SWITCHBOARD_DATABASE_URL", settings.database_url, ("postgres://", "postgresql://")),
        # A cluster is several URLs, comma-separated; the client fails over between them.
        *(
            ("SWITCHBOARD_NATS_URL", u.strip(), ("nats://", "tls://", "ws://", "wss://"))
            for u in nats_urls
        ),
    ):
        if url is not None and not url.startswith(schemes):
            raise SettingsError(f"{name} must start with one of {', '.join(schemes)}")
    if settings.database_pool_size < MIN_POOL_SIZE:
        # One connection may be held for good (the outbox relay's lock), and the durable
        # consumers and requests need theirs beside it.
        raise SettingsError(f"SWITCHBOARD_DATABASE_POOL_SIZE must be at least {MIN_POOL_SIZE}")
    if settings.stream_replicas not in (1, 3, 5):
        raise SettingsError("SWITCHBOARD_STREAM_REPLICAS must be 1, 3 or 5")
