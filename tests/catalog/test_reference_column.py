"""Any column can be the reference; a reference that cannot be fetched now is not a verdict.

An image server on 127.0.0.1 stands in for the shop's CDN: it answers 503 until the test
lets it serve the image, as a CDN having a bad minute does.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from catalog_helpers import ImageHost, klein, output, run
from PIL import Image

from pipeline.run import RunOptions
from pipeline.sim import SimServer
from pipeline.summary import RunSummary


class _Cdn(ImageHost):
    """A tiny image server on an ephemeral port, in its own thread."""

    def __init__(self) -> None:
        super().__init__()
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (30, 120, 200)).save(buffer, "PNG")
        self.image = buffer.getvalue()
        self.healthy = False
        self.requests = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if not self.healthy:
            return web.Response(status=503, text="busy")
        return web.Response(body=self.image, content_type="image/png")


@pytest.fixture
def cdn() -> Iterator[_Cdn]:
    with _Cdn() as server:
        yield server


def _run(manifest: Path, out: Path, sim: SimServer, **kwargs: object) -> RunSummary:
    # The CDN stand-in is on 127.0.0.1, over plain http.
    options = RunOptions(allow_private_urls=True, allow_http=True)
    return run(manifest, out, sim, options=options, **kwargs)


def _catalog(tmp_path: Path, cdn: _Cdn) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text(
        "sku,title,Image Src\n"
        f"mug,Blue mug,{cdn.url}/mug.png\n"
        "cup,Blue cup,ftp://example.com/cup.png\n"
        "jar,Glass jar,\n",
        encoding="utf-8",
    )
    return path


def test_unreachable_is_failed_and_retried_malformed_is_rejected(
    tmp_path: Path, sim: SimServer, cdn: _Cdn
) -> None:
    manifest = _catalog(tmp_path, cdn)
    out = tmp_path / "out"
    _run(manifest, out, sim, prompt_template="{title}", reference_column="Image Src")
    rows = output(out).sort("row")
    assert rows["status"].to_list() == ["failed", "rejected", "succeeded"]
    assert rows["reason"][0] == (
        f"catalog.csv row 1, column Image Src: URL {cdn.url}/mug.png answered HTTP 503; "
        "expected 200 with an image; --retry-failed tries again, --missing-reference "
        "text-only generates from the prompt alone"
    )
    assert rows["reason"][1].startswith(
        "catalog.csv row 2, column Image Src: 'ftp://example.com/cup.png' is not allowed"
    )
    # The column keeps its name and cells in the output manifest.
    assert rows["Image Src"][0] == f"{cdn.url}/mug.png"
    cdn.healthy = True
    _run(manifest, out, sim, prompt_template="{title}", reference_column="Image Src")
    assert output(out).sort("row")["status"].to_list()[0] == "failed"  # not without asking
    _run(
        manifest,
        out,
        sim,
        prompt_template="{title}",
        reference_column="Image Src",
        retry_failed=True,
    )
    again = output(out).sort("row")
    assert again["status"].to_list() == ["succeeded", "rejected", "succeeded"]
    assert len(again["reference_digests"][0]) == 1 and again["reason"][0] is None


def test_text_only_generates_without_the_reference_and_says_so(
    tmp_path: Path, sim: SimServer, cdn: _Cdn
) -> None:
    manifest = _catalog(tmp_path, cdn)
    out = tmp_path / "out"
    summary = _run(
        manifest,
        out,
        sim,
        prompt_template="{title}",
        reference_column="Image Src",
        missing_reference="text-only",
    )
    rows = output(out).sort("row")
    assert rows["status"].to_list() == ["succeeded", "rejected", "succeeded"]
    assert rows["reference_digests"][0].to_list() == []
    assert rows["reason"][0].startswith(
        f"generated from the prompt alone: catalog.csv row 1, column Image Src: URL "
        f"{cdn.url}/mug.png answered HTTP 503"
    )
    assert summary.counts["rejected"] == 1


def test_reference_column_and_input_image_cannot_both_be_the_reference(
    tmp_path: Path, sim: SimServer
) -> None:
    manifest = tmp_path / "both.csv"
    manifest.write_text("prompt,input_image,photo\na mug,a.png,b.png\n", encoding="utf-8")
    with pytest.raises(Exception, match="also taken from column 'photo'"):
        _run(manifest, tmp_path / "out", sim, reference_column="photo")


def test_validate_and_run_agree_on_urls_and_both_can_allow_an_internal_server(
    tmp_path: Path, cdn: _Cdn
) -> None:
    """A plain-http URL or a host written as a private address is refused by the run;
    ``validate`` (which fetches nothing) refused neither, so it promised rows the run then
    rejected. Both now refuse them with the run's message, and both take the flags that
    let a run fetch from an image server inside the network (here 127.0.0.1, over http)."""
    cdn.healthy = True
    manifest = tmp_path / "urls.csv"
    manifest.write_text(
        "id,prompt,input_image\n"
        f"a,red mug,{cdn.url}/a.png\n"
        "b,blue mug,https://10.0.0.5/b.png\n"
        "c,green mug,https://[::1]/c.png\n",
        encoding="utf-8",
    )
    checked = klein("validate", str(manifest))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "valid       0" in checked.stdout and "rejected    3" in checked.stdout
    assert "uses plain http; expected https:// (allow plain http with --allow-http-" in (
        checked.stdout
    )
    assert "host '10.0.0.5' resolves to 10.0.0.5, a private" in checked.stdout
    ran = klein("run", str(manifest), "--sim", "--out", str(tmp_path / "refused"))
    assert ran.returncode == 1, ran.stdout + ran.stderr
    refused = output(tmp_path / "refused").sort("row")
    assert refused["status"].to_list() == ["rejected"] * 3
    assert cdn.requests == 0

    allow = ["--allow-http-references", "--allow-private-references"]
    only_a = tmp_path / "a.csv"
    only_a.write_text(f"id,prompt,input_image\na,red mug,{cdn.url}/a.png\n", encoding="utf-8")
    checked = klein("validate", str(only_a), *allow)
    assert checked.returncode == 0 and "valid       1" in checked.stdout, checked.stdout
    ran = klein("run", str(only_a), "--sim", "--out", str(tmp_path / "allowed"), *allow)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    made = output(tmp_path / "allowed")
    assert made["status"].to_list() == ["succeeded"]
    assert len(made["reference_digests"][0]) == 1
    assert cdn.requests == 1


def test_a_list_column_taken_as_the_reference_is_refused_by_name_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A PIM dump's photos as a list per product, taken with ``--reference-column``: the
    column's type was checked only under a known name, so the run crashed casting the list
    to text ("internal error ... a bug"). It is refused as a file problem, naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "pim.parquet"
    photos = pa.array([["https://cdn.example.com/a.jpg"], []], pa.list_(pa.string()))
    pq.write_table(
        pa.table({"id": [1, 2], "prompt": ["a mug", "a bag"], "images": photos}), manifest
    )
    for command in ("validate", "run"):
        args = [command, str(manifest), "--reference-column", "images"]
        if command == "run":
            args += ["--sim", "--out", str(tmp_path / "out")]
        done = klein(*args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr
        assert "column 'images' (taken as input_image) has type List(String)" in done.stderr
        assert "input_image_2 .. input_image_4" in done.stderr


def test_a_manifest_without_references_but_with_a_photo_column_says_so(
    tmp_path: Path, sim: SimServer
) -> None:
    """A data team's table with its product photos in ``image_url``: every image would be
    made from its prompt alone, the photos unseen, and the run look as it should. A note
    says so, and how to send them; none once the column is read as the reference."""
    manifest = tmp_path / "table.csv"
    manifest.write_text("id,prompt,image_url\nm1,a mug,https://cdn.example.com/m1.jpg\n")
    summary = run(manifest, tmp_path / "out", sim)
    assert summary.counts["succeeded"] == 1
    (note,) = [n for n in summary.notices if "image_url" in n]
    assert "every image is made from its prompt alone" in note
    assert "--reference-column 'image_url'" in note
    checked = klein("validate", str(manifest))
    assert "note: table.csv: no reference image column" in checked.stdout
    with_it = tmp_path / "with.csv"
    with_it.write_text("id,prompt,input_image,image_url\nm1,a mug,,https://x.test/m1.jpg\n")
    assert not [n for n in run(with_it, tmp_path / "out2", sim).notices if "image_url" in n]
