"""Draw the example catalog's reference product shots, and write catalog.parquet.

The shots are drawn rather than photographed so the repository stays small and free of
image rights; they only need to be recognisable silhouettes for the demo. Run from the
repository root: ``.venv/bin/python manifests/examples/make_refs.py``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 256


def _canvas(background: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), background)
    return image, ImageDraw.Draw(image)


def mug() -> Image.Image:
    image, draw = _canvas((236, 240, 244))
    draw.ellipse((58, 196, 198, 222), fill=(205, 210, 216))  # shadow
    draw.ellipse((160, 92, 222, 170), outline=(196, 64, 52), width=14)  # handle
    draw.rounded_rectangle((56, 64, 176, 210), radius=14, fill=(214, 72, 58))
    draw.ellipse((56, 52, 176, 78), fill=(168, 48, 40))  # rim
    draw.ellipse((64, 56, 168, 74), fill=(90, 50, 40))  # coffee
    return image


def sneaker() -> Image.Image:
    image, draw = _canvas((250, 246, 238))
    draw.ellipse((24, 190, 236, 212), fill=(226, 220, 210))  # shadow
    draw.rounded_rectangle(
        (22, 168, 234, 196), radius=10, fill=(250, 250, 250), outline=(60, 60, 60), width=3
    )  # sole
    draw.polygon(
        [(30, 170), (40, 120), (96, 96), (132, 60), (170, 62), (176, 110), (226, 136), (230, 170)],
        fill=(38, 92, 170),
    )  # upper
    for step in range(4):
        x = 112 + step * 14
        draw.line((x, 84 + step * 6, x + 22, 98 + step * 6), fill=(245, 245, 245), width=4)
    draw.arc((60, 130, 200, 200), 200, 320, fill=(250, 250, 250), width=5)  # swoosh
    return image


def bag() -> Image.Image:
    image, draw = _canvas((242, 236, 228))
    draw.ellipse((40, 214, 216, 234), fill=(222, 214, 204))  # shadow
    draw.arc((84, 36, 172, 130), 180, 360, fill=(110, 70, 40), width=10)  # handle
    draw.polygon([(52, 100), (204, 100), (222, 220), (34, 220)], fill=(150, 96, 56))
    draw.rectangle((52, 100, 204, 128), fill=(130, 82, 46))  # flap
    draw.rounded_rectangle((116, 118, 140, 140), radius=4, fill=(212, 178, 90))  # clasp
    return image


def bottle() -> Image.Image:
    image, draw = _canvas((232, 244, 238))
    draw.ellipse((86, 222, 170, 238), fill=(210, 224, 216))  # shadow
    draw.rounded_rectangle((106, 20, 150, 50), radius=6, fill=(40, 40, 44))  # cap
    draw.polygon([(112, 50), (144, 50), (168, 92), (88, 92)], fill=(52, 140, 110))
    draw.rounded_rectangle((86, 88, 170, 230), radius=18, fill=(52, 140, 110))
    draw.rectangle((86, 130, 170, 176), fill=(240, 240, 232))  # label
    return image


def write_refs() -> None:
    refs = HERE / "refs"
    refs.mkdir(exist_ok=True)
    mug().save(refs / "mug.png", optimize=True)
    sneaker().save(refs / "sneaker.jpg", quality=82, optimize=True)
    bag().save(refs / "bag.png", optimize=True)
    bottle().save(refs / "bottle.jpg", quality=82, optimize=True)


def write_parquet() -> None:
    """The CSV's content as Parquet, with the number columns typed as a warehouse would."""
    frame = pl.read_csv(HERE / "catalog.csv", infer_schema=False)
    frame = frame.with_columns(
        pl.col("seed").replace("", None).cast(pl.Int64),
        pl.col("safety_tolerance").replace("", None).cast(pl.Int64),
        pl.col("price_eur").cast(pl.Float64),
    )
    frame.write_parquet(HERE / "catalog.parquet")


if __name__ == "__main__":
    write_refs()
    write_parquet()
