"""Keyed pseudonyms of data subjects, so that logs never hold a subject's identifier.

HMAC-SHA256 under a per-instance secret: the same subject maps to the same pseudonym
(an auditor who knows the identifier and holds the secret can find every access), but the
log alone does not reveal who the subject is.
"""

from __future__ import annotations

import hashlib
import hmac


def subject_pseudonym(secret: bytes, subject: str) -> str:
    if len(secret) < 16:
        raise ValueError("the pseudonym secret must be at least 16 bytes")
    return hmac.new(secret, subject.encode("utf-8"), hashlib.sha256).hexdigest()
