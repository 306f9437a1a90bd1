"""Bearer-token check (``--token-file``): constant-time comparison, the token never logged."""
from __future__ import annotations

import hmac
from pathlib import Path

from ..errors import ConfigError


def read_token(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); one line of error otherwise."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"--token-file {path}: the file must hold one token (no spaces), got {'nothing' if not token else 'several words'}")
    return token


class BearerAuth:
    """``ok(authorization_header)``: True when it is ``Bearer <token>`` with the expected token."""

    def __init__(self, token: str):
        self._expected = token.encode()

    def ok(self, header: bytes | None) -> bool:
        if not header:
            return False
        scheme, _, credential = header.strip().partition(b" ")
        # compare_digest: the time taken does not depend on how many leading bytes match
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._expected)
