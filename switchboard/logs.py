"""Structured logging: JSON lines in production, readable lines in a terminal, and a redaction
filter that scrubs anything shaped like a credential before a record is written anywhere."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import orjson

from switchboard.auth.policy import fully_decoded, is_credential_name

# API key secrets, stream tokens, and any `token=` query value.
_SECRET_PATTERNS = (
    re.compile(r"pk_(?:live|test)_[0-9A-Za-z]{8,}"),
    re.compile(r"\bst_[0-9A-Za-z_.\-]{8,}"),
    re.compile(r"(token=)[^&\s\"']*", re.IGNORECASE),
)
# A `name=value` pair as it appears in a URL; the name is judged after percent-decoding, so
# `tok%65n=` and `%74oken=` are the `token=` they decode to (and `API_KEY=` an api_key).
_QUERY_PAIR = re.compile(r"([^\s&?;=\"'/]+)=([^&\s\"']*)")
# A run of URL characters holding a percent escape: a key may hide in it (`pk%5Flive%5F...`).
_ENCODED_RUN = re.compile(r"[0-9A-Za-z_.~+\-]*%[0-9A-Za-z_.~+%\-]+")


def _redact_pair(match: re.Match[str]) -> str:
    if is_credential_name(match.group(1)):
        return f"{match.group(1)}=[redacted]"
    return match.group(0)


def _redact_encoded(match: re.Match[str]) -> str:
    decoded = fully_decoded(match.group(0))
    return "[redacted]" if _redact_plain(decoded) != decoded else match.group(0)


def _redact_plain(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(r"\1[redacted]", text)
        else:
            text = pattern.sub("[redacted]", text)
    return text


def redact(text: str) -> str:
    """`text` without anything shaped like a credential: a key or stream token, plain or
    percent-encoded, and the value of any credential-named query parameter, in any case and
    encoding of its name."""
    if "=" in text:
        text = _QUERY_PAIR.sub(_redact_pair, text)
    if "%" in text:
        text = _ENCODED_RUN.sub(_redact_encoded, text)
    return _redact_plain(text)


# Control characters (C0, DEL, C1) and the Unicode line separators: written raw, a request path
# holding them could forge a log line or send escape codes to an operator's terminal.
_CONTROL = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
}
_CONTROL_BUT_NEWLINE = {code: text for code, text in _CONTROL.items() if code != 0x0A}


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with its control characters written as escapes (`\\x1b`, `\\x0a`)."""
    return text.translate(_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


# Record attributes that are not extras; uvicorn's color_message duplicates msg with ANSI codes.
_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_text or record.exc_info:
            line["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(line, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        text = printable(f"{base}  {tail}" if tail else base)
        if record.exc_text:
            text += "\n" + printable(record.exc_text, keep_newlines=True)
        elif record.exc_info:
            text += "\n" + printable(
                redact(self.formatException(record.exc_info)), keep_newlines=True
            )
        return text


class UvicornHandshakeLines(logging.Filter):
    """Drops uvicorn's own lines for WebSocket handshakes (`"WebSocket /path?query" 401`,
    `[accepted]`): they are access-log lines that print the query string, where a token may
    be, and ours (switchboard.access) already has one per upgrade without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith('%s - "WebSocket %s"'))


# Methods that only read: a console's page, its assets and its reads of the API.
_READS = ("GET", "HEAD", "WS")


def access_level(method: str, path: str, status: int, fetch_site: str | None) -> int:
    """The level of a request's access-log line. The console in a browser asks for its page,
    its assets and the favicon, and keeps streams and lists open, on every view; a probe or a
    scraper polls `/healthz` and `/metrics`. Those reads log at DEBUG when they succeed, so that
    at INFO the terminal shows the API's own traffic. What stays at INFO: every `/v1` request
    from an API client, every write (a person's action in the console too), and every request
    that failed. The console's `/v1` reads are known by `Sec-Fetch-Site: same-origin`, which
    browsers set on requests a page makes to its own origin and API clients never send (it only
    picks a log level, so a client that forges it hides nothing but its own lines at INFO)."""
    if not 100 <= status < 400 or method not in _READS:
        return logging.INFO
    if path != "/v1" and not path.startswith("/v1/"):
        return logging.DEBUG
    return logging.DEBUG if fetch_site == "same-origin" else logging.INFO


def configure_logging(
    log_format: str = "console", level: str = "info", stream: TextIO | None = None
) -> None:
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log prints the query string, tokens included: ours replaces it.
    logging.getLogger("uvicorn.access").disabled = True
    # asyncpg's pool warns with a full traceback each time it cannot refill during a Postgres
    # outage; our components log the outage once (switchboard.outage) instead.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, UvicornHandshakeLines) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(UvicornHandshakeLines())
