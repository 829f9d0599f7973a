"""Turns a credential into a Principal, with a short-lived cache that revocations empty at once
on every replica (announced on the bus) and that never trusts an entry past its TTL.

Requests that miss the cache together (5,000 stream opens with one key after a restart) share
one database read per key prefix instead of one each. A read under way when a revocation is
heard is neither kept nor joined: every revocation starts a new generation of reads, and only
an answer read wholly within the current generation enters the cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from switchboard.auth import stream_tokens
from switchboard.auth.keys import display_prefix, hash_secret, hashes_match, looks_like_key
from switchboard.db import Database
from switchboard.db.database import ApiKeyCandidate
from switchboard.errors import ApiError
from switchboard.shared_lookups import SharedLookups, never_kept

MAX_CACHE_TTL = 60.0
MAX_CACHE_ENTRIES = 50_000


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: always one workspace; `key_id` names the key (for a stream token,
    the key that issued it). A stream token also scopes the principal to one call until
    `expires_at` (Unix seconds)."""

    workspace_id: str
    key_id: str
    mode: str
    call_id: str | None = None
    expires_at: float | None = None

    @property
    def is_stream_token(self) -> bool:
        return self.call_id is not None


class AuthFailure(ApiError):
    """A 401 with a reason for metrics (never the credential itself)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("UNAUTHENTICATED", message)
        self.reason = reason


INVALID_KEY_MESSAGE = "The API key is not valid: it is unknown or has been revoked."


class Authenticator:
    def __init__(
        self,
        database: Database,
        *,
        cache_ttl: float = MAX_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.cache_ttl = min(cache_ttl, MAX_CACHE_TTL)
        self.clock = clock
        self.wall_clock = wall_clock
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self._active_keys: dict[str, float] = {}  # key_id -> cache expiry, for stream tokens
        self._on_forget: list[Callable[[str], object]] = []
        # Bumped by every revocation; part of every shared read's key (see the docstring).
        self._generation = 0
        self._candidates: SharedLookups[tuple[str, int], list[ApiKeyCandidate]] = SharedLookups(
            lambda key: database.key_candidates(key[0]), never_kept, clock
        )
        self._key_activity: SharedLookups[tuple[str, str, int], bool] = SharedLookups(
            lambda key: database.key_active(key[0], key[1]), never_kept, clock
        )

    @property
    def key_reads(self) -> int:
        """Database reads made for keys (the rest were answered by the cache or a shared read)."""
        return self._candidates.reads + self._key_activity.reads

    def on_forget(self, listener: Callable[[str], object]) -> None:
        """`listener(key_id)` runs whenever a key is revoked (here or on another replica)."""
        self._on_forget.append(listener)

    async def authenticate(self, credential: str) -> Principal:
        if credential.startswith(stream_tokens.PREFIX):
            return await self._stream_token(credential)
        if not looks_like_key(credential):
            raise AuthFailure("malformed", INVALID_KEY_MESSAGE)
        secret_hash = hash_secret(credential)
        cached = self._cached(secret_hash)
        if cached is not None:
            return cached
        now = self.clock()
        generation = self._generation
        principal = None
        candidates = await self._candidates.get((display_prefix(credential), generation))
        for candidate in candidates:
            if hashes_match(candidate.secret_hash, secret_hash):
                principal = Principal(candidate.workspace_id, candidate.key_id, candidate.mode)
        if principal is None:
            self._cache.pop(secret_hash, None)
            raise AuthFailure("unknown_or_revoked", INVALID_KEY_MESSAGE)
        if generation != self._generation:
            return principal  # read before a revocation: good for this request, not for later
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()  # crude but bounded; a refill costs one indexed query per key
        self._cache[secret_hash] = (principal, now + self.cache_ttl)
        return principal

    def cached(self, credential: str) -> Principal | None:
        """The principal of a key this process has verified within the cache's lifetime and
        not seen revoked since; None for anything else (a key to look up, a stream token, a
        string that is no key)."""
        return self._cached(hash_secret(credential)) if looks_like_key(credential) else None

    def _cached(self, secret_hash: bytes) -> Principal | None:
        entry = self._cache.get(secret_hash)
        return entry[0] if entry is not None and entry[1] > self.clock() else None

    async def _stream_token(self, token: str) -> Principal:
        try:
            claims = stream_tokens.verify(
                self.database.stream_token_secret, token, self.wall_clock()
            )
        except stream_tokens.InvalidStreamToken as bad:
            raise AuthFailure("stream_token", str(bad)) from None
        now = self.clock()
        if self._active_keys.get(claims.key_id, 0.0) <= now:
            generation = self._generation
            key = (claims.workspace_id, claims.key_id, generation)
            if not await self._key_activity.get(key):
                raise AuthFailure(
                    "unknown_or_revoked", "The key that issued this token was revoked."
                )
            if generation == self._generation:
                if len(self._active_keys) >= MAX_CACHE_ENTRIES:
                    self._active_keys.clear()
                self._active_keys[claims.key_id] = now + self.cache_ttl
        return Principal(
            claims.workspace_id, claims.key_id, "stream", claims.call_id, float(claims.expires_at)
        )

    def forget_key(self, key_id: str) -> None:
        """Called for a revocation on this replica or announced by another one."""
        self._generation += 1
        for secret_hash in [h for h, (p, _) in self._cache.items() if p.key_id == key_id]:
            del self._cache[secret_hash]
        self._active_keys.pop(key_id, None)
        for listener in self._on_forget:
            listener(key_id)
