"""Signed pixel tokens: nobody can count an open for an email whose token they were not given.

A token is ``<key id>.<email id, base64url>.<HMAC-SHA256, truncated to 128 bits, base64url>``.
The key id names the secret that signed it, so the secret can rotate: tokens signed with a
previous secret keep verifying while that secret is still listed, then they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable

EMAIL_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_MAC_BYTES = 16
_MAX_TOKEN_LENGTH = 256


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(secret: str) -> str:
    return hashlib.sha256(b"opentrack-key-id:" + secret.encode()).hexdigest()[:6]


class TokenSigner:
    def __init__(self, secret: str, previous: Iterable[str] = ()) -> None:
        self._current = key_id(secret)
        self._keys = {key_id(s): self._derive(s) for s in (*previous, secret) if s}

    @staticmethod
    def _derive(secret: str) -> bytes:
        return hmac.new(secret.encode(), b"opentrack-pixel-token", hashlib.sha256).digest()

    def _mac(self, kid: str, email_id: str) -> bytes:
        msg = f"{kid}.{email_id}".encode()
        return hmac.new(self._keys[kid], msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def sign(self, email_id: str) -> str:
        if not EMAIL_ID_PATTERN.match(email_id):
            raise ValueError("email_id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -")
        kid = self._current
        return f"{kid}.{_b64(email_id.encode())}.{_b64(self._mac(kid, email_id))}"

    def verify(self, token: str) -> str | None:
        """The email id the token was signed for, or None for anything not signed by us."""
        if len(token) > _MAX_TOKEN_LENGTH or token.count(".") != 2:
            return None
        kid, encoded_id, encoded_mac = token.split(".")
        if kid not in self._keys:
            return None
        try:
            email_id = _unb64(encoded_id).decode("ascii")
            mac = _unb64(encoded_mac)
        except (binascii.Error, ValueError):
            return None
        if not EMAIL_ID_PATTERN.match(email_id):
            return None
        if not hmac.compare_digest(mac, self._mac(kid, email_id)):
            return None
        return email_id
