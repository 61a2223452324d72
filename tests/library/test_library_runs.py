"""The library across runs, against the real simulator: a night pays only for what changed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from library_helpers import check_library, library_images, open_library
from pipeline_helpers import (
    SIM_KEY,
    check_output,
    fast_options,
    key_stats,
    run_against,
    write_catalog,
)

from flows.shards import ShardSink, shard_folder
from pipeline.check import check_manifest
from pipeline.contract import cost_credits, output_size
from pipeline.errors import StorageError
from pipeline.keys import key_shard
from pipeline.library import Library, object_relpath
from pipeline.manifest import Defaults
from pipeline.run import arun_manifest
from pipeline.sim import SimServer
from pipeline.storage import LocalSink, open_sink

REPO = Path(__file__).resolve().parents[2]


def accepted(server: SimServer) -> int:
    return int(key_stats(server)["submits_accepted"])


def night(server: SimServer, manifest: Path, out: Path, library: Path) -> pl.DataFrame:
    summary = run_against(server, manifest, out, options=fast_options(library=str(library)))
    return check_output(out, summary.total_rows, summary)


def test_an_unchanged_catalog_is_copied_and_a_changed_row_is_sent(
    sim: SimServer, tmp_path: Path
) -> None:
    library = tmp_path / "library"
    manifest = write_catalog(tmp_path, 30)
    first = night(sim, manifest, tmp_path / "2026-12-01", library)
    assert accepted(sim) == 30
    assert first["reused_from"].null_count() == 30
    assert check_library(library) == 30

    second = night(sim, manifest, tmp_path / "2026-12-02", library)
    assert accepted(sim) == 30, "an unchanged night sent submits"
    page = (tmp_path / "2026-12-02" / "report.html").read_text(encoding="utf-8")
    assert "<b>30</b>from the library" in page
    assert second["status"].to_list() == ["succeeded"] * 30
    assert second["cost_credits"].sum() == 0
    assert second["task_id"].null_count() == 30
    assert second["sha256"].to_list() == first["sha256"].to_list()
    for record in second.iter_rows(named=True):
        source = Path(record["reused_from"])
        assert source.is_relative_to(library.resolve() / "objects")
        # One disk: the output's image is a hard link of the library's, no second copy.
        assert Path(record["output_uri"]).stat().st_ino == source.stat().st_ino

    prompts = [f"studio photo of mug {i}" for i in range(30)]
    changed = {3, 17, 29}
    for i in changed:
        prompts[i] = f"studio photo of mug {i}, now in blue"
    edited = write_catalog(tmp_path / "edited", 30, prompt=prompts)
    third = night(sim, edited, tmp_path / "2026-12-03", library)
    assert accepted(sim) == 33, "exactly the changed rows are sent"
    sent = third.filter(pl.col("reused_from").is_null())["row"].to_list()
    assert sent == sorted(i + 1 for i in changed)
    assert third.filter(pl.col("reused_from").is_null())["cost_credits"].min() > 0
    assert check_library(library) == 33


def test_rows_of_one_run_with_one_fingerprint_pay_once(sim: SimServer, tmp_path: Path) -> None:
    # Five ids asking for the same image (same prompt, same explicit seed).
    manifest = write_catalog(tmp_path, 5, prompt=["one mug"] * 5, extra={"seed": ["7"] * 5})
    out = night(sim, manifest, tmp_path / "out", tmp_path / "library")
    assert accepted(sim) == 1
    assert key_stats(sim)["duplicate_submits"] == 0
    assert out["status"].to_list() == ["succeeded"] * 5
    assert out["reused_from"].null_count() == 1
    assert out["cost_credits"].sum() == out["cost_credits"].max() > 0
    assert len(set(out["sha256"].to_list())) == 1


def test_without_a_library_nothing_is_shared(sim: SimServer, tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path, 4, prompt=["one mug"] * 4, extra={"seed": ["7"] * 4})
    summary = run_against(sim, manifest, tmp_path / "out")
    frame = check_output(tmp_path / "out", 4, summary)
    assert accepted(sim) == 4
    assert frame["reused_from"].null_count() == 4


def test_the_object_is_the_truth_when_the_index_disagrees(sim: SimServer, tmp_path: Path) -> None:
    library = tmp_path / "library"
    manifest = write_catalog(tmp_path, 6)
    first = night(sim, manifest, tmp_path / "n1", library)
    # An image deleted behind the index's back: that row is generated again, not failed.
    gone = Path(first["output_uri"][2]).name
    lib = open_library(library)
    fp = Path(_object_of(library, first["sha256"][2])).stem
    (library / object_relpath(fp, "jpeg")).unlink()
    second = night(sim, manifest, tmp_path / "n2", library)
    assert accepted(sim) == 7
    assert second.filter(pl.col("reused_from").is_null())["output_uri"].to_list()[0].endswith(gone)
    assert (library / object_relpath(fp, "jpeg")).exists()
    assert len(lib) == 6

    # Images whose index entries were never written (a run killed before its segment):
    # compaction finds them from their objects and records, and drops entries without one.
    for segment in (library / "index").rglob("*.parquet"):
        segment.unlink()
    (library / object_relpath(_object_of(library, first["sha256"][0]), "jpeg")).unlink()
    assert len(open_library(library)) == 0

    async def reconcile() -> int:
        opened = await Library.open(str(library), dialect="klein")
        return sum([await opened.compact(prefix) for prefix in "0123456789abcdef"])

    assert asyncio.run(reconcile()) == 5
    assert len(open_library(library)) == 5
    check_library(library)


def _object_of(library: Path, sha256: str) -> str:
    """The fingerprint of the library image with these bytes."""
    import hashlib

    for image in library_images(library):
        if hashlib.sha256(image.read_bytes()).hexdigest() == sha256:
            return image.stem
    raise AssertionError(f"no library image with sha256 {sha256}")


def test_a_dry_run_counts_what_the_library_holds(sim: SimServer, tmp_path: Path) -> None:
    library = tmp_path / "library"
    night(sim, write_catalog(tmp_path, 10), tmp_path / "n1", library)
    prompts = [f"studio photo of mug {i}" for i in range(12)]
    prompts[4] = "a new mug"
    prompts[11] = prompts[10]  # rows 11 and 12 ask for one image: paid once
    edited = write_catalog(tmp_path / "edited", 12, prompt=prompts, extra={"seed": ["5"] * 12})
    plain = write_catalog(tmp_path / "plain", 12, prompt=prompts)

    report = check_manifest(plain, defaults=Defaults(), library=open_library(library))
    # Ids keep their derived seeds: 9 unchanged rows are in the library, 3 are new.
    assert report.library_hits == 9
    assert report.to_send == 3
    assert report.estimated_credits == round(3 * cost_credits(*output_size("square_1_1", "1k")), 2)
    assert "in library  9" in report.render()
    # An explicit seed makes every row a new request, but rows 11 and 12 are one.
    again = check_manifest(edited, defaults=Defaults(), library=open_library(library))
    assert (again.library_hits, again.to_send) == (1, 11)
    before = accepted(sim)
    run_against(sim, plain, tmp_path / "n2", options=fast_options(library=str(library)))
    assert accepted(sim) - before == report.to_send


_WRITER = """
import asyncio, sys
from pipeline.run import RunOptions, arun_manifest
manifest, out, library, url, key = sys.argv[1:]
options = RunOptions(library=library, expected_latency_s=0.05, progress_interval_s=0.05)
summary = asyncio.run(arun_manifest(manifest, out, api_url=url, api_key=key, options=options))
print(summary.counts["succeeded"], summary.submits)
"""


def test_two_runs_writing_one_library_at_once(sim: SimServer, tmp_path: Path) -> None:
    library = tmp_path / "library"
    # Two catalogs sharing 20 of their 40 images each, run at the same time. An explicit
    # seed makes an image's fingerprint depend on its prompt alone, not on its row's id.
    shared = [f"shared mug {i}" for i in range(20)]
    only_a = [f"a mug {i}" for i in range(20)]
    only_b = [f"b mug {i}" for i in range(20)]
    seeds = {"seed": ["1"] * 40}
    a = write_catalog(tmp_path / "a", 40, prompt=shared + only_a, extra=seeds)
    b = write_catalog(tmp_path / "b", 40, prompt=only_b + shared, extra=seeds)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(manifest),
                str(tmp_path / f"out-{manifest.parent.name}"),
                str(library),
                sim.url,
                SIM_KEY,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for manifest in (a, b)
    ]
    for writer in writers:
        stdout, stderr = writer.communicate(timeout=240)
        assert writer.returncode == 0, stderr[-2000:]
        assert stdout.split()[0] == "40"
    # Each fingerprint paid once: a run wanting one the other is making waits for its
    # image (the library's claim) instead of paying for it again.
    assert accepted(sim) == 60
    assert check_library(library) == 60
    both = write_catalog(
        tmp_path / "both", 60, prompt=shared + only_a + only_b, extra={"seed": ["1"] * 60}
    )
    before = accepted(sim)
    summary = run_against(
        sim, both, tmp_path / "out-both", options=fast_options(library=str(library))
    )
    assert summary.reused_rows == 60
    assert accepted(sim) == before


def test_two_shards_running_at_once_pay_once_per_fingerprint(
    sim: SimServer, tmp_path: Path
) -> None:
    """A flow's shards run at the same moment on one library: identical requests in two
    shards are paid for once (one shard makes each image, the other copies it)."""
    twins = 6
    candidates = [f"twin-{n:03d}" for n in range(200)]
    ids = [k for k in candidates if key_shard(k, 2) == 0][:twins]
    ids += [k for k in candidates if key_shard(k, 2) == 1][:twins]
    prompts = [f"twin mug {i}" for i in range(twins)] * 2
    manifest = write_catalog(
        tmp_path, 2 * twins, prompt=prompts, extra={"id": ids, "seed": ["7"] * (2 * twins)}
    )
    out = open_sink(tmp_path / "out")

    async def both() -> list[object]:
        return await asyncio.gather(
            *(
                arun_manifest(
                    manifest,
                    ShardSink(out, shard_folder(n)),
                    api_url=sim.url,
                    api_key=SIM_KEY,
                    options=fast_options(library=str(tmp_path / "library"), shard=(n, 2)),
                )
                for n in range(2)
            )
        )

    summaries = asyncio.run(both())
    assert [s.counts["succeeded"] for s in summaries] == [twins, twins]  # type: ignore[attr-defined]
    assert sum(s.reused_rows for s in summaries) == twins  # type: ignore[attr-defined]
    assert accepted(sim) == twins
    assert check_library(tmp_path / "library") == twins


def test_images_missing_from_the_index_are_found_by_their_records(
    sim: SimServer, tmp_path: Path
) -> None:
    # A run killed before it wrote its index segments, or one that added images after this
    # run read the index: the images and records are there, the index does not list them.
    library = tmp_path / "library"
    manifest = write_catalog(tmp_path, 8)
    night(sim, manifest, tmp_path / "n1", library)
    for segment in (library / "index").rglob("*.parquet"):
        segment.unlink()
    assert len(open_library(library)) == 0
    second = night(sim, manifest, tmp_path / "n2", library)
    assert accepted(sim) == 8, "images the index missed were paid for again"
    assert second["reused_from"].null_count() == 0
    # ...and that run indexed them again.
    assert len(open_library(library)) == 8
    check_library(library)


def test_a_claim_freed_by_a_finished_maker_between_two_looks_is_not_paid_again(
    tmp_path: Path,
) -> None:
    """The waiter looks for the image's record, finds none; the maker records its image and
    drops its claim; the waiter then finds no claim. It takes the claim, and must see the
    record the maker left instead of making (paying for) the image again: this interleaving
    cost one image twice in two runs sharing a library on a loaded machine."""
    from pipeline.library import Entry, claim_relpath, object_relpath, record_relpath

    root = tmp_path / "library"
    fp = "ab" + "0" * 62

    async def scenario() -> tuple[bool, bool]:
        library = await Library.open(str(root), dialect="klein")
        claim = root / claim_relpath(fp)
        claim.parent.mkdir(parents=True, exist_ok=True)
        claim.write_text('{"host": "elsewhere", "pid": 1, "renewed_at": 9e99}')
        record = Entry(fingerprint=fp, format="jpeg", bytes=1, sha256="0" * 64, width=1, height=1)
        real_holder = library._claim_holder

        async def maker_finishes_between_the_looks(asked: str) -> object:
            # The maker's last steps (image, record, claim dropped), right after the waiter
            # found no record.
            image = root / object_relpath(fp, "jpeg")
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"\xff")
            (root / record_relpath(fp)).write_bytes(record.to_json())
            claim.unlink()
            return await real_holder(asked)

        library._claim_holder = maker_finishes_between_the_looks  # type: ignore[method-assign]
        makes = await library.claim_shared(fp)
        return makes, claim.exists()

    makes, claim_left = asyncio.run(scenario())
    assert makes is False  # copy the maker's image; nothing paid again
    assert not claim_left  # the claim taken to look again is given back


def test_rows_a_stopped_night_left_in_flight_join_the_library_when_collected(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A night stopped with tasks acknowledged (a worker lost, a kill, a full disk) is
    finished by a rerun that polls them; their images never reached the library, so the
    next unchanged night paid for each of them again."""
    library = tmp_path / "library"
    manifest = write_catalog(tmp_path, 24)
    out = tmp_path / "2026-12-01"
    real_put = LocalSink.put
    stored = 0

    async def put_until_the_disk_fills(self: LocalSink, relpath: str, data: bytes, kind: str):
        nonlocal stored
        if relpath.startswith("images/"):
            stored += 1
            if stored > 6:
                raise StorageError(f"cannot write {relpath}: No space left on device")
        return await real_put(self, relpath, data, kind)

    monkeypatch.setattr(LocalSink, "put", put_until_the_disk_fills)
    with pytest.raises(StorageError):
        run_against(sim, manifest, out, options=fast_options(library=str(library)))
    monkeypatch.undo()
    paid = accepted(sim)
    assert 6 < paid <= 24

    night(sim, manifest, out, library)  # the rerun polls what was in flight
    assert check_library(library) == 24

    night(sim, manifest, tmp_path / "2026-12-02", library)
    assert accepted(sim) == 24, "the next unchanged night paid again"
