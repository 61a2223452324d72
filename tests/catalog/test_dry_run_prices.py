"""``--dry-run``'s "To send" and estimate are what the run then sends and the API charges.

Two ways they were not (audit 19): rows an earlier run into the same DEST rejected for a
reference URL were counted as to send, though the rerun rejects them again and sends
nothing; and references' megapixels, which the API bills, were left out of the price.
The simulator's charged credits are the truth the estimate is held to.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from catalog_helpers import KLEIN_BATCH, ImageHost, accepted, charged, clean_env, run
from PIL import Image

from pipeline.contract import KLEIN_MODEL
from pipeline.run import RunOptions
from pipeline.sim import SimConfig, SimServer

PRICE = SimConfig().price(KLEIN_MODEL)


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


class _Images(ImageHost):
    """A shop's image host on 127.0.0.1: ``/good.png`` is a 1000 x 1000 PNG (1 MP),
    ``/bad.png`` bytes no decoder reads (the run rejects its rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.files = {"good.png": png(1000), "bad.png": b"not an image at all"}

    async def _handle(self, request: web.Request) -> web.Response:
        body = self.files.get(request.match_info["name"])
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="image/png")


@pytest.fixture
def images() -> Iterator[_Images]:
    with _Images() as server:
        yield server


def dry_run(manifest: Path, out: Path) -> str:
    done = subprocess.run(
        [
            *(KLEIN_BATCH, "run", str(manifest), "--sim", "--out", str(out), "--dry-run"),
            *("--allow-http-references", "--allow-private-references"),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


def test_rows_rejected_for_their_reference_url_are_not_counted_as_to_send(
    tmp_path: Path, sim: SimServer, images: _Images
) -> None:
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,prompt,input_image\n"
        f"a,red mug,{images.url}/good.png\n"
        f"b,blue mug,{images.url}/good.png\n"
        f"c,green mug,{images.url}/bad.png\n"
        f"d,black mug,{images.url}/bad.png\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    options = RunOptions(allow_private_urls=True, allow_http=True)
    first = run(manifest, out, sim, options=options)
    assert first.counts["succeeded"] == 2 and first.counts["rejected"] == 2

    plan = dry_run(manifest, out)

    assert "in DEST     2 done by an earlier run" in plan
    assert "retried     2 rejected by an earlier run for a reference URL" in plan
    assert "To send: 0 images" in plan
    assert "Estimated cost: 0.00 credits" in plan
    # ...which is what the rerun does: the references are still unusable, nothing is sent.
    before = accepted(sim)
    rerun = run(manifest, out, sim, options=options)
    assert accepted(sim) == before
    assert rerun.counts["rejected"] == 2


def test_url_references_are_said_to_be_left_out_of_the_estimate(
    tmp_path: Path, images: _Images
) -> None:
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        f"id,prompt,input_image\na,red mug,{images.url}/good.png\n", encoding="utf-8"
    )
    plan = dry_run(manifest, tmp_path / "out")
    assert "To send: 1 images" in plan
    # A check never fetches a URL: the estimate cannot hold its megapixels, and says so.
    assert "not included: 1 reference URL uses" in plan
    assert "0.1 credits per megapixel" in plan
    assert images.files  # (the host is up, yet a dry run sends it nothing)


def test_local_references_are_priced_by_their_megapixels_as_the_api_charges(
    tmp_path: Path, sim: SimServer
) -> None:
    (tmp_path / "ref.png").write_bytes(png(2000))  # 4 MP: 0.40 credits on each image
    manifest = tmp_path / "catalog.csv"
    manifest.write_text(
        "id,prompt,input_image\n" + "".join(f"p{i},mug {i},ref.png\n" for i in range(3)),
        encoding="utf-8",
    )
    each = round(PRICE.credits(1024, 1024, 2000 * 2000), 2)
    assert each > round(PRICE.credits(1024, 1024), 2)
    out = tmp_path / "out"

    plan = dry_run(manifest, out)

    assert f"Estimated cost: {3 * each:.2f} credits" in plan
    assert "not included" not in plan
    summary = run(manifest, out, sim)
    assert summary.counts["succeeded"] == 3
    assert charged(sim) == pytest.approx(3 * each)  # the estimate, to the cent
