"""Shop exports run as the shop writes them: Shopify and WooCommerce product CSVs, a mapping.

The fixtures in tests/data/exports are shaped like the platforms' own exports: Shopify's
full product CSV header (Handle-grouped product, variant and image lines, the
``Title``/``Default Title`` placeholder option) and WooCommerce's exporter columns (a
variable product and its variations, simple, grouped and external products, a UTF-8 BOM).
"""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest
from catalog_helpers import accepted, klein, output, run, three_products

from pipeline.check import check_manifest
from pipeline.contract import KLEIN_MODEL
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import Defaults
from pipeline.product_exports import ExportSpec, open_manifest
from pipeline.run import RunOptions
from pipeline.sim import SimConfig, SimServer
from pipeline.variations import Catalog

EXPORTS = Path(__file__).resolve().parents[1] / "data" / "exports"
SHOPIFY = EXPORTS / "shopify_products.csv"
WOO = EXPORTS / "woocommerce_products.csv"
#: What the simulator (default prices) charges for one square 1k image.
EACH = SimConfig().price(KLEIN_MODEL).credits(1024, 1024)
SHOP_TEMPLATE = "Studio photo of {Title} {Option1 Value?} {Option2 Value?}, {Body (HTML)|text}"


def _lines(path: Path) -> int:
    return pl.read_csv(path, infer_schema=False).height


def test_shopify_per_product_one_image_per_handle_every_line_accounted(
    tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    summary = run(
        SHOPIFY, out, sim, catalog="shopify", per="product", prompt_template=SHOP_TEMPLATE
    )
    rows = output(out).sort("row")
    assert rows.height == _lines(SHOPIFY) == 10
    assert rows["row"].to_list() == list(range(1, 11))
    made = rows.filter(pl.col("status") == "succeeded")
    assert made["key"].to_list() == [
        "clay-plant-pot",
        "ocean-blue-shirt",
        "red-sports-tee",
        "guitar-pick",
        "copper-light",
    ]
    assert accepted(sim) == 5
    # Variant and image lines are merged into their product, each saying so.
    merged = rows.filter(pl.col("status") == "merged")
    assert merged["row"].to_list() == [2, 3, 6, 7, 10]
    assert merged["reason"][0] == (
        "shopify_products.csv row 2: variant Large of 'clay-plant-pot', merged into its "
        "product (row 1): --per product makes one image per product"
    )
    assert merged["reason"][1].startswith(
        "shopify_products.csv row 3: image 3 of 'clay-plant-pot', an image line"
    )
    # Plain text from Body (HTML), no placeholder option, no empty-hole gaps.
    prompts = dict(zip(made["key"], made["prompt"], strict=True))
    assert prompts["ocean-blue-shirt"] == (
        "Studio photo of Ocean Blue Shirt, Ocean blue cotton shirt with a narrow collar and "
        "buttons down the front & long sleeves. 100% cotton. Machine wash"
    )
    assert prompts["clay-plant-pot"] == (
        "Studio photo of Clay Plant Pot Regular, Classic blown clay pot for plants"
    )
    assert not any("Default Title" in p or "<" in p for p in made["prompt"].to_list())
    # Every input column as it came, the Handle included, for joining back.
    # (Shopify's Status is input_Status: ours is status, and case-blind tools mix them.)
    assert rows.columns[-48:][0] == "Handle" and rows.columns[-1] == "input_Status"
    assert rows["Variant SKU"].to_list()[:2] == ["POT-REG", "POT-LRG"]
    # Merged lines do not make a run partial.
    assert summary.counts["merged"] == 5 and int(summary.exit_code) == 0


def test_shopify_per_variant_fills_product_fields_down(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    run(SHOPIFY, out, sim, catalog="shopify", per="variant", prompt_template=SHOP_TEMPLATE)
    rows = output(out).sort("row")
    made = rows.filter(pl.col("status") == "succeeded")
    assert made["key"].to_list() == [
        "clay-plant-pot.regular",
        "clay-plant-pot.large",
        "ocean-blue-shirt",
        "red-sports-tee.s.red",
        "red-sports-tee.m.red",
        "red-sports-tee.l.red",
        "guitar-pick",
        "copper-light",
    ]
    # The variant lines had no Title or Body (HTML): filled down from their product's line.
    assert made["prompt"][4] == (
        "Studio photo of Red Sports Tee M Red, Women's red sporty t-shirt with colorful "
        "details on the sleeves and a small white pocket."
    )
    # ... for the prompt only: the manifest gives the line's own (empty) cell back.
    assert rows.filter(pl.col("row") == 6)["Title"].to_list() == [""]
    merged = rows.filter(pl.col("status") == "merged")
    assert merged["row"].to_list() == [3, 10]
    assert merged["reason"][0].endswith("the product's images are made on rows 1, 2")


def test_woocommerce_per_product_and_per_variant(tmp_path: Path, sim: SimServer) -> None:
    template = "{Name}, {Attribute 1 value(s)|assorted colours}: {Description|text}"
    run(WOO, tmp_path / "p", sim, catalog="woocommerce", per="product", prompt_template=template)
    per_product = output(tmp_path / "p").sort("row")
    assert per_product.height == 8
    assert per_product.filter(pl.col("status") == "succeeded")["key"].to_list() == [
        "woo-vneck-tee",
        "woo-tshirt",
        "woo-logo-collection",
        "wp-pennant",
        "woo-album",
    ]
    assert per_product.filter(pl.col("status") == "merged")["reason"][0] == (
        "woocommerce_products.csv row 2: variation 'V-Neck T-Shirt - Red' merged into its "
        "variable product (row 1): --per product makes one image per product"
    )

    run(WOO, tmp_path / "v", sim, catalog="woocommerce", per="variant", prompt_template=template)
    per_variant = output(tmp_path / "v").sort("row")
    made = per_variant.filter(pl.col("status") == "succeeded")
    # The blue variation has no SKU: its parent's SKU and its attribute value name it.
    assert made["key"].to_list()[:3] == [
        "woo-vneck-tee-red",
        "woo-vneck-tee-green",
        "woo-vneck-tee.blue",
    ]
    # A variation's empty Description comes from its parent; HTML became text.
    assert made["prompt"][0] == (
        "V-Neck T-Shirt - Red, Red: Pellentesque habitant morbi tristique senectus et netus "
        "et malesuada fames ac turpis egestas."
    )
    parent = per_variant.filter(pl.col("row") == 1)
    assert parent["status"].to_list() == ["merged"]
    assert parent["reason"][0].endswith("makes one image per variation (rows 2, 3, 4)")
    # The shop's own ID and SKU columns come back as they were (ID is not the key's id).
    assert per_variant["ID"].to_list()[:2] == ["44", "45"]


def test_a_variation_without_its_parent_is_rejected_naming_the_column(tmp_path: Path) -> None:
    broken = tmp_path / "orphans.csv"
    text = WOO.read_text(encoding="utf-8-sig").replace("id:44", "id:999", 1)
    broken.write_text(text, encoding="utf-8")
    report = check_manifest(
        broken,
        defaults=Defaults(),
        export=ExportSpec("woocommerce", "variant"),
        catalog=Catalog.build(prompt_template="{Name}"),
    )
    assert report.rejections["(whole row)"].examples == [
        "orphans.csv row 2, column Parent: 'id:999' names no product in this export; a "
        "variation needs its variable product (id:NN or its SKU)"
    ]


def test_not_an_export_of_that_kind_is_one_clear_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text("id,prompt\na,a mug\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="no column 'Handle', so it is not a Shopify"):
        open_manifest(plain, export=ExportSpec("shopify"))
    with pytest.raises(ManifestError, match="so it is a Shopify product export, not a Woo"):
        open_manifest(SHOPIFY, export=ExportSpec("woocommerce"))
    with pytest.raises(ConfigError, match="--per 'colour' is not allowed"):
        ExportSpec("shopify", "colour")


def test_a_mapping_in_the_config_file_reads_any_pim_export(tmp_path: Path) -> None:
    pim = tmp_path / "pim.csv"
    pim.write_text(
        "article,model,title,colour,picture\n"
        "A-1,chair-oak,Oak chair,natural,\n"
        "A-2,,,black,\n"
        "B-1,lamp,Desk lamp,brass,\n",
        encoding="utf-8",
    )
    config = tmp_path / "pim.toml"
    config.write_text(
        'prompt_template = "{title} in {colour}"\n'
        "[catalog]\n"
        'id_column = "article"\n'
        'group_column = "model"\n'
        'fill_down = ["title"]\n',
        encoding="utf-8",
    )
    result = klein(
        "run",
        str(pim),
        "--config",
        str(config),
        "--per",
        "variant",
        "--sim",
        "--out",
        str(tmp_path / "out"),
        "--progress",
        "off",
    )
    assert result.returncode == 0, result.stderr
    rows = output(tmp_path / "out").sort("row")
    assert rows["key"].to_list() == ["A-1", "A-2", "B-1"]
    assert rows["prompt"].to_list() == [
        "Oak chair in natural",
        "Oak chair in black",
        "Desk lamp in brass",
    ]
    assert rows["article"].to_list() == ["A-1", "A-2", "B-1"]


def test_validate_reads_the_export_and_warns_about_markup(tmp_path: Path) -> None:
    result = klein(
        "validate",
        str(SHOPIFY),
        "--catalog",
        "shopify",
        "--prompt-template",
        "{Title}: {Body (HTML)}",
    )
    assert result.returncode == 0, result.stderr
    assert "read as a Shopify export, one image per product; 5 input lines merged" in (
        result.stdout
    )
    assert "Warning: 5 prompts still contain markup" in result.stdout
    assert "shopify_products.csv row 1: the prompt still contains markup ('<p>')" in (result.stdout)


def test_a_budget_stop_and_a_rerun_of_an_export_pay_each_image_once(
    tmp_path: Path, sim: SimServer
) -> None:
    out = tmp_path / "out"
    kwargs = {"catalog": "shopify", "per": "variant", "prompt_template": SHOP_TEMPLATE}
    budget = round(2.5 * 2 * EACH, 2)
    first = run(SHOPIFY, out, sim, vary=["style=studio,loft"], max_credits=budget, **kwargs)
    # 8 variants x 2 styles; two and a half variants' worth makes two whole ones (4 images).
    assert first.state == "stopped: budget" and first.counts["succeeded"] == 4
    second = run(SHOPIFY, out, sim, vary=["style=studio,loft"], max_credits=100.0, **kwargs)
    assert second.state == "finished" and second.counts["succeeded"] == 16
    assert accepted(sim) == 16  # the first run's four were not sent again
    rows = output(out)
    assert rows.height == 16 + 2  # every (variant, style), and the two image-only lines
    assert rows.filter(pl.col("status") == "merged").height == 2


def test_variants_whose_options_slug_alike_get_an_image_each(
    tmp_path: Path, sim: SimServer
) -> None:
    """大 and 小, S/M and S M, Café and CAFÉ: one id made safe for file names each, so all
    but the first were rejected as repeats; the same option twice is still a repeat."""
    shop = tmp_path / "shop.csv"
    pl.DataFrame(
        {
            "Handle": ["kimono", "kimono", "sz", "sz", "sz", "mug", "mug", "tee", "tee"],
            "Title": ["Kimono", None, "Size test", None, None, "Mug", None, "Tee", None],
            "Option1 Name": ["サイズ", None, "Size", None, None, "Name", None, "Size", None],
            "Option1 Value": ["大", "小", "S/M", "S M", "s-m", "Café", "CAFÉ", "M", "M"],
            "Variant SKU": [f"V{i}" for i in range(9)],
        }
    ).write_csv(shop)
    run(shop, tmp_path / "out", sim, catalog="shopify", per="variant", prompt_template="{Title}")
    rows = output(tmp_path / "out").sort("row")
    made = rows.filter(pl.col("status") == "succeeded")
    assert made["Option1 Value"].to_list() == ["大", "小", "S/M", "S M", "s-m", "Café", "CAFÉ", "M"]
    keys = made["key"].to_list()
    assert len(set(keys)) == 8
    # Only the ids that collided changed: "tee.m" is what every earlier run called it.
    assert keys[-1] == "tee.m" and all(key.startswith("kimono.x-") for key in keys[:2])
    repeat = rows.filter(pl.col("status") == "rejected")
    assert repeat["row"].to_list() == [9]
    assert "repeats row 8" in repeat["reason"][0]

    woo = tmp_path / "woo.csv"
    pl.DataFrame(
        {
            "ID": ["1", "2", "3"],
            "Type": ["variable", "variation", "variation"],
            "SKU": ["hoodie", None, None],
            "Name": ["Hoodie", "Hoodie - Grün", "Hoodie - Gr n"],
            "Parent": [None, "id:1", "id:1"],
            "Attribute 1 name": ["Colour", "Colour", "Colour"],
            "Attribute 1 value(s)": ["Grün, Gr n", "Grün", "Gr n"],
        }
    ).write_csv(woo)
    report = check_manifest(
        woo,
        defaults=Defaults(),
        export=ExportSpec("woocommerce", "variant"),
        catalog=Catalog.build(prompt_template="{Name}"),
    )
    assert (report.valid, report.rejected) == (2, 0)


def test_woocommerce_escaped_line_breaks_become_paragraphs(tmp_path: Path, sim: SimServer) -> None:
    """WooCommerce's exporter writes a description's line breaks as the two characters
    backslash-n (its importer turns them back): a prompt gets the text, not a stray "\\n"."""
    woo = tmp_path / "woo.csv"
    pl.DataFrame(
        {
            "ID": ["7"],
            "Type": ["simple"],
            "SKU": ["hoodie"],
            "Name": ["Hoodie"],
            "Description": ["<p>Warm fleece.</p>\\n<p>Machine washable.</p>\\\\n kept"],
        }
    ).write_csv(woo)
    run(woo, tmp_path / "out", sim, catalog="woocommerce", prompt_template="{Description|text}")
    made = output(tmp_path / "out")
    assert made["status"].to_list() == ["succeeded"]
    prompt = made["prompt"][0]
    assert "Warm fleece." in prompt and "Machine washable." in prompt
    assert "\\n kept" in prompt  # an escaped backslash-n is the text's own
    assert prompt.count("\\n") == 1
    # The manifest's Description is the export's own cell, escapes and all, so that it
    # goes back to WooCommerce as it came.
    assert made["Description"][0] == "<p>Warm fleece.</p>\\n<p>Machine washable.</p>\\\\n kept"


def test_report_tiles_of_a_variant_run_tell_the_variants_apart(
    tmp_path: Path, sim: SimServer
) -> None:
    """Without --report-columns, a tile showed the first few columns of the export: the
    product's Body (HTML) (escaped) under every variant, and no option value or SKU."""
    out = tmp_path / "out"
    run(SHOPIFY, out, sim, catalog="shopify", per="variant", prompt_template=SHOP_TEMPLATE)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Body (HTML)" not in page and "&lt;p&gt;" not in page
    assert "Option1 Value" in page and "Option2 Value" in page


def test_a_line_without_its_handle_is_rejected_for_that_not_for_its_empty_title(
    tmp_path: Path,
) -> None:
    """A line with an empty Handle has no product to fill its Title from; the template's
    "Title is empty" hid the cause, which is the Handle."""
    shop = tmp_path / "shop.csv"
    pl.DataFrame(
        {
            "Handle": ["mug", None],
            "Title": ["Mug", None],
            "Option1 Name": ["Size", None],
            "Option1 Value": ["S", "XL"],
            "Variant SKU": ["M-S", "M-XL"],
        }
    ).write_csv(shop)
    report = check_manifest(
        shop,
        defaults=Defaults(),
        export=ExportSpec("shopify", "variant"),
        catalog=Catalog.build(prompt_template="{Title} {Option1 Value?}"),
    )
    assert (report.valid, report.rejected) == (1, 1)
    assert report.rejections["(whole row)"].examples == [
        "shop.csv row 2, column Handle: is empty; every line of a Shopify product export "
        "names its product's Handle"
    ]


def _cells_as_written(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("export", "catalog", "template"),
    [
        (SHOPIFY, "shopify", SHOP_TEMPLATE),
        (WOO, "woocommerce", "{Name}, {Attribute 1 value(s)|assorted colours}: {Description|text}"),
    ],
)
def test_every_export_cell_comes_back_as_the_shop_wrote_it(
    tmp_path: Path, sim: SimServer, export: Path, catalog: str, template: str
) -> None:
    """Product fields were filled down onto every variant and image line (Title, Vendor,
    Tags, a WooCommerce variation's parent Images), Shopify's ``Default Title`` came back
    null and WooCommerce's ``\\n`` as a line break: a merchandiser's join back to the shop
    then disagreed on thousands of cells. Filled-down values still build the prompts."""
    out = tmp_path / "out"
    run(export, out, sim, catalog=catalog, per="variant", prompt_template=template)
    rows = output(out).sort("row")
    written = _cells_as_written(export)
    assert rows.height == len(written)
    for line, (cells, row) in enumerate(zip(written, rows.iter_rows(named=True), strict=True)):
        for column, cell in cells.items():
            name = "input_Status" if column == "Status" else column
            assert str(row[name]) == cell, (line + 1, column)
    made = rows.filter(pl.col("status") == "succeeded")
    if catalog == "shopify":
        # Prompts as before: the variant's Title filled down, no placeholder option.
        assert made["prompt"][4] == (
            "Studio photo of Red Sports Tee M Red, Women's red sporty t-shirt with colorful "
            "details on the sleeves and a small white pocket."
        )
        pick = rows.filter(pl.col("Handle") == "guitar-pick")
        assert pick.select("Option1 Name", "Option1 Value").row(0) == ("Title", "Default Title")
        assert "Default Title" not in pick["prompt"][0]
    else:
        # A variation without a Description of its own is described by its parent's.
        assert made["prompt"][0].startswith("V-Neck T-Shirt - Red, Red: Pellentesque")


@pytest.mark.parametrize(("vary", "batch"), [([], 2000), (["style=studio,loft"], 2000), ([], 3)])
def test_a_budget_keeps_a_products_variants_together_and_in_file_order(
    tmp_path: Path, sim: SimServer, vary: list[str], batch: int
) -> None:
    """Per variant, the "whole product" a budget kept together was one variant line (the
    tee got S and M, not L), and a later product that still fit (the cap) was made after
    an earlier one (the tee) did not: holes a rerun's "next whole product" does not fill
    in order. Now a product is all its variants or none, and the budget stops at the
    first product that does not fit."""
    shop = three_products(tmp_path / "shop.csv")
    out = tmp_path / "out"
    per_line = max(1, 2 * len(vary))
    kwargs = {"catalog": "shopify", "per": "variant", "prompt_template": "{Title}", "vary": vary}
    # The mug, and room for two more lines' images: less than the tee, enough for the cap.
    # Batches of 3 lines would end inside the tee (mug, S, M | L, cap): a product's lines
    # are read in one batch, since the budget plans a product from its batch.
    budget = round(3.5 * per_line * EACH, 2)
    first = run(shop, out, sim, max_credits=budget, options=RunOptions(batch_size=batch), **kwargs)
    rows = output(out).sort("row")
    made = rows.filter(pl.col("status") == "succeeded")
    assert first.state == "stopped: budget"
    assert set(made["Variant SKU"].to_list()) == {"MUG"}
    skipped = rows.filter(pl.col("status") == "skipped")
    assert set(skipped["Variant SKU"].to_list()) == {"TEE-S", "TEE-M", "TEE-L", "CAP"}
    assert all(reason.startswith("budget:") for reason in skipped["reason"].to_list())
    # The rerun continues at the next whole product, paying each image once.
    second = run(shop, out, sim, max_credits=100.0, **kwargs)
    assert second.state == "finished"
    assert accepted(sim) == 5 * per_line


@pytest.mark.parametrize("per", ["product", "variant"])
def test_a_handle_that_comes_back_later_is_rejected_naming_file_line_and_column(
    tmp_path: Path, sim: SimServer, per: str
) -> None:
    """Two exports pasted together repeat a Handle after other products' lines. Per product
    the second block (another Title) was merged into the first without a word; per variant
    one repeat was rejected and another made an extra "Default Title" image. One rule now:
    a product's lines come together, a later block is not used and each of its lines says
    so (file, row, line and column); every other line runs."""
    shop = tmp_path / "shop.csv"
    shop.write_text(
        "Handle,Title,Body (HTML),Option1 Name,Option1 Value,Variant SKU\n"
        'tee,Tee,"<p>Soft</p>\n<p>cotton</p>",Size,S,TEE-S\n'
        "tee,,,,M,TEE-M\n"
        "mug,Mug,,Title,Default Title,MUG\n"
        "tee,Duplicate of tee,,Title,Default Title,DUP-TEE\n"
        "tee,,,,XL,DUP-XL\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    summary = run(shop, out, sim, catalog="shopify", per=per, prompt_template="{Title}")
    rows = output(out).sort("row")
    made = rows.filter(pl.col("status") == "succeeded")
    expected = ["TEE-S", "TEE-M", "MUG"] if per == "variant" else ["TEE-S", "MUG"]
    assert made["Variant SKU"].to_list() == expected
    assert "Duplicate" not in " ".join(made["prompt"].to_list())
    rejected = rows.filter(pl.col("status") == "rejected")
    assert rejected["row"].to_list() == [4, 5]
    # Row 4 starts on line 6: the Body (HTML) of row 1 spans two lines.
    assert rejected["reason"][0] == (
        "shop.csv row 4 (line 6), column Handle: 'tee' comes back after other products' "
        "lines; its product is on rows 1-2 and a product's lines must come together, so "
        "this line is not used (give it its own Handle if it is another product, or move "
        "it up to its product)"
    )
    assert rejected["reason"][1].startswith("shop.csv row 5 (line 7), column Handle: 'tee'")
    assert summary.counts["rejected"] == 2


def test_input_columns_named_like_ours_in_another_case_are_renamed(
    tmp_path: Path, sim: SimServer
) -> None:
    """A CSV's Status, Row and Key beside our status, row and key: DuckDB, Spark, BigQuery
    and Power Query compare column names without case and refuse or mix such a file."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt,Status,Row,Key,Prompt Notes\nm1,a red mug,active,7,A-1,glossy\n",
        encoding="utf-8",
    )
    run(manifest, tmp_path / "out", sim)
    rows = output(tmp_path / "out")
    assert len({name.casefold() for name in rows.columns}) == len(rows.columns)
    assert rows.select("status", "input_Status", "input_Row", "input_Key").row(0) == (
        "succeeded",
        "active",
        "7",
        "A-1",
    )
    assert rows["row"].to_list() == [1] and rows["Prompt Notes"].to_list() == ["glossy"]


def test_report_tiles_of_woocommerce_variations_show_attributes_and_price(
    tmp_path: Path, sim: SimServer
) -> None:
    """Without --report-columns a WooCommerce variation's tile showed ``Type variation``
    and ``Published 1`` (the export's bookkeeping, padding the four labels) rather than
    its price; a Shopify variant's tile its options but not its SKU or price."""
    template = "{Name}, {Attribute 1 value(s)|assorted colours}"
    run(WOO, tmp_path / "woo", sim, catalog="woocommerce", per="variant", prompt_template=template)
    page = (tmp_path / "woo" / "report.html").read_text(encoding="utf-8")
    assert "Type variation" not in page and "Published 1" not in page
    assert "Attribute 1 value(s) Red" in page and "Regular price 20" in page

    shop = tmp_path / "shop"
    run(SHOPIFY, shop, sim, catalog="shopify", per="variant", prompt_template=SHOP_TEMPLATE,
        vary=["style=studio,loft"])  # fmt: skip
    page = (shop / "report.html").read_text(encoding="utf-8")
    assert "Variant SKU TEE-RED-M" in page and "Variant Price 30.00" in page
    # The Title is on a product's first line only; every variant's heading names it.
    assert page.count("Red Sports Tee · red-sports-tee") == 3
