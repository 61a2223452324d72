"""The run's secrets masked wherever text is stored, in the forms an API may echo them.

An API (or a proxy in front of it) may send back what it was sent: the key, the webhook
secret, the password of a ``user:password@`` API URL or the Basic header built from it, and
not always verbatim: upper- or lower-cased, base64- or URL-encoded, inside a task id or a
polling URL. Everything klein-batch stores or prints from an answer (row reasons, task ids,
poll URLs, log lines) goes through ``SecretMask.mask`` (``***``) or ``SecretMask.seal`` first.

Task ids and poll URLs are a special case: a rerun must poll the task, not pay for it again,
so the journal needs them whole. A known form of a secret in them is therefore sealed: stored
as a named placeholder (``{api-key}``, ``{api-key:upper}``, ``{api-key:base64}``...) that
``SecretMask.unseal`` replaces with the same form of the run's own secret when the journal is
read back for polling, exactly as ``urls.with_credentials_of`` restores a URL's password: the
secret is never on disk, and a rerun with the same key polls the same task. Any other spelling
(mixed case, say) is masked as ``***`` for good: a rerun then cannot name that task, and its
row is collected only if ``--retry-failed`` submits it again.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote

from yarl import URL

#: Shorter "secrets" are not masked: replacing every "ab" in a message would hide more
#: than it protects, and no real key or password is that short.
MIN_SECRET_CHARS: Final = 6


def _forms(secret: str) -> dict[str, str]:
    """The spellings of ``secret`` an echo may take, by the placeholder suffix they get."""
    raw = secret.encode()
    b64 = base64.b64encode(raw).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(raw).decode("ascii")
    return {
        "": secret,
        ":upper": secret.upper(),
        ":lower": secret.lower(),
        ":base64": b64,
        ":base64-unpadded": b64.rstrip("="),
        ":base64url": urlsafe.rstrip("="),
        ":hex": binascii.hexlify(raw).decode("ascii"),
        ":url": quote(secret, safe=""),
    }


class SecretMask:
    """Masks named secrets in text, reversibly where a rerun needs the text back."""

    def __init__(self, secrets: Mapping[str, str | None]) -> None:
        forms: list[tuple[str, str]] = []
        loose: list[str] = []
        for name, secret in secrets.items():
            if not secret or len(secret) < MIN_SECRET_CHARS:
                continue
            loose.append(re.escape(secret))
            for suffix, text in _forms(secret).items():
                forms.append((text, "{" + name + suffix + "}"))
        seen: set[str] = set()
        #: (spelling, placeholder), longest spelling first so none hides part of another.
        self._forms: list[tuple[str, str]] = []
        for text, placeholder in sorted(forms, key=lambda form: -len(form[0])):
            if len(text) >= MIN_SECRET_CHARS and text not in seen:
                seen.add(text)
                self._forms.append((text, placeholder))
        self._loose = re.compile("|".join(loose), re.IGNORECASE) if loose else None

    @classmethod
    def of_run(
        cls, base_url: str, api_key: str | None, webhook_secret: str | None = None
    ) -> SecretMask:
        """The secrets a provider holds: its key, webhook secret and API URL's password."""
        try:
            url = URL(base_url)
            user, password = url.user, url.password
        except (TypeError, ValueError):
            user = password = None
        basic = base64.b64encode(f"{user or ''}:{password}".encode()).decode() if password else None
        return cls(
            {
                "api-key": api_key,
                "webhook-secret": webhook_secret,
                "url-password": password,
                "basic-auth": basic,
            }
        )

    def __bool__(self) -> bool:
        return bool(self._forms)

    def mask(self, text: str) -> str:
        """``text`` with every spelling of a secret replaced by ``***``: for messages."""
        for form, _ in self._forms:
            if form in text:
                text = text.replace(form, "***")
        if self._loose is not None:
            text = self._loose.sub("***", text)
        return text

    def seal(self, text: str) -> str:
        """``text`` with every known spelling of a secret replaced by its placeholder, and
        any other casing of one by ``***``: for task ids and poll URLs (``unseal``)."""
        for form, placeholder in self._forms:
            if form in text:
                text = text.replace(form, placeholder)
        if self._loose is not None:
            text = self._loose.sub("***", text)
        return text

    def unseal(self, text: str) -> str:
        """``text`` as ``seal`` found it, with this run's secrets (``***`` stays)."""
        if "{" not in text:
            return text
        for form, placeholder in self._forms:
            text = text.replace(placeholder, form)
        return text


#: Masks nothing: for readers that only show what the journal holds.
NO_SECRETS: Final = SecretMask({})
