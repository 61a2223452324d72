"""The FLUX.2 [klein] API's vocabulary, in one place.

Everything the client validates against, and everything the simulator enforces, comes from
here, so the two cannot drift apart. The source is ``shared/api-contract.md``; where public
documentation leaves a point open (for example what an image costs) this module fixes it and
says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

# --- request parameters -------------------------------------------------------------------

#: 1k output size (width, height) of each aspect-ratio preset.
ASPECT_RATIOS: Final[dict[str, tuple[int, int]]] = {
    "square_1_1": (1024, 1024),
    "widescreen_16_9": (1344, 768),
    "social_story_9_16": (768, 1344),
    "portrait_2_3": (832, 1216),
    "traditional_3_4": (960, 1280),
    "vertical_1_2": (704, 1408),
    "horizontal_2_1": (1408, 704),
    "social_post_4_5": (896, 1152),
    "standard_3_2": (1216, 832),
    "classic_4_3": (1280, 960),
}
DEFAULT_ASPECT_RATIO: Final = "square_1_1"
#: Each preset's plain ratio as catalogs and spreadsheets write it (``16:9``, ``16/9``,
#: ``16x9``): read as the preset's name (``widescreen_16_9``), which is what is sent.
ASPECT_RATIO_ALIASES: Final[dict[str, str]] = {
    f"{wide}{sep}{high}": name
    for name in ASPECT_RATIOS
    for wide, high in [name.rsplit("_", 2)[1:]]
    for sep in (":", "/", "x")
}

RESOLUTIONS: Final = ("1k", "2k")
DEFAULT_RESOLUTION: Final = "1k"
MAX_SIDE: Final = 2048
SIDE_MULTIPLE: Final = 16

OUTPUT_FORMATS: Final = ("png", "jpeg")
DEFAULT_OUTPUT_FORMAT: Final = "jpeg"
#: MIME type and file extension of each output format.
FORMAT_MIME: Final = {"png": "image/png", "jpeg": "image/jpeg"}
FORMAT_EXT: Final = {"png": "png", "jpeg": "jpg"}

#: Longest prompt the pipeline sends, in characters. The contract sets no limit; this is the
#: project's own cap, so that a runaway cell (a pasted document) is rejected with a clear
#: message instead of being sent and billed.
PROMPT_MAX_CHARS: Final = 10_000

SEED_MIN: Final = 0
SEED_MAX: Final = 4_294_967_295

SAFETY_MIN: Final = 0
SAFETY_MAX: Final = 5
DEFAULT_SAFETY: Final = 2

#: Request fields that carry reference images, in order.
REFERENCE_FIELDS: Final = ("input_image", "input_image_2", "input_image_3", "input_image_4")
MAX_REFERENCES: Final = len(REFERENCE_FIELDS)
#: Reference image formats the API accepts as they are; others are converted first.
REFERENCE_MIME: Final = ("image/jpeg", "image/png")

#: Dialect B's bounds on an explicit width/height.
BFL_MIN_SIDE: Final = 64
BFL_MAX_PIXELS: Final = 4_000_000
BFL_MODELS: Final = ("flux-2-klein-4b", "flux-2-klein-9b")


def _floor16(value: float) -> int:
    return int(value) // SIDE_MULTIPLE * SIDE_MULTIPLE


def output_size(aspect_ratio: str, resolution: str) -> tuple[int, int]:
    """Width and height the API promises for a preset (the contract's table, computed).

    2k doubles the 1k size; a side past 2048 scales both sides down in proportion so the
    longer side is 2048, then each side is floored to a multiple of 16.
    """
    width, height = ASPECT_RATIOS[aspect_ratio]
    if resolution == "1k":
        return width, height
    if resolution != "2k":
        raise ValueError(f"unknown resolution {resolution!r}")
    width, height = width * 2, height * 2
    longest = max(width, height)
    if longest <= MAX_SIDE:
        return width, height
    # Integer arithmetic so no float rounding can move a side across a multiple of 16.
    return (
        width * MAX_SIDE // longest // SIDE_MULTIPLE * SIDE_MULTIPLE,
        height * MAX_SIDE // longest // SIDE_MULTIPLE * SIDE_MULTIPLE,
    )


def bfl_size(aspect_ratio: str, resolution: str) -> tuple[int, int]:
    """Dialect B's explicit width/height for a preset: the same table, capped to 4 MP."""
    width, height = output_size(aspect_ratio, resolution)
    if width * height <= BFL_MAX_PIXELS:
        return width, height
    scale = math.sqrt(BFL_MAX_PIXELS / (width * height))
    return _floor16(width * scale), _floor16(height * scale)


@dataclass(frozen=True, slots=True)
class Price:
    """A model's published price, in credits (one credit is one US cent) per megapixel.

    BFL's formula (docs.bfl.ai pricing): the first output megapixel at ``first_mp``, each
    further output megapixel at ``extra_mp``, each input (reference) megapixel at
    ``input_mp``. Megapixels are ``pixels / 1_000_000`` and count in fractions, so a
    1024 x 1024 text-to-image costs ``first_mp`` plus a twentieth of ``extra_mp``; the total
    is rounded to the hundredth of a credit, the precision the API's ``cost`` is read at.
    The docs say nothing of rounding megapixels up, so they are not.
    """

    first_mp: float
    extra_mp: float
    input_mp: float

    def credits(self, width: int, height: int, input_pixels: int = 0) -> float:
        output_mp = width * height / 1_000_000
        value = (
            self.first_mp
            + max(0.0, output_mp - 1.0) * self.extra_mp
            + input_pixels / 1_000_000 * self.input_mp
        )
        return round(value, 2)


#: Dialect A sells one model under one path; its price list is not public (the seed says
#: "see Pricing"), so it is priced as the smaller model BFL sells, klein 4B.
KLEIN_MODEL: Final = "flux-2-klein"

#: Published prices per model (docs.bfl.ai "Pricing", shared/api-contract.md): klein 4B
#: "from $0.014/image" = 1.4 credits for the first megapixel + 0.1 per further or input
#: megapixel; klein 9B 1.5 + 0.2. The simulator's defaults; its ``[prices]`` overrides them.
PRICES: Final[dict[str, Price]] = {
    KLEIN_MODEL: Price(1.4, 0.1, 0.1),
    "flux-2-klein-4b": Price(1.4, 0.1, 0.1),
    "flux-2-klein-9b": Price(1.5, 0.2, 0.2),
}


def cost_credits(
    width: int, height: int, *, model: str = KLEIN_MODEL, input_pixels: int = 0
) -> float:
    """What one image of ``model`` costs at the published price, in credits.

    The planner and the budget estimate with it; dialect B's answer carries the real
    ``cost``, which is what a row records when it is there.
    """
    return PRICES[model].credits(width, height, input_pixels)


# --- task statuses --------------------------------------------------------------------------


class KleinStatus(StrEnum):
    """Dialect A task statuses."""

    CREATED = "CREATED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class BflStatus(StrEnum):
    """Dialect B task statuses."""

    PENDING = "Pending"
    READY = "Ready"
    ERROR = "Error"
    #: Not in the contract's list, but BFL's own API answers it for a task that failed.
    FAILED = "Failed"
    REQUEST_MODERATED = "Request Moderated"
    CONTENT_MODERATED = "Content Moderated"
    TASK_NOT_FOUND = "Task not found"


class RowStatus(StrEnum):
    """The one terminal state every input row ends in, as the output manifest records it."""

    SUCCEEDED = "succeeded"
    MODERATED = "moderated"
    FAILED = "failed"
    REJECTED = "rejected"
    SKIPPED = "skipped"


#: The output-manifest status of an input line that makes no image of its own because it
#: belongs to another line's image (a Shopify image-only line, a variant under
#: ``--per product``, a variable product's parent under ``--per variant``). Not a row the
#: run could fail: such lines never reach the journal, and they do not make a run partial.
MERGED_STATUS: Final = "merged"


# --- rate-limit tiers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tier:
    """What a key on a tier may do: a name and two limits. Data, not code."""

    name: str
    max_active: int
    submits_per_minute: int

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.submits_per_minute < 1:
            raise ValueError(f"tier {self.name!r}: limits must be at least 1")


TIERS: Final[dict[str, Tier]] = {
    tier.name: tier
    for tier in (
        Tier("trial", 2, 120),
        Tier("standard", 24, 3600),
        Tier("scale", 96, 14400),
        Tier("enterprise", 384, 57600),
    )
}
DEFAULT_TIER: Final = "standard"

#: How long a delivery URL stays valid after the task is ready (both dialects).
RESULT_URL_TTL_S: Final = 600.0


# --- dialect A paths and headers ------------------------------------------------------------

KLEIN_PATH: Final = "/v1/ai/text-to-image/flux-2-klein"
KLEIN_KEY_HEADERS: Final = ("x-freepik-api-key", "x-magnific-api-key")
BFL_KEY_HEADER: Final = "x-key"
