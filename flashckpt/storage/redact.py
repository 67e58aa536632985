"""Credentials out of URLs and messages, before they reach a log line, an error or ``stats``."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: An authority without credentials: a host, maybe ``:port`` (an ``@`` after it is in the path).
_PLAIN_HOST = re.compile(r"[^:@]*(:[0-9]*)?")
#: Query or fragment parameter names whose values are secrets: signatures, tokens, keys,
#: passwords, credentials (``sig``, ``X-Amz-Signature``, ``X-Amz-Credential``,
#: ``X-Amz-Security-Token``, ``access_key``, ``AWSAccessKeyId``, ``api_key``, ``secret``,
#: ``password``, ``auth``, ``session``, ``code``, ...).  Matched anywhere in the name, case
#: folded: a harmless parameter redacted by mistake costs a log line's detail, a missed one
#: a credential.
_SECRET_PARAM = re.compile(r"sig|token|key|secret|passw|pwd|cred|auth|session|code|sas", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without credentials: safe for logs, errors, ``stats`` and directory names.

    - ``user:password@`` becomes ``***@``.  The userinfo ends at the *last* ``@``, so a
      password holding ``@``, ``/`` or ``?`` (percent-encoded or not) is removed whole.
      Only when the part before the first ``/`` is a plain ``host[:port]`` is an ``@``
      further on taken as part of the path and kept (``s3://bucket/run@v2``).
    - The value of every query or fragment parameter whose name suggests a credential
      (``?sig=``, ``token``, ``X-Amz-Signature``, ``X-Amz-Credential``, ``access_key``,
      ``secret``, ``password``, ...) becomes ``***``.

    Anything that is not a ``scheme://`` URL (a local path) is returned unchanged.  Pure.
    """
    text = str(url)
    m = _SCHEME.match(text)
    if m is None:
        return text
    scheme, rest = m.group(0), text[m.end() :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in rest and not _PLAIN_HOST.fullmatch(authority):
        rest = "***@" + rest[rest.rindex("@") + 1 :]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return scheme + rest[:cut] + _redact_params(rest[cut:])


def redact_text(text: str) -> str:
    """``text`` (an error message from a library) with every URL in it redacted.  Pure."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


def _redact_params(tail: str) -> str:
    """Redact secret-looking parameter values in ``?query#fragment`` (either may be absent)."""
    out = []
    for part in re.split(r"([?#&;])", tail):
        name, eq, _value = part.partition("=")
        if eq and _SECRET_PARAM.search(unquote_plus(name)):
            part = f"{name}=***"
        out.append(part)
    return "".join(out)
