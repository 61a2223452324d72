"""Images back to the shop: a run of a shop's export, then the shop's own import file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from catalog_helpers import klein, run

from pipeline.errors import ConfigError
from pipeline.output_manifest import read_output_manifest
from pipeline.shop_export import build_export
from pipeline.sim import SimServer
from pipeline.storage import LocalSink

EXPORTS = Path(__file__).resolve().parents[1] / "data" / "exports"
CDN = "https://cdn.example.com/nightly"


def _rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def test_shopify_import_file_per_product_with_variations(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    run(
        EXPORTS / "shopify_products.csv",
        out,
        sim,
        catalog="shopify",
        prompt_template="{Title}, {style}",
        vary=["style=studio,loft"],
    )
    result = klein(
        "export",
        str(out),
        "--catalog",
        "shopify",
        "--image-base-url",
        CDN,
        "--alt-template",
        "{Title} ({style})",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"wrote {out / 'export' / 'shopify-images.csv'}: 10 images for shopify"
    )
    lines = _rows((out / "export" / "shopify-images.csv").read_bytes())
    assert list(lines[0]) == ["Handle", "Image Src", "Image Position", "Image Alt Text"]
    assert lines[:2] == [
        {
            "Handle": "clay-plant-pot",
            "Image Src": f"{CDN}/images/clay-plant-pot--studio.jpg",
            "Image Position": "1",
            "Image Alt Text": "Clay Plant Pot (studio)",
        },
        {
            "Handle": "clay-plant-pot",
            "Image Src": f"{CDN}/images/clay-plant-pot--loft.jpg",
            "Image Position": "2",
            "Image Alt Text": "Clay Plant Pot (loft)",
        },
    ]
    # Every image points at a file the run stored under that name.
    for line in lines:
        assert (out / "images" / line["Image Src"].rsplit("/", 1)[1]).is_file()


async def test_per_variant_runs_set_each_variants_image(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    run(EXPORTS / "shopify_products.csv", out, sim, catalog="shopify", per="variant",
        prompt_template="{Title} {Option1 Value?}")  # fmt: skip
    manifest = await read_output_manifest(LocalSink(out))
    made = build_export(manifest, "shopify", image_base_url=CDN)
    lines = _rows(made.data)
    tee = [line for line in lines if line["Handle"] == "red-sports-tee"]
    assert [(t["Option1 Value"], t["Variant SKU"], t["Image Position"]) for t in tee] == [
        ("S", "TEE-RED-S", "1"),
        ("M", "TEE-RED-M", "2"),
        ("L", "TEE-RED-L", "3"),
    ]
    assert all(t["Variant Image"] == t["Image Src"] for t in tee)


async def test_woocommerce_and_plain_exports(tmp_path: Path, sim: SimServer) -> None:
    out = tmp_path / "out"
    run(EXPORTS / "woocommerce_products.csv", out, sim, catalog="woocommerce",
        per="variant", prompt_template="{Name}")  # fmt: skip
    manifest = await read_output_manifest(LocalSink(out))
    woo = _rows(build_export(manifest, "woocommerce", image_base_url=CDN).data)
    assert woo[0] == {
        "ID": "45",
        "SKU": "woo-vneck-tee-red",
        "Images": f"{CDN}/images/woo-vneck-tee-red.jpg",
    }
    assert len(woo) == 7
    plain = json.loads(build_export(manifest, "json", image_base_url=None, columns=["SKU"]).data)
    assert plain[0]["image_url"] == str(out.resolve() / "images" / "woo-vneck-tee-red.jpg")
    assert plain[0]["SKU"] == "woo-vneck-tee-red" and plain[0]["alt_text"] == (
        "V-Neck T-Shirt - Red"
    )
    with pytest.raises(ConfigError, match="needs --image-base-url URL"):
        build_export(manifest, "shopify", image_base_url=None)
    with pytest.raises(ConfigError, match="has no Handle column"):
        build_export(manifest, "shopify", image_base_url=CDN)


async def test_shopify_import_file_keeps_default_title_and_alt_text_reads_the_product(
    tmp_path: Path, sim: SimServer
) -> None:
    """A product without options is one variant Shopify knows by ``Default Title``: the
    import file wrote an empty Option1 Value for it. And an alt text ``{Title}`` names the
    product on every variant's image, though the manifest keeps Title on its first line."""
    out = tmp_path / "out"
    run(EXPORTS / "shopify_products.csv", out, sim, catalog="shopify", per="variant",
        prompt_template="{Title} {Option1 Value?}")  # fmt: skip
    manifest = await read_output_manifest(LocalSink(out))
    made = build_export(
        manifest, "shopify", image_base_url=CDN, alt_template="{Title} {Option1 Value?}"
    )
    lines = {line["Variant SKU"]: line for line in _rows(made.data) if line["Variant SKU"]}
    assert lines["PICK-1"]["Option1 Value"] == "Default Title"
    assert lines["LIGHT-CU"]["Option1 Value"] == "Default Title"
    assert lines["TEE-RED-M"]["Option1 Value"] == "M"
    # Filled down for the alt text; the placeholder is no option there either.
    assert lines["TEE-RED-M"]["Image Alt Text"] == "Red Sports Tee M"
    assert lines["PICK-1"]["Image Alt Text"] == "Guitar Pick"
