"""Variation matrices: one image per (row, variation), stable keys, dry run == real run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from catalog_helpers import accepted, charged, output, run

from pipeline.check import check_manifest
from pipeline.errors import ConfigError
from pipeline.manifest import Defaults
from pipeline.sim import SimServer
from pipeline.variations import Catalog, parse_vary, read_variations_csv

TEMPLATE = "Studio photo of a {color} {title}, {style}"
VARY = ["style=studio,lifestyle", "aspect_ratio=square_1_1,portrait_2_3,widescreen_16_9"]


def test_every_row_in_every_variation_with_keys_from_product_and_values(
    products: Path, tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    summary = run(products, out, sim, prompt_template=TEMPLATE, vary=VARY)
    assert summary.total_rows == 18
    assert summary.counts["succeeded"] == 18
    done = output(out)
    # One output row per (input row, variation), in input order, with the axis values.
    assert done.height == 18
    assert done["row"].to_list() == [1] * 6 + [2] * 6 + [3] * 6
    first = done.filter(pl.col("row") == 1)
    assert first["variation"].to_list() == [
        "square_1_1.studio",
        "portrait_2_3.studio",
        "widescreen_16_9.studio",
        "square_1_1.lifestyle",
        "portrait_2_3.lifestyle",
        "widescreen_16_9.lifestyle",
    ]
    assert first["key"].to_list() == [f"mug-red--{v}" for v in first["variation"].to_list()]
    assert first["style"].to_list() == ["studio"] * 3 + ["lifestyle"] * 3
    assert first["aspect_ratio"].to_list() == ["square_1_1", "portrait_2_3", "widescreen_16_9"] * 2
    assert first["prompt"][3] == "Studio photo of a red Classic mug, lifestyle"
    # The axis overrides the row's own aspect ratio; the image has the size it asked for.
    assert first["width"].to_list()[:3] == [1024, 832, 1344]
    assert sorted(p.name for p in (out / "images").iterdir())[:2] == [
        "mug-blue--portrait_2_3.lifestyle.jpg",
        "mug-blue--portrait_2_3.studio.jpg",
    ]
    # A seed column-less manifest gets a distinct derived seed per variation.
    assert first["seed"].n_unique() == 6


def test_keys_do_not_depend_on_flag_order_and_a_rerun_resumes_everything(
    products: Path, tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    run(products, out, sim, prompt_template=TEMPLATE, vary=VARY)
    keys = sorted(output(out)["key"].to_list())
    paid = accepted(sim)
    assert paid == 18

    again = run(products, out, sim, prompt_template=TEMPLATE, vary=list(reversed(VARY)))
    assert again.resumed_rows == 18
    assert again.counts["succeeded"] == 18
    assert accepted(sim) == paid  # nothing paid twice
    assert sorted(output(out)["key"].to_list()) == keys


def test_variations_csv_columns_vary_together_and_cross_with_flags(
    products: Path, tmp_path: Path, sim: SimServer
) -> None:
    styles = tmp_path / "styles.csv"
    styles.write_text("style,resolution\nstudio white,1k\nkitchen counter,2k\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = run(
        products,
        out,
        sim,
        prompt_template=TEMPLATE,
        vary=["seed=7,8"],
        variations=[styles],
        limit=1,
    )
    assert summary.counts["succeeded"] == 4
    done = output(out)
    assert set(zip(done["style"], done["resolution"], done["seed"], strict=True)) == {
        ("studio white", "1k", 7),
        ("studio white", "1k", 8),
        ("kitchen counter", "2k", 7),
        ("kitchen counter", "2k", 8),
    }
    # Values that are not path-safe get a short digest, so keys stay unique and safe.
    assert all(
        key.startswith("mug-red--1k.7.studio-white-")
        or key.startswith(("mug-red--1k.8.", "mug-red--2k.7.", "mug-red--2k.8."))
        for key in done["key"]
    )
    assert done["key"].n_unique() == 4


def test_dry_run_count_and_cost_equal_the_real_run(
    products: Path, tmp_path: Path, sim: SimServer
) -> None:
    vary = ["style=studio,lifestyle", "resolution=1k,2k", "seed=1,2"]
    catalog = Catalog.build(prompt_template=TEMPLATE, vary=vary)
    report = check_manifest(products, defaults=Defaults(), catalog=catalog)
    assert report.total == report.to_send == 24
    assert "3 rows x 8 variations (style 2 x resolution 2 x seed 2) = 24 images" in (
        report.render()
    )
    summary = run(products, tmp_path / "out", sim, prompt_template=TEMPLATE, vary=vary)
    assert summary.counts["succeeded"] == report.to_send
    assert summary.credits == pytest.approx(report.estimated_credits)
    assert charged(sim) == pytest.approx(report.estimated_credits)


def test_rejections_name_the_variation(tmp_path: Path, sim: SimServer) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,title,color\na,mug,red\nb,mug,\n", encoding="utf-8")
    out = tmp_path / "out"
    run(manifest, out, sim, prompt_template="{title} {color} {style}", vary=["style=x,y"])
    rejected = output(out).filter(pl.col("status") == "rejected").sort("variation")
    assert rejected["reason"].to_list() == [
        "m.csv row 2, variation x, column color: is empty, but the prompt template needs "
        "{color}; fill the cell, write {color?} to leave it out when empty or {color|default} "
        "for a default, or leave {color} out of --prompt-template",
        "m.csv row 2, variation y, column color: is empty, but the prompt template needs "
        "{color}; fill the cell, write {color?} to leave it out when empty or {color|default} "
        "for a default, or leave {color} out of --prompt-template",
    ]
    assert rejected["key"].to_list() == ["b--x", "b--y"]
    assert rejected["row"].to_list() == [2, 2]


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        (["aspect_ratio=square,portrait_2_3"], "--vary aspect_ratio: 'square' is not allowed"),
        (["seed=1,-2"], "--vary seed: '-2' is not allowed; expected a whole number"),
        (["style"], "expected AXIS=VALUE,VALUE..."),
        (["style=a,,b"], "has an empty value"),
        (["style=a,a"], "value 'a' is listed twice"),
        (["style=a", "style=b"], "axis 'style' is given twice"),
        (["id=a,b"], "'id' cannot be a variation axis"),
        (["prompt=a,b"], "vary prompts through --prompt-template"),
    ],
)
def test_bad_axes_are_refused_up_front(vary: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Catalog.build(vary=vary)
    assert message in str(caught.value)


def test_bad_variations_csv_names_file_row_and_column(tmp_path: Path) -> None:
    styles = tmp_path / "styles.csv"
    styles.write_text("style,aspect_ratio\nstudio,square_1_1\nloft,huge\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Catalog.build(variations=[styles])
    assert str(caught.value) == (
        f"{styles} row 2, column aspect_ratio: 'huge' is not allowed; expected one of "
        "square_1_1, widescreen_16_9, social_story_9_16, portrait_2_3, traditional_3_4, "
        "vertical_1_2, horizontal_2_1, social_post_4_5, standard_3_2, classic_4_3, or its "
        "ratio (16:9)"
    )


def test_an_aspect_ratio_written_as_its_ratio_is_the_presets_one_variation(
    tmp_path: Path,
) -> None:
    """`16:9` and `widescreen_16_9` are one image: one name in its key, slug and request."""
    assert parse_vary("aspect_ratio=1:1,16:9").rows == (("square_1_1",), ("widescreen_16_9",))
    # An axis named as a spreadsheet names the column is that column, as in a manifest.
    assert parse_vary("Aspect Ratio=16:9").columns == ("aspect_ratio",)
    styles = tmp_path / "styles.csv"
    styles.write_text("style,aspect_ratio\nstudio,4/5\n", encoding="utf-8")
    assert read_variations_csv(styles).rows == (("studio", "social_post_4_5"),)
    with pytest.raises(ConfigError, match="value 'square_1_1' is listed twice"):
        parse_vary("aspect_ratio=1:1,square_1_1")
