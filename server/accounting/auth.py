"""API keys and the admin key: generation, peppered hashing, and the per-call checks.

Keys are stored as HMAC-SHA256(pepper, key): a leaked ledger reveals no usable key, and
without the pepper (an env var or Kubernetes Secret) the hashes cannot be brute-forced
offline. The pepper must be the same on every replica sharing a ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.accounting.ledger import KeyInfo, LedgerStore, StoreUnavailable

KEY_PREFIX = "sk-sol-"


class AuthError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code            # "unauthenticated" | "permission_denied" | "unavailable"


def new_key() -> tuple[str, str, str]:
    """(key in clear, key id, display prefix)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, secrets.token_hex(8), key[:len(KEY_PREFIX) + 6]


def hash_key(pepper: str, key: str) -> str:
    return hmac.new(pepper.encode("utf-8"), key.encode("utf-8"), hashlib.sha256).hexdigest()


def _read_or_create_secret(path: Path, make: Callable[[], str], what: str) -> str:
    """A secret kept in a 0600 file under $SOL_HOME, created on first use."""
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    print(f"sol: generated {what} in {path}", file=sys.stderr)
    return value


def resolve_pepper(configured: str | None, home: Path) -> str:
    return configured or _read_or_create_secret(home / "key-pepper", lambda: secrets.token_hex(32), "a key pepper")


def resolve_admin_key(configured: str | None, key_file: Path | None, home: Path) -> str:
    """The admin key: SOL_ADMIN_KEY / --admin-key-file, else (a dev default) a generated
    one in $SOL_HOME/admin.key, which the CLI's admin commands also read."""
    if configured:
        return configured.strip()
    if key_file is not None:
        text = Path(key_file).read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"admin key file {key_file} is empty")
        return text
    return _read_or_create_secret(home / "admin.key", lambda: "sk-sol-admin-" + secrets.token_urlsafe(32),
                                  "an admin key")


def check_pepper(store: LedgerStore, pepper: str) -> None:
    """Refuse to start with a pepper other than the one the ledger's keys were hashed
    with: every key would be 'unknown', which is far harder to diagnose later."""
    mine = hash_key(pepper, "sol-pepper-fingerprint")
    try:
        stored = store.claim_fingerprint(mine)
    except StoreUnavailable:
        return      # checked by the next replica start; serving must not wait on Redis
    if stored != mine:
        raise ValueError("the key pepper differs from the one this ledger's API keys were hashed with: set "
                         "SOL_KEY_PEPPER to the same value on every replica (or remove the ledger to start over)")


def bearer(metadata: Any) -> str | None:
    for k, v in metadata or ():
        if k.lower() == "authorization":
            value = v.decode() if isinstance(v, bytes) else v
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class Authenticator:
    def __init__(self, store: LedgerStore, pepper: str, admin_key: str, run: Callable,
                 cache_s: float = 2.0) -> None:
        self.store = store
        self.pepper = pepper
        self._admin_hash = hash_key(pepper, admin_key)
        self._run = run                        # runs a blocking store call off the event loop
        self._cache: dict[str, tuple[KeyInfo | None, float]] = {}
        self.cache_s = cache_s

    def check_admin(self, metadata: Any) -> None:
        token = bearer(metadata)
        if token is None:
            raise AuthError("unauthenticated", "missing admin key: send metadata 'authorization: Bearer <admin key>' "
                                               "(sol: --admin-key or SOL_ADMIN_KEY)")
        if not hmac.compare_digest(hash_key(self.pepper, token), self._admin_hash):
            raise AuthError("permission_denied", "the Admin service needs the admin key; this key is not it "
                                                 "(sol: --admin-key or SOL_ADMIN_KEY)")

    async def authenticate(self, metadata: Any) -> KeyInfo:
        token = bearer(metadata)
        if token is None:
            raise AuthError("unauthenticated", "missing API key: send metadata 'authorization: Bearer <key>' "
                                               "(sol: --api-key or SOL_API_KEY; create one with `sol keys create`)")
        if not token:
            raise AuthError("unauthenticated", "malformed authorization metadata: use 'Bearer <key>'")
        digest = hash_key(self.pepper, token)
        if hmac.compare_digest(digest, self._admin_hash):
            # Not in the key store, so it would read as "unknown", which sends people
            # checking a key that is fine: say what it is and what inference needs.
            raise AuthError("permission_denied", "this is the admin key, which is for the Admin service only; "
                                                 "inference needs an API key: create one with `sol keys create` "
                                                 "and send it (--api-key or SOL_API_KEY)")
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or now - cached[1] > self.cache_s:
            try:
                key = await self._run(self.store.key_by_hash, digest)
                self._cache[digest] = (key, now)
                if len(self._cache) > 100_000:
                    self._cache.clear()
            except StoreUnavailable:
                # Ledger store away: keys seen recently keep working; unknown ones wait.
                if cached is None:
                    raise AuthError("unavailable", "cannot verify the API key right now (ledger store "
                                                   "unreachable); retry shortly") from None
                key = cached[0]
        else:
            key = cached[0]
        if key is None:
            raise AuthError("unauthenticated", "unknown API key: check --api-key / SOL_API_KEY, or create one "
                                               "with `sol keys create`")
        if key.revoked:
            raise AuthError("unauthenticated", f"API key {key.key_id} ({key.prefix}...) was revoked; "
                                               "use another key")
        return key

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache now (after a revocation on this replica)."""
        for digest, (key, _) in list(self._cache.items()):
            if key is not None and key.key_id == key_id:
                del self._cache[digest]


async def run_blocking(executor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
