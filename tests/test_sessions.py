"""Console session cookies and form tokens (gateway/core/sessions.py)."""

from __future__ import annotations

from dataclasses import replace

from gateway.core.auth import key_digest
from gateway.core.sessions import (
    SESSION_S,
    csrf_token,
    key_ref,
    new_session,
    same_token,
    seal,
    signin_nonce,
    signin_token,
    unseal,
)
from tests.conftest import TEAM_KEYS

SECRET = b"s" * 32
KEY = TEAM_KEYS["design"]


def test_a_sealed_session_opens_with_its_secret_only_and_holds_no_key() -> None:
    session = new_session(SECRET, "team", key_digest(KEY), 1000.0)
    cookie = seal(SECRET, session)
    assert unseal(SECRET, cookie, 1000.0 + SESSION_S - 1) == session
    assert unseal(b"t" * 32, cookie, 1000.0) is None  # another process's secret
    assert KEY not in cookie and key_digest(KEY) not in cookie
    assert (
        session.key_ref == key_ref(SECRET, key_digest(KEY)) != key_ref(b"t" * 32, key_digest(KEY))
    )


def test_an_old_tampered_or_odd_cookie_is_no_session() -> None:
    session = new_session(SECRET, "admin", key_digest(KEY), 1000.0)
    cookie = seal(SECRET, session)
    assert unseal(SECRET, cookie, 1000.0 + SESSION_S) is None  # 8 hours, not a second more
    assert unseal(SECRET, cookie, 999.0) is None  # from the future
    payload, _, mac = cookie.partition(".")
    promoted = seal(b"other", replace(session, role="admin"))
    for bad in (f"{payload}x.{mac}", f"{payload}.", payload, "", ".", promoted, "a.b.c"):
        assert unseal(SECRET, bad, 1000.0) is None, bad
    assert unseal(SECRET, seal(SECRET, replace(session, role="root")), 1000.0) is None  # type: ignore[arg-type]


def test_form_tokens_belong_to_their_session_or_sign_in_cookie() -> None:
    one = new_session(SECRET, "team", key_digest(KEY), 0.0)
    two = new_session(SECRET, "team", key_digest(KEY), 0.0)
    assert csrf_token(SECRET, one.sid) != csrf_token(SECRET, two.sid)
    cookie, token = signin_nonce(SECRET)
    assert signin_token(SECRET, cookie) == token
    assert signin_token(SECRET, cookie + "x") is None
    assert signin_token(b"t" * 32, cookie) is None
    assert same_token(token, token) and not same_token(token, None) and not same_token(None, None)
    assert not same_token(token, token + "\u00e9")
