"""The error envelope of SPEC section 3: one exception type that every layer raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

DOCS_BASE: Final = "https://docs.voicebip.com/errors#"

STATUS_BY_CODE: Final[dict[str, int]] = {
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 400,
    "ALREADY_EXISTS": 409,
    "RATE_LIMITED": 429,
    "DEADLINE_EXCEEDED": 504,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}


@dataclass
class ApiError(Exception):
    """An error a client should see; `message` must be safe to show (no secrets, no tokens)."""

    error_code: str
    message: str
    retry_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error_code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {self.error_code!r}")
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.error_code]

    def body(self, request_id: str) -> dict[str, str]:
        return error_body(self.error_code, self.message, request_id)


def error_body(error_code: str, message: str, request_id: str) -> dict[str, str]:
    return {
        "error_code": error_code,
        "message": message,
        "request_id": request_id,
        "documentation_url": DOCS_BASE + error_code.lower(),
    }


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError("NOT_FOUND", f"No {kind} {ident} exists in this workspace.")


def invalid(field_name: str, problem: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", f"{field_name}: {problem}")
