"""LocalSink and open_sink: contained, atomic writes on a real filesystem."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.storage import INLINE_WRITE_LIMIT, LocalSink, Sink, open_sink


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


async def test_put_get_exists_round_trip(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "out")
    assert isinstance(sink, Sink)
    uri = await sink.put("images/a/b/key-1.jpg", b"\xff\xd8jpeg", "image/jpeg")
    target = tmp_path / "out" / "images" / "a" / "b" / "key-1.jpg"
    assert uri == str(target.resolve()) == sink.uri("images/a/b/key-1.jpg")
    assert target.read_bytes() == b"\xff\xd8jpeg"
    assert await sink.get("images/a/b/key-1.jpg") == b"\xff\xd8jpeg"
    assert await sink.exists("images/a/b/key-1.jpg")
    assert not await sink.exists("images/none.jpg")
    assert await sink.get("images/none.jpg") is None
    assert sink.local_path("images/a/b/key-1.jpg") == target.resolve()
    assert _leftovers(tmp_path) == []


async def test_large_writes_and_put_file(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "out")
    big = os.urandom(INLINE_WRITE_LIMIT * 3 + 17)
    await sink.put("big.bin", big, "application/octet-stream")
    assert await sink.get("big.bin") == big
    source = tmp_path / "local.parquet"
    source.write_bytes(big[:5000])
    uri = await sink.put_file("nested/manifest.parquet", source, "application/vnd.apache.parquet")
    assert await sink.get("nested/manifest.parquet") == big[:5000]
    assert uri == sink.uri("nested/manifest.parquet")
    assert source.exists()  # the caller's file is copied, not taken
    assert _leftovers(tmp_path) == []


async def test_written_files_get_the_mode_any_new_file_gets(tmp_path: Path) -> None:
    """Outputs are for others to read (a web server, a teammate): not mkstemp's 0600."""
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"made by open()")
    expected = stat.S_IMODE(plain.stat().st_mode)
    sink = LocalSink(tmp_path / "out")
    source = tmp_path / "local.parquet"
    source.write_bytes(b"PAR1")
    await sink.put("images/a.jpg", b"\xff\xd8small", "image/jpeg")
    await sink.put("images/b.png", os.urandom(INLINE_WRITE_LIMIT + 1), "image/png")
    await sink.put_file("manifest.parquet", source, "application/vnd.apache.parquet")
    for relpath in ("images/a.jpg", "images/b.png", "manifest.parquet"):
        mode = stat.S_IMODE((tmp_path / "out" / relpath).stat().st_mode)
        assert mode == expected, (relpath, oct(mode), oct(expected))


@pytest.mark.parametrize(
    "relpath",
    [
        "../escape.jpg",
        "images/../../escape.jpg",
        "/etc/passwd",
        "~/x.jpg",
        "",
        ".",
        "images/..",
        "a\x00b",
    ],
)
async def test_paths_outside_the_root_are_refused(tmp_path: Path, relpath: str) -> None:
    sink = LocalSink(tmp_path / "out")
    with pytest.raises(ValueError, match="invalid output path"):
        await sink.put(relpath, b"x", "image/jpeg")
    with pytest.raises(ValueError, match="invalid output path"):
        sink.uri(relpath)
    assert _names(tmp_path) == ["out"]


async def test_symlinks_cannot_lead_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sink = LocalSink(tmp_path / "out")
    (tmp_path / "out" / "images").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the output folder"):
        await sink.put("images/key.jpg", b"x", "image/jpeg")
    assert list(outside.iterdir()) == []


async def test_normalised_paths_inside_the_root_are_fine(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "out")
    uri = await sink.put("images/./tmp/../key.jpg", b"x", "image/jpeg")
    assert uri == str((tmp_path / "out" / "images" / "key.jpg").resolve())


async def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "out")
    await sink.put("manifest.parquet", b"old", "application/octet-stream")
    with pytest.raises(FileNotFoundError):
        await sink.put_file("manifest.parquet", tmp_path / "missing", "application/x")
    assert await sink.get("manifest.parquet") == b"old"
    assert _leftovers(tmp_path) == []


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "out")
    versions = [bytes([n]) * (200_000 + n * 5_000) for n in range(2)]
    target = sink.local_path("images/key.png")
    assert target is not None
    sink._write_atomic(target, versions[0], None)
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(target.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            sink._write_atomic(target, versions[i % 2], None)
    finally:
        stop.set()
        reader.join()
    assert seen
    assert all(data in versions for data in seen)


def test_open_sink_dispatch(tmp_path: Path) -> None:
    as_text = open_sink(str(tmp_path / "a"))
    as_path = open_sink(tmp_path / "b")
    as_uri = open_sink((tmp_path / "c d").as_uri())
    assert isinstance(as_text, LocalSink) and as_text.root == (tmp_path / "a").resolve()
    assert isinstance(as_path, LocalSink) and as_path.root == (tmp_path / "b").resolve()
    assert isinstance(as_uri, LocalSink) and as_uri.root == (tmp_path / "c d").resolve()
    assert (tmp_path / "c d").is_dir()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://Bad_Bucket/prefix", "not a valid bucket name"),
        ("gs://bucket/prefix", "unsupported scheme 'gs'"),
        ("file://example.com/x", "not host 'example.com'"),
        ("   ", "no output given"),
    ],
)
def test_open_sink_refusals_are_clear(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_sink(uri)


def test_an_existing_file_is_not_a_destination(tmp_path: Path) -> None:
    existing = tmp_path / "out.csv"
    existing.write_text("x")
    with pytest.raises(ConfigError, match="is a file; expected a folder"):
        open_sink(existing)
