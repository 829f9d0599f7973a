"""A 429 written by the HTTP protocol itself (issue 13, tenants): a workspace sending past its
request limits is refused as soon as its request's head is parsed, before the server makes a
request cycle, a task and the middleware's calls for it.

A refusal through the whole stack cost about 0.2 ms of CPU; at the 1,750 refusals a second of
`bench/tenants.py`'s fixed-pace flood that was a third of a core, taken from every other
workspace on the machine. The answer here is the one the stack would give, byte for byte but
for the request id and the date: the error envelope and headers of `api/limits.py`'s refusal,
`X-Request-Id`, the server's default headers, the same access-log line and the same count in
`switchboard_rate_limited_total` (and in `switchboard_rate_limited_early_total`, which says
how many took this path). It is given only where that answer is certain: an authenticated
`/v1` request whose key is already cached, with no query string (where credential rules
apply), no body (which would have to be read past) and not a HEAD, while no response is
under way on the connection. Anything else takes the normal path, which decides as before."""

from __future__ import annotations

import time
from collections.abc import Sequence

from switchboard.api.limits import WorkspaceLimits
from switchboard.api.middleware import is_v1, log_access
from switchboard.api.responses import Header, raw_error, raw_response
from switchboard.auth.authenticator import Authenticator
from switchboard.auth.keys import MalformedAuthorization, bearer_credential
from switchboard.live.metrics import Metrics

EARLY_METRIC = "switchboard_rate_limited_early_total"


class EarlyRefusal:
    def __init__(
        self,
        authenticator: Authenticator,
        limiter: WorkspaceLimits,
        metrics: Metrics,
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.early = metrics.counter(
            EARLY_METRIC,
            "429s written by the HTTP protocol as soon as a request's head was parsed (also "
            "counted in switchboard_rate_limited_total), by the limit.",
            "limit",
        )

    def answer(
        self,
        method: str,
        path: str,
        headers: Sequence[Header],
        default_headers: Sequence[Header],
        *,
        close: bool,
    ) -> bytes | None:
        """The whole response (status line, head, body) refusing this request, or None when
        the normal path must decide. `path` is the request's path, undecoded and without a
        query; `close` adds `Connection: close` (the request asked for it)."""
        started = time.perf_counter()
        if method == "HEAD" or not is_v1(path):
            return None  # a HEAD's answer has no body: the server writes that one
        authorization = fetch_site = None
        for name, value in headers:
            if name in (b"content-length", b"transfer-encoding") and value != b"0":
                return None  # a body: it would have to be read past
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"sec-fetch-site" and fetch_site is None:
                fetch_site = value.decode("latin-1")
        if authorization is None:
            return None
        try:
            credential = bearer_credential(authorization.decode("latin-1"))
        except MalformedAuthorization:
            return None
        principal = self.authenticator.cached(credential)
        if principal is None or principal.is_stream_token:
            return None
        verdict = self.limiter.limits.request_verdict(principal.workspace_id)
        if verdict.allowed:
            return None
        head, body, request_id = raw_error(self.limiter.refuse(verdict))
        if close:
            head.append((b"connection", b"close"))
        self.early[verdict.kind] += 1
        log_access(method, path, 429, fetch_site, request_id, started)
        return raw_response(429, [*default_headers, *head], body)
