"""
Bearer-token auth for the API. The key itself is never logged: callers get a short key id
(a sha256 prefix) to use in logs and as the rate-limit bucket.
"""

import hashlib
import hmac


class AuthError(Exception):
    """A wrong key: HTTP 401; str(error) is the client-facing message."""


class MissingKey(AuthError):
    """No key at all (HTTP 401 too, but not a failed guess)."""


def key_id(key):
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def check_api_key(authorization_header, valid_keys):
    """Return the caller's key id, or raise AuthError. With no keys configured auth is off."""
    if not valid_keys:
        return "anonymous"
    if not authorization_header or not authorization_header.strip():
        raise MissingKey("Missing Authorization header")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("Invalid API key")
    # Compare against every key, no early exit, so timing does not reveal which key (or prefix) matched.
    # Compare bytes: compare_digest rejects non-ASCII str, and a client may send any header.
    presented = token.encode("utf-8", "surrogateescape")
    matched = None
    for key in valid_keys:
        if hmac.compare_digest(presented, key.encode("utf-8")) and matched is None:
            matched = key
    if matched is None:
        raise AuthError("Invalid API key")
    return key_id(matched)
