"""Request fingerprints: the name of an image in the library (``pipeline/library.py``).

Two rows, tonight's and last night's, in one run or two, on one machine or another, ask
for the same image exactly when they send the same request: the same dialect and model,
the same prompt as sent (a template already filled in), the same parameters and seed, and
reference images with the same bytes. The fingerprint is a SHA-256 over that canonical
request, so it names the image the API would return for it, and a library keyed by
fingerprint turns "generate the catalog" into "generate what changed".

The canonical form (version 1) is UTF-8 JSON with sorted keys and no spaces::

    {"aspect_ratio":"1:1","dialect":"klein","model":"flux-2-klein",
     "output_format":"png","prompt":"...","references":["<sha256>", ...],
     "resolution":"1k","safety_tolerance":2,"seed":123,"v":1}

``references`` holds the sha256 of each reference image as sent (``Reference.digest``),
never its path or URL: moving a reference file changes nothing, editing it changes the
fingerprint. The fingerprint is the lowercase hex SHA-256 of the bytes
``klein-batch fingerprint\\x00`` followed by that JSON. Any change to what goes in (a new
request parameter) bumps ``v``, so old library entries are never mistaken for new ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Final

from pipeline.contract import KLEIN_PATH
from pipeline.rows import ImageRequest

#: Version of the canonical form; part of every fingerprint.
FINGERPRINT_VERSION: Final = 1
_PREFIX: Final = b"klein-batch fingerprint\x00"


def model_name(dialect: str, model: str | None = None) -> str:
    """The model a dialect's request goes to, as the fingerprint names it.

    Dialect klein has one model (its path names it); dialect bfl picks ``klein-4b``
    (default) or ``klein-9b``, named by the API path (``flux-2-klein-4b``) whichever way
    the option spelt it, so ``--model klein-4b`` and no ``--model`` fingerprint alike.
    """
    if dialect == "bfl":
        from pipeline.providers.bfl import DEFAULT_MODEL, MODELS

        chosen = model or DEFAULT_MODEL
        return MODELS.get(chosen, chosen)
    return KLEIN_PATH.rsplit("/", 1)[-1]


def canonical_request(
    request: ImageRequest, reference_digests: Sequence[str], *, dialect: str, model: str
) -> bytes:
    """The canonical JSON of a request (see the module docstring); ``model`` as named by
    ``model_name``."""
    document = {
        "v": FINGERPRINT_VERSION,
        "dialect": dialect,
        "model": model,
        "prompt": request.prompt,
        "aspect_ratio": request.aspect_ratio,
        "resolution": request.resolution,
        "seed": request.seed,
        "safety_tolerance": request.safety_tolerance,
        "output_format": request.output_format,
        "references": list(reference_digests),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a prompt read from an odd file may hold a lone surrogate; it still hashes.
    return text.encode("utf-8", "surrogatepass")


def fingerprint(
    request: ImageRequest, reference_digests: Sequence[str], *, dialect: str, model: str
) -> str:
    """The request's fingerprint: 64 lowercase hex characters, the same everywhere."""
    body = canonical_request(request, reference_digests, dialect=dialect, model=model)
    return hashlib.sha256(_PREFIX + body).hexdigest()
