"""Prompt templates: filled from columns and axes, sent and recorded; gaps are rejected."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_helpers import output, run

from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import Defaults, ManifestReader
from pipeline.sim import SimServer
from pipeline.templates import PromptTemplate, html_to_text, markup_in
from pipeline.variations import Catalog


def test_the_filled_prompt_is_sent_and_recorded(
    products: Path, tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    summary = run(
        products, out, sim, prompt_template="Studio photo of a {color} {title} in {material}"
    )
    assert summary.counts["succeeded"] == 3
    done = output(out).sort("row")
    assert done["prompt"].to_list() == [
        "Studio photo of a red Classic mug in stoneware",
        "Studio photo of a blue Classic mug in stoneware",
        "Studio photo of a tan Leather tote in leather",
    ]
    # The row's own columns still travel with it.
    assert done["title"].to_list() == ["Classic mug", "Classic mug", "Leather tote"]


def test_a_row_missing_a_field_is_rejected_naming_field_row_and_column(
    tmp_path: Path, sim: SimServer
) -> None:
    manifest = tmp_path / "gaps.csv"
    manifest.write_text(
        "id,title,color\nmug-red,Classic mug,red\nmug-none,Classic mug,  \nbag,,black\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    summary = run(manifest, out, sim, prompt_template="{title} in {color}")
    assert summary.counts["succeeded"] == 1
    assert summary.counts["rejected"] == 2
    rows = output(out).sort("row")
    assert rows["status"].to_list() == ["succeeded", "rejected", "rejected"]
    assert rows["reason"][1] == (
        "gaps.csv row 2, column color: is empty, but the prompt template needs {color}; "
        "fill the cell, write {color?} to leave it out when empty or {color|default} for a "
        "default, or leave {color} out of --prompt-template"
    )
    assert rows["reason"][2].startswith("gaps.csv row 3, column title: is empty")
    assert rows["key"].to_list() == ["mug-red", "mug-none", "bag"]


def test_template_naming_an_unknown_column_stops_before_anything_is_sent(
    products: Path, tmp_path: Path, sim: SimServer
) -> None:
    with pytest.raises(ConfigError) as caught:
        run(products, tmp_path / "out", sim, prompt_template="{title} in {colour}")
    assert str(caught.value).startswith(
        "--prompt-template uses {colour}, but products.csv has no column 'colour' and no "
        "variation axis has that name (did you mean {color}?)"
    )
    assert sim.stats()["totals"]["submits_accepted"] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{title", "expected '}' before end of string"),
        ("{}", "{} does not name a column"),
        ("{price:.2f}", "{price:.2f} has a format or conversion; write just {price}"),
        ("no holes at all", "names no column"),
        ("  ", "is empty"),
    ],
)
def test_bad_templates_are_refused_with_a_way_out(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PromptTemplate.parse(text)
    assert message in str(caught.value)


def test_literal_braces_and_typed_columns(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {"id": ["a", "b"], "size": [2.0, 2.5], "count": [3, 4], "name": [" cup ", "jar"]}
    )
    catalog = Catalog.build(prompt_template="{{set}} of {count} {name}s, {size} l")
    assert catalog is not None
    reader = ManifestReader(frame, require_prompt=False)
    catalog.check(reader)
    rows, rejections = next(catalog.iter_rows(reader, Defaults()))
    assert rejections == []
    assert [row.request.prompt for row in rows] == [
        "{set} of 3 cups, 2 l",
        "{set} of 4 jars, 2.5 l",
    ]


def test_a_pim_s_list_columns_fill_a_hole_and_records_are_refused_by_name(
    tmp_path: Path,
) -> None:
    """A PIM dump in Parquet holds tags as lists and attributes as records: a list fills a
    hole as a person would write it; a record (or bytes) stops the run naming the file, the
    column, its type and the template, where it crashed as an internal error before."""
    tags = pa.array([["red", " ceramic ", ""], [], None], pa.list_(pa.string()))
    attributes = pa.array([{"c": "r"}, {"c": "x"}, None], pa.struct([("c", pa.string())]))
    table = pa.table({"id": ["a", "b", "c"], "title": ["mug", "bag", "jar"], "tags": tags})
    pq.write_table(table.append_column("attributes", attributes), tmp_path / "pim.parquet")
    reader = ManifestReader(tmp_path / "pim.parquet", require_prompt=False)
    catalog = Catalog.build(prompt_template="{title} in {tags}")
    assert catalog is not None
    catalog.check(reader)
    rows, rejections = next(catalog.iter_rows(reader, Defaults()))
    assert [row.request.prompt for row in rows] == ["mug in red, ceramic"]
    assert [r.reason.split(": ")[0] for r in rejections] == [
        "pim.parquet row 2, column tags",  # an empty list is an empty cell
        "pim.parquet row 3, column tags",
    ]
    catalog = Catalog.build(prompt_template="{title} {attributes}")
    assert catalog is not None
    with pytest.raises(ManifestError) as refused:
        next(
            catalog.iter_rows(
                ManifestReader(tmp_path / "pim.parquet", require_prompt=False), Defaults()
            )
        )
    assert str(refused.value) == (
        "--prompt-template uses {attributes}, but pim.parquet column 'attributes' has type "
        "Struct({'c': String}); a template takes text, numbers or lists of them: put what "
        "the prompt needs in a column of its own"
    )


def test_a_template_can_build_on_the_prompt_column(tmp_path: Path) -> None:
    frame = pl.DataFrame({"prompt": ["red mug", "blue mug"]})
    catalog = Catalog.build(prompt_template="{prompt}, {style}", vary=["style=studio,outdoor"])
    assert catalog is not None
    reader = ManifestReader(frame)
    catalog.check(reader)
    rows, _ = next(catalog.iter_rows(reader, Defaults()))
    assert sorted(row.request.prompt for row in rows) == [
        "blue mug, outdoor",
        "blue mug, studio",
        "red mug, outdoor",
        "red mug, studio",
    ]


# --- optional holes, defaults, HTML as text ---------------------------------------------------


def test_optional_holes_defaults_and_html_as_text(tmp_path: Path, sim: SimServer) -> None:
    manifest = tmp_path / "shop.csv"
    manifest.write_text(
        "id,title,size,color,body\n"
        'pot,Clay pot,Large,,"<p>Blown clay &amp; <b>glaze</b></p><ul><li>10 cm</li></ul>"\n'
        "pick,Guitar pick,,red,\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    summary = run(
        manifest,
        out,
        sim,
        prompt_template="Photo of a {title} ({size?}), {color|neutral} tone, {body?|text}",
    )
    assert summary.counts["succeeded"] == 2
    prompts = output(out).sort("row")["prompt"].to_list()
    assert prompts == [
        "Photo of a Clay pot (Large), neutral tone, Blown clay & glaze. 10 cm",
        # Empty optional holes leave no "()", double spaces or dangling comma behind.
        "Photo of a Guitar pick, red tone",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{color?|red}", "is optional (?) and has a default; use one"),
        ("{color|red|blue}", "has two defaults"),
        ("{?}", "does not name a column"),
    ],
)
def test_bad_optional_and_default_holes(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PromptTemplate.parse(text)
    assert message in str(caught.value)


def test_html_to_text_and_markup_detection() -> None:
    assert html_to_text("<p>One</p><p>Two!</p><br>Three &mdash; four<script>x()</script>") == (
        "One. Two! Three \u2014 four"
    )
    assert markup_in("a <p>mug</p>") == "<p>"
    assert markup_in("cups &amp; saucers") == "&amp;"
    assert markup_in("R&D tested, 3 < 4 > 2") is None
