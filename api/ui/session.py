"""The dashboard's login: a signed, HttpOnly, SameSite=Lax cookie holding the user id.

The cookie is `base64(json).base64(hmac-sha256)`, signed with MCAAS_SESSION_SECRET (a fixed
key only in dev mode). It holds the user id the API key resolved to at login, an expiry and
a random token that forms echo back (CSRF: a cross-site page can neither read the cookie nor,
with SameSite=Lax, send it with a POST). The key itself is never stored in the cookie, so a
revoked key's session lasts until it expires (SESSION_MAX_AGE_S) or the user logs out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request, Response

from modules.storage.keys import validate_user_id

COOKIE_NAME = "mcaas_session"
SESSION_MAX_AGE_S = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A logged-in browser."""

    user_id: str
    csrf: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest())


def encode_session(session: Session, *, secret: bytes) -> str:
    """The cookie value for a session."""
    body = {"u": session.user_id, "c": session.csrf, "e": session.expires}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode("utf-8"))
    return f"{payload}.{_sign(secret, payload)}"


def decode_session(value: str, *, secret: bytes, now: float | None = None) -> Session | None:
    """The session in a cookie value, or None when it is forged, malformed or expired."""
    payload, sep, signature = value.partition(".")
    if not sep or not hmac.compare_digest(_sign(secret, payload), signature):
        return None
    try:
        body = json.loads(_unb64(payload))
        session = Session(
            user_id=validate_user_id(str(body["u"])), csrf=str(body["c"]), expires=int(body["e"])
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if session.expires < (time.time() if now is None else now):
        return None
    return session


def new_session(user_id: str) -> Session:
    """A fresh session for a user who just logged in."""
    return Session(
        user_id=user_id,
        csrf=secrets.token_urlsafe(24),
        expires=int(time.time()) + SESSION_MAX_AGE_S,
    )


def session_secret(request: Request) -> bytes | None:
    """The signing key, or None when the dashboard is off (no MCAAS_SESSION_SECRET)."""
    settings = getattr(request.app.state, "settings", None)
    return None if settings is None else settings.ui_session_secret


def read_session(request: Request) -> Session | None:
    """The request's valid session, if any."""
    secret = session_secret(request)
    value = request.cookies.get(COOKIE_NAME)
    if secret is None or not value:
        return None
    return decode_session(value, secret=secret)


def set_session_cookie(
    response: Response, session: Session, *, secret: bytes, secure: bool
) -> None:
    """Attach the signed session cookie (HttpOnly, SameSite=Lax; Secure over HTTPS)."""
    response.set_cookie(
        COOKIE_NAME,
        encode_session(session, secret=secret),
        max_age=SESSION_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="lax",
        secure=secure,
    )


def clear_session_cookie(response: Response) -> None:
    """Log out: expire the cookie."""
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="lax")


def csrf_ok(session: Session, token: str | None) -> bool:
    """Whether a form's token is this session's."""
    return bool(token) and hmac.compare_digest(session.csrf, str(token))
