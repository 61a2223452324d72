"""Row keys and seeds: the identity of a row across runs, and the seed that reproduces it.

A key names the output file (``images/<key>.<ext>``, an S3 key later) and is what a rerun
recognises as "already done", so it must be stable, path-safe whatever the manifest holds
(``../`` tricks, slashes, control characters), and distinct for distinct ids. A row
without a seed gets one derived from its key so that running the same manifest again
reproduces the same image instead of paying for a different one.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from pipeline.contract import SEED_MAX
from pipeline.rows import ImageRequest

#: Longest key produced; leaves room for an extension and a prefix within common limits.
MAX_KEY_CHARS: Final = 120
_DIGEST_CHARS: Final = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DOT_RUN = re.compile(r"\.(?=\.)")
_SAFE_AS_IS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,119}")


def _digest(text: str, chars: int) -> str:
    # surrogatepass: ids read from odd files may hold lone surrogates; they still hash.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:chars]


def is_safe_key(raw_id: str) -> bool:
    """True when ``safe_key`` would return the id unchanged (the common, fast case)."""
    return _SAFE_AS_IS.fullmatch(raw_id) is not None and ".." not in raw_id


def safe_key(raw_id: str) -> str:
    """The id made safe for file paths and S3 keys.

    Ids that are already safe stay as they are, so users find their files by their own
    ids. Anything changed or cut gets ``-<8 hex>`` of a digest of the raw id appended, so
    that ``a/b`` and ``a_b`` (or two long ids sharing a prefix) never share a file.
    """
    if is_safe_key(raw_id):
        return raw_id
    cleaned = _DOT_RUN.sub("_", _UNSAFE.sub("_", raw_id)).lstrip(".-")
    suffix = "-" + _digest(raw_id, _DIGEST_CHARS)
    if not cleaned:
        return "id" + suffix
    return cleaned[: MAX_KEY_CHARS - len(suffix)] + suffix


def request_key(request: ImageRequest, *, seed_given: bool = True) -> str:
    """Key of a row without an id: a digest of what it asks for.

    Identical requests get identical keys, so a rerun finds them again and the ledger can
    spot duplicates. With ``seed_given=False`` the seed is left out: the seed of such a row
    is itself derived from this key, and the key must not depend on it.
    """
    return content_key(
        request.prompt,
        request.aspect_ratio,
        request.resolution,
        request.safety_tolerance,
        request.output_format,
        request.references,
        request.seed if seed_given else None,
    )


def content_key(
    prompt: str,
    aspect_ratio: str,
    resolution: str,
    safety_tolerance: int,
    output_format: str,
    references: tuple[str, ...],
    seed: int | None,
) -> str:
    """``request_key`` from the fields themselves, for the manifest's hot loop.

    Every text is length-prefixed, so no choice of characters in a prompt or reference can
    make two different requests encode alike.
    """
    refs = "".join(f"{len(ref)}:{ref}" for ref in references)
    canonical = (
        f"v1|{len(prompt)}:{prompt}|{len(aspect_ratio)}:{aspect_ratio}|"
        f"{len(resolution)}:{resolution}|{safety_tolerance}|"
        f"{len(output_format)}:{output_format}|{len(references)}:{refs}|"
        f"{'-' if seed is None else seed}"
    )
    return "r-" + _digest(canonical, 24)


def derive_seed(key: str) -> int:
    """A seed in 0..4294967295 from a key, identical in every process and on every machine.

    hashlib rather than ``hash()``: Python salts ``hash()`` per process, which would make
    every rerun draw a new image.
    """
    digest = hashlib.sha256(b"klein-batch seed\x00" + key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:4], "big") % (SEED_MAX + 1)


def key_shard(key: str, shards: int) -> int:
    """Which of ``shards`` a row with stable ``key`` belongs to (0-based).

    Shards of a flow are defined by key, not by position: a row inserted or removed in the
    manifest moves no other row to another shard, so tonight's edited catalog resumes into
    last night's shards (each with its own journal) without paying for a row twice.
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % shards
