"""URLs as klein-batch writes them down: never with the credentials they may carry.

An ``--api-url`` may carry ``user:password@`` (a proxy in front of the API), and so may a
reference URL or an answer of the API. The URL is used as given, but every copy that is
stored (the journal's poll URLs, run records, row reasons in the output manifest, run.json
and report.html) or printed goes through ``without_credentials`` or ``redact_credentials``.
A poll URL read back from the journal gets its credentials again from the API URL of the
run (``with_credentials_of``), never from disk.
"""

from __future__ import annotations

import re

from yarl import URL

#: ``scheme://user:password@`` or ``scheme://token@`` in free text.
_USERINFO = re.compile(r"(?<=://)[^/@\s'\"<>]+@")


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` removed (unparseable: a placeholder)."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return "<unparseable URL>"
    if parsed.user is None and parsed.password is None:
        return url
    return str(parsed.with_user(None))


def redact_credentials(text: str) -> str:
    """``text`` with every URL's password masked (``user:***@``; a lone token: ``***@``)."""
    return _USERINFO.sub(_mask, text)


def _mask(found: re.Match[str]) -> str:
    user, colon, _ = found.group(0)[:-1].partition(":")
    return f"{user}:***@" if colon else "***@"


def with_credentials_of(url: str, base: str) -> str:
    """``url`` with ``base``'s credentials when both name the same origin and ``url`` has none."""
    try:
        target, origin = URL(url), URL(base)
    except (TypeError, ValueError):
        return url
    if target.user is not None or origin.user is None or not target.is_absolute():
        return url
    same = (target.scheme, target.host, target.port) == (origin.scheme, origin.host, origin.port)
    if not same:
        return url
    return str(target.with_user(origin.user).with_password(origin.password))
