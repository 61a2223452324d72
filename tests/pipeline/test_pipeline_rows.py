"""Bad rows and references of every kind in one manifest: bad rows are rejected with a
reason naming file, row and column, while every valid row still runs."""

from __future__ import annotations

import base64
import csv
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from pipeline_helpers import check_output, fast_options, key_stats, run_against

from pipeline.sim import SimServer


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buffer, "PNG")
    return buffer.getvalue()


RED = png((200, 30, 30))
BLUE = png((30, 30, 200))


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {"/red.png": RED, "/blue.png": BLUE}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["id", "prompt", "aspect_ratio", "seed", "input_image", "input_image_2", "sku"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({name: row.get(name, "") for name in columns})
    return path


def test_bad_rows_are_rejected_and_every_reference_kind_works(
    sim: SimServer, image_server: str, tmp_path: Path
) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "red.png").write_bytes(RED)
    (refs / "broken.png").write_bytes(RED[:40])
    b64 = base64.b64encode(RED).decode()
    rows = [
        {"id": "path", "prompt": "mug", "input_image": "refs/red.png"},
        {"id": "data-uri", "prompt": "mug", "input_image": f"data:image/png;base64,{b64}"},
        {"id": "raw-b64", "prompt": "mug", "input_image": b64},
        {"id": "url", "prompt": "mug", "input_image": f"{image_server}/red.png"},
        {"id": "bad-seed", "prompt": "mug", "seed": "-3"},
        {"id": "bad-preset", "prompt": "mug", "aspect_ratio": "square_9_9"},
        {"id": "no-prompt", "prompt": ""},
        {"id": "path", "prompt": "mug again"},
        {"id": "broken-file", "prompt": "mug", "input_image": "refs/broken.png"},
        {"id": "url-404", "prompt": "mug", "input_image": f"{image_server}/gone.png"},
        {"id": "bad-b64", "prompt": "mug", "input_image_2": "data:image/png;base64,!!!!"},
        {"id": "two", "prompt": "mug", "input_image": "refs/red.png",
         "input_image_2": f"{image_server}/blue.png"},
    ]  # fmt: skip
    for i, row in enumerate(rows):
        row["sku"] = f"S{i}"
    manifest = write_rows(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    options = fast_options(allow_http=True, allow_private_urls=True)

    summary = run_against(sim, manifest, out, options=options)

    table = check_output(out, len(rows), summary)
    assert table["sku"].to_list() == [f"S{i}" for i in range(len(rows))]
    by_row = {record["row"]: record for record in table.iter_rows(named=True)}
    ok_rows = {1, 2, 3, 4, 12}
    assert {r for r, rec in by_row.items() if rec["status"] == "succeeded"} == ok_rows
    # A URL that answers 404 now may answer tomorrow: failed (--retry-failed), not rejected.
    assert {r for r, rec in by_row.items() if rec["status"] == "failed"} == {10}
    assert {r for r, rec in by_row.items() if rec["status"] == "rejected"} == (
        set(by_row) - ok_rows - {10}
    )
    expected = {
        5: "column seed",
        6: "column aspect_ratio",
        7: "column prompt",
        8: "column id",
        9: "column input_image",
        10: "column input_image",
        11: "column input_image_2",
    }
    for row, column in expected.items():
        reason = by_row[row]["reason"]
        assert reason.startswith(f"catalog.csv row {row}, {column}"), reason
    assert "repeats row 1" in by_row[8]["reason"]
    assert "HTTP 404" in by_row[10]["reason"]
    # The same picture four ways is one reference: one digest, sent as the same bytes.
    digests = {tuple(by_row[r]["reference_digests"]) for r in (1, 2, 3, 4)}
    assert len(digests) == 1
    assert len(by_row[12]["reference_digests"]) == 2
    assert by_row[12]["reference_digests"][0] == by_row[1]["reference_digests"][0]
    assert key_stats(sim)["submits_accepted"] == len(ok_rows)
    assert summary.exit_code == 1


def test_private_urls_are_refused_unless_allowed(
    sim: SimServer, image_server: str, tmp_path: Path
) -> None:
    rows = [
        {"id": "a", "prompt": "mug", "input_image": f"{image_server}/red.png"},
        {"id": "b", "prompt": "mug"},
    ]
    manifest = write_rows(tmp_path / "catalog.csv", rows)

    summary = run_against(sim, manifest, tmp_path / "out", options=fast_options(allow_http=True))

    table = check_output(tmp_path / "out", 2, summary)
    assert table["status"].to_list() == ["rejected", "succeeded"]
    reason = table["reason"][0]
    assert reason.startswith("catalog.csv row 1, column input_image:")
    assert "allow_private_urls" in reason


def test_polars_and_pyarrow_tables_in_memory(sim: SimServer, tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "id": ["a1", "a2", "a3"],
            "prompt": ["red mug", "blue mug", "green mug"],
            "seed": [1, 2, None],
            "sku": [101, 102, 103],
        }
    )
    first = run_against(sim, frame, tmp_path / "polars")
    second = run_against(sim, frame.to_arrow(), tmp_path / "arrow")

    a = check_output(tmp_path / "polars", 3, first)
    b = check_output(tmp_path / "arrow", 3, second)
    assert a["status"].to_list() == b["status"].to_list() == ["succeeded"] * 3
    assert a["sku"].to_list() == [101, 102, 103]
    # Same rows, same requests: the same images whichever table type carried them.
    assert a["sha256"].to_list() == b["sha256"].to_list()
    assert a["seed"].to_list()[:2] == [1, 2]
