"""API keys: how they are made, stored and checked.

A key looks like ``tk_<key id>_<secret>``. The key id (12 hex digits) is a lookup handle
and is stored in clear; the whole key is stored only as its SHA-256 (enough for a random
256-bit secret, where a slow password hash buys nothing) and compared in constant time.
The key is shown once, when the user is created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from twinkle.errors import AuthenticationError, InvalidArgumentError

from .store import Store, User

KEY_PREFIX = "tk"
_KEY = re.compile(r"tk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})")
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key id, key)``."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def check_user_name(name: str) -> str:
    if not _USER_NAME.fullmatch(name or ""):
        raise InvalidArgumentError(
            f"user name must be 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit; "
            f"got {name!r}"
        )
    return name


def create_user(store: Store, name: str) -> tuple[User, str]:
    """Add a user; returns it and its key (the only time the key exists in clear)."""
    check_user_name(name)
    key_id, key = new_key()
    return store.add_user(name, key_id, hash_key(key)), key


def authenticate(store: Store, authorization: str | None) -> User:
    """The user an ``Authorization: Bearer <key>`` header belongs to, or ``AuthenticationError``."""
    if not authorization:
        raise AuthenticationError("missing API key")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError("missing API key")
    match = _KEY.fullmatch(key)
    record = store.key_record(match.group(1)) if match else None
    # Hash and compare even when the key id is unknown, so timing does not tell which ids exist.
    expected = record[1] if record else hash_key("")
    valid = hmac.compare_digest(hash_key(key), expected)
    if not valid or record is None or not record[0].active:
        raise AuthenticationError("invalid API key")
    return record[0]
