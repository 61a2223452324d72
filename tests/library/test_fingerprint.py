"""The request fingerprint: the same request names the same image, on every machine."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from pipeline.fingerprint import canonical_request, fingerprint, model_name
from pipeline.rows import ImageRequest

REQUEST = ImageRequest(
    prompt="Studio photo of a red mug — «glossy»",
    aspect_ratio="square_1_1",
    resolution="1k",
    seed=101,
    safety_tolerance=2,
    output_format="jpeg",
    references=("refs/mug.png",),
)
DIGESTS = ("a" * 64,)


def test_the_canonical_form_is_documented_json() -> None:
    body = canonical_request(REQUEST, DIGESTS, dialect="klein", model="flux-2-klein")
    assert (
        body
        == (
            '{"aspect_ratio":"square_1_1","dialect":"klein","model":"flux-2-klein",'
            '"output_format":"jpeg","prompt":"Studio photo of a red mug — «glossy»",'
            f'"references":["{"a" * 64}"],"resolution":"1k","safety_tolerance":2,"seed":101,'
            '"v":1}'
        ).encode()
    )


def test_the_fingerprint_is_the_same_in_another_process() -> None:
    here = fingerprint(REQUEST, DIGESTS, dialect="klein", model=model_name("klein"))
    code = (
        "from pipeline.fingerprint import fingerprint, model_name\n"
        "from pipeline.rows import ImageRequest\n"
        f"r = ImageRequest(*{dataclasses.astuple(REQUEST)!r})\n"
        f"print(fingerprint(r, {DIGESTS!r}, dialect='klein', model=model_name('klein')))\n"
    )
    # A fresh interpreter with another hash seed: nothing may depend on hash().
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.strip()
    assert other == here
    assert len(here) == 64 and int(here, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "Studio photo of a red mug"},
        {"aspect_ratio": "portrait_2_3"},
        {"resolution": "2k"},
        {"seed": 102},
        {"safety_tolerance": 3},
        {"output_format": "png"},
    ],
)
def test_every_parameter_changes_it(change: dict[str, object]) -> None:
    base = fingerprint(REQUEST, DIGESTS, dialect="klein", model="m")
    changed = dataclasses.replace(REQUEST, **change)  # type: ignore[arg-type]
    assert fingerprint(changed, DIGESTS, dialect="klein", model="m") != base


def test_dialect_model_and_reference_bytes_change_it_but_not_reference_paths() -> None:
    base = fingerprint(REQUEST, DIGESTS, dialect="bfl", model=model_name("bfl"))
    assert fingerprint(REQUEST, DIGESTS, dialect="klein", model=model_name("bfl")) != base
    assert fingerprint(REQUEST, DIGESTS, dialect="bfl", model=model_name("bfl", "klein-9b")) != base
    assert fingerprint(REQUEST, ("b" * 64,), dialect="bfl", model=model_name("bfl")) != base
    assert fingerprint(REQUEST, (), dialect="bfl", model=model_name("bfl")) != base
    moved = dataclasses.replace(REQUEST, references=("elsewhere/mug-copy.png",))
    assert fingerprint(moved, DIGESTS, dialect="bfl", model=model_name("bfl")) == base


def test_the_default_bfl_model_fingerprints_like_its_name() -> None:
    assert model_name("bfl") == model_name("bfl", "klein-4b") == "flux-2-klein-4b"
    assert model_name("bfl", "flux-2-klein-9b") == model_name("bfl", "klein-9b")
    assert model_name("klein") == "flux-2-klein"
