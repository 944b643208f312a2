"""HMAC-signed URLs: downloads that work without an API key until they expire.

Some downloads are fetched by a plain HTTP client with no key: an external_weights
checkpoint's files (`tinker checkpoint download`), a checkpoint archive (SDKs <= 0.25) and a
session trace (`tinker session export-trace`). The route that hands out a URL signs it
(`Service.signed_url`) for a caller who may read the resource, the route that serves it
accepts the signature instead of a key, and server.auth lets exactly the paths in
`SIGNED_PATHS` through without one when they carry a `sig` parameter.

A signature covers a path and its expiry time (Unix seconds), under a secret the server
generates on first start and keeps next to the checkpoints, so URLs handed out stay valid
across a restart. A dot-name keeps the file out of checkpoint recovery.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_FILE = ".url-signing-key"
_SECRET_BYTES = 32
SIGNED_PATHS = (
    re.compile(r"/api/v1/training_runs/[^/]+/checkpoints/[^/]+/[^/]+/archive"),
    re.compile(r"/api/v1/training_runs/[^/]+/checkpoints/external_weights/[^/]+/files/[^/]+"),
    re.compile(r"/api/v1/sessions/[^/]+/trace"),
)
"""GET paths a signed URL may name (matched whole); every other path needs an API key."""


@dataclass(frozen=True)
class UrlSigner:
    secret: bytes

    @classmethod
    def load_or_create(cls, directory: Path) -> UrlSigner:
        """The secret in `directory/SECRET_FILE`, created (owner-readable only) if missing or
        unreadable as one; concurrent first starts agree on one secret."""
        path = directory / SECRET_FILE
        try:
            secret = bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            secret = b""
        except ValueError:
            secret = b""
            logger.warning("%s is not a signing key; replacing it (outstanding download links stop working)", path)
        if len(secret) == _SECRET_BYTES:
            return cls(secret)
        directory.mkdir(parents=True, exist_ok=True)
        pending = directory / f"{SECRET_FILE}.{uuid.uuid4().hex}"
        descriptor = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_hex(_SECRET_BYTES))
        try:
            if path.exists():
                os.replace(pending, path)  # a damaged key: ours wins
            else:
                os.link(pending, path)  # fails if another process got there first
        except FileExistsError:
            pass
        finally:
            pending.unlink(missing_ok=True)
        return cls(bytes.fromhex(path.read_text().strip()))

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, path: str, expires: int) -> str:
        """The query string that authorizes GETs of `path` until `expires`."""
        return f"expires={expires}&sig={self.signature(path, expires)}"

    def is_valid(self, path: str, query: Mapping[str, str]) -> bool:
        """Whether `query` carries an unexpired signature for `path`."""
        try:
            expires = int(query.get("expires", ""))
        except ValueError:
            return False
        signature = query.get("sig", "").encode()
        expected = self.signature(path, expires).encode()
        return hmac.compare_digest(signature, expected) and expires >= time.time()
