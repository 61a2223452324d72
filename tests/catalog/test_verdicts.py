"""validate and run give the same verdict on every row, in the same words."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from catalog_helpers import output, run
from PIL import Image

from pipeline.check import check_manifest
from pipeline.manifest import Defaults
from pipeline.sim import SimServer
from pipeline.variations import Catalog


def test_validate_predicts_the_run_row_for_row(tmp_path: Path, sim: SimServer) -> None:
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "green.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,title,color,seed,input_image\n"
        "a1,mug,red,,green.png\n"
        "a2,mug,,,\n"  # template hole empty
        "a1,cup,blue,,\n"  # repeats a1's key
        "a4,jar,green,-3,\n"  # bad seed
        "a5,bowl,white,,broken.png\n"  # unusable reference
        "a6,vase,black,,missing.png\n"  # missing reference
        "a7,lamp,brass,,\n",
        encoding="utf-8",
    )
    template = "{title} in {color}"
    report = check_manifest(
        manifest, defaults=Defaults(), catalog=Catalog.build(prompt_template=template)
    )
    run(manifest, tmp_path / "out", sim, prompt_template=template)
    rows = output(tmp_path / "out").sort("row")
    rejected = rows.filter(pl.col("status") == "rejected")
    assert report.rejected == rejected.height == 5
    assert report.valid == rows.filter(pl.col("status") == "succeeded").height == 2
    said = sorted(message for group in report.rejections.values() for message in group.examples)
    assert said == sorted(rejected["reason"].to_list())
    assert int(report.exit_code) == 1


def test_validate_counts_a_bad_reference_once_per_row_not_per_variation(tmp_path: Path) -> None:
    """Two variations of each row share its reference: "(2 rows: 1, 3)", not
    "(4 rows: 1, 1, 3, 3)" as the audit's Shopify check read."""
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,prompt,input_image\na,mug,missing.png\nb,cup,\nc,jar,missing.png\n",
        encoding="utf-8",
    )
    report = check_manifest(
        manifest, defaults=Defaults(), catalog=Catalog.build(vary=["style=studio,loft"])
    )
    (problem,) = report.reference_problems.values()
    assert (problem.row_count, problem.rows) == (2, [1, 3])
    assert "(2 rows: 1, 3)" in report.render()
    assert report.rejected == 4  # each variation is an image that will not be made


def test_without_an_id_column_a_repeat_is_the_same_request_and_an_id_like_column_is_named(
    tmp_path: Path, sim: SimServer
) -> None:
    """A data team's table keyed by ``product_id``: the pipeline keys rows by ``id`` only,
    so two products with the same prompt were one image, and the rejection blamed a
    ``column id`` the file does not have for a key (``r-e81a...``) nobody wrote."""
    source = tmp_path / "pim.parquet"
    pl.DataFrame(
        {"product_id": [101, 102, 103], "prompt": ["red mug", "blue mug", "red mug"]}
    ).write_parquet(source)

    report = check_manifest(source, defaults=Defaults())

    said = (
        "pim.parquet row 3: asks for the same image as row 1 (the same prompt and settings; "
        "without an id column a row's key is its request); give the rows an id column to "
        "make both"
    )
    assert report.rejections["prompt"].examples == [said]
    assert report.notices == [
        "pim.parquet: no 'id' column, so each row is keyed by its request (rows asking for "
        "the same image are made once); column 'product_id' looks like an id: name it 'id' "
        "to key rows by it"
    ]
    summary = run(source, tmp_path / "out", sim)
    assert summary.notices == report.notices
    table = pl.read_parquet(tmp_path / "out" / "manifest.parquet").sort("row")
    assert table["status"].to_list() == ["succeeded", "succeeded", "rejected"]
    assert table["reason"][2] == said  # the run says what validate said
    # Named id, the same table makes three images, and nothing is noted.
    keyed = tmp_path / "keyed.parquet"
    pl.read_parquet(source).rename({"product_id": "id"}).write_parquet(keyed)
    again = check_manifest(keyed, defaults=Defaults())
    assert (again.valid, again.rejected, again.notices) == (3, 0, [])


def test_a_prompt_the_template_builds_too_long_names_the_cell_that_made_it(
    tmp_path: Path, sim: SimServer
) -> None:
    """The row has no prompt cell: "column prompt: 12504 characters is too long" sent the
    merchandiser looking for a column the file does not have."""
    manifest = tmp_path / "long.csv"
    pl.DataFrame(
        {"id": ["a", "b"], "title": ["mug", "cup"], "desc": ["word " * 2500, "short"]}
    ).write_csv(manifest)
    template = "{title}: {desc}"
    report = check_manifest(
        manifest, defaults=Defaults(), catalog=Catalog.build(prompt_template=template)
    )
    said = (
        "long.csv row 1, column desc: the prompt --prompt-template builds is 12,504 "
        "characters; at most 10,000 are allowed, and {desc} gives 12,500 of them: shorten "
        "the cell or leave {desc} out of --prompt-template"
    )
    assert report.rejections["desc"].examples == [said]
    run(manifest, tmp_path / "out", sim, prompt_template=template)
    rows = output(tmp_path / "out").sort("row")
    assert rows["status"].to_list() == ["rejected", "succeeded"]
    assert rows["reason"][0] == said
