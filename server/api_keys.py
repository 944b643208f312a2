"""API keys: creation, hashing at rest, and turning a presented key into an owner.

A key looks like `tml-{key_id}-{secret}` (the SDK insists on the `tml-` prefix). Only
`sha256(salt + secret)` and the salt are stored, so a leaked database does not leak keys.

Owners: a registered key's owner is its `key_id`. In open mode (no keys registered, or
`--auth open`) any `tml-` key is accepted and its owner is `anon-` + a hash of the key, so
different keys are still different tenants; a key without the prefix is refused in every mode,
as the SDK would refuse it. Modes:

- `auto` (default): any `tml-` key until at least one active key exists, then registered ones;
- `required`: only registered keys are accepted (none registered: every request is refused);
- `open`: any `tml-` key is accepted; registered keys still map to their own owner.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from server.store import ApiKeyRecord, Store

AuthMode = Literal["auto", "required", "open"]
AUTH_MODES: tuple[AuthMode, ...] = ("auto", "required", "open")

KEY_PREFIX = "tml-"
_KEY = re.compile(r"tml-([0-9a-f]{12})-([0-9a-f]{64})")
_MAX_NAME = 200
ANONYMOUS_PREFIX = "anon-"


def _hash(salt_hex: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode()).hexdigest()


def anonymous_owner(key: str) -> str:
    """The owner of an unregistered key in open mode: stable per key, reveals nothing of it."""
    return ANONYMOUS_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16]


def create_api_key(store: Store, name: str, *, now: datetime | None = None) -> tuple[str, ApiKeyRecord]:
    """Register a new key named `name`; returns (the key, shown once; its record)."""
    name = name.strip()
    if not name or len(name) > _MAX_NAME:
        raise ValueError(f"an API key needs a name of 1 to {_MAX_NAME} characters")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_hex(32), secrets.token_hex(16)
    record = ApiKeyRecord(
        key_id=key_id,
        name=name,
        salt=salt,
        secret_hash=_hash(salt, secret),
        created_at=now or datetime.now(UTC),
    )
    store.add_api_key(record)
    return f"{KEY_PREFIX}{key_id}-{secret}", record


def verify_api_key(store: Store, key: str) -> ApiKeyRecord | None:
    """The active record of a registered key, or None."""
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    key_id, secret = match.groups()
    record = store.get_api_key(key_id)
    if record is None or record.revoked_at is not None:
        return None
    if not hmac.compare_digest(record.secret_hash, _hash(record.salt, secret)):
        return None
    return record


class ApiKeyAuth:
    """Resolves presented keys to owners under a mode; results are cached for `cache_s`
    seconds, so a revocation or the first created key takes effect within that time."""

    def __init__(
        self,
        store: Store,
        mode: AuthMode = "auto",
        *,
        cache_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"unknown auth mode {mode!r}; expected one of {', '.join(AUTH_MODES)}")
        self.store = store
        self.mode = mode
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._owners: dict[str, tuple[str | None, float]] = {}
        self._enforced: tuple[bool, float] | None = None

    def enforced(self) -> bool:
        """Whether unregistered keys are refused right now."""
        if self.mode != "auto":
            return self.mode == "required"
        now = self._clock()
        with self._lock:
            if self._enforced is not None and self._enforced[1] > now:
                return self._enforced[0]
        value = self.store.has_active_api_keys()
        with self._lock:
            self._enforced = (value, now + self._cache_s)
        return value

    def owner(self, key: str) -> str | None:
        """The owner `key` acts for, or None if it must be refused (401)."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            cached = self._owners.get(digest)
        if cached is not None and cached[1] > now:
            registered = cached[0]
        else:
            record = verify_api_key(self.store, key)
            registered = None if record is None else record.key_id
            with self._lock:
                if len(self._owners) > 10_000:
                    self._owners.clear()
                self._owners[digest] = (registered, now + self._cache_s)
        if registered is not None:
            return registered
        if not key.startswith(KEY_PREFIX) or self.enforced():
            return None
        return anonymous_owner(key)
