"""The hostile corpus (``tests/data/hostile``) through ``klein-batch run``, as a user runs it.

Each manifest runs as a real subprocess against the bundled simulator. A file the pipeline
cannot use must stop the run before it starts with one ``error:`` line naming the file and
saying what is expected (exit 2, no traceback). A file with bad rows must run its good rows
and record each bad one as ``rejected`` with a reason naming file, row and column (exit 1).
Around all of it the file system is snapshotted: nothing may appear or change outside each
run's DEST (the test's folders, a private HOME, and the places the path tricks aim at).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

#: One worker runs the whole corpus (tests/conftest.py: ONE_WORKER_MODULES): its 37 CLI
#: runs are one module fixture, which a test on another worker would run again.
pytestmark = pytest.mark.slow(seconds=70)

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "hostile"
KLEIN_BATCH = str(Path(sys.executable).parent / "klein-batch")

#: Whole-file problems: (substrings of the one error line after "error: <file>: ").
FILE_ERRORS: dict[str, tuple[str, ...]] = {
    "empty.csv": ("the file is empty", "expected a header line"),
    "blank-lines-only.csv": ("the file is empty",),
    "header-only.csv": ("no data rows",),
    "no-prompt-column.csv": ("no 'prompt' column", "found 'id', 'description', 'seed'"),
    "pipe-delimited.csv": ("no 'prompt' column", "found 'id|prompt|seed'"),
    "utf16-without-bom.csv": ("NUL bytes", "UTF-16 without a byte-order mark"),
    "latin1.csv": ("not valid UTF-8 (line 2)", "CSV UTF-8"),
    "binary-garbage.csv": ("not valid UTF-8",),
    "duplicate-prompt-column.csv": ("'prompt' and 'Prompt' both mean 'prompt'",),
    "zip-named-csv.csv": ("Excel workbook or a zip archive", "export it as CSV"),
    "text-named-parquet.parquet": ("not a Parquet file", "does not start with PAR1"),
    "parquet-prompt-is-int.parquet": ("column prompt has type Int64; expected text",),
    "parquet-prompt-is-struct.parquet": ("column prompt has type Struct", "expected text"),
    "parquet-seed-is-list.parquet": ("column seed has type List", "expected whole numbers"),
    "parquet-no-rows.parquet": ("has no rows",),
}

#: Row problems: {row: (column or None for a row the reader could not split, substring)};
#: every row not listed must succeed.
ROW_ERRORS: dict[str, dict[int, tuple[str | None, str]]] = {
    # A column named like a working column of the pipeline (``__index``) is carried through
    # as ``input___index`` (pipeline/reserved.py), never mistaken for the pipeline's own.
    "reserved-column.csv": {},
    "utf8-bom.csv": {},
    "utf16-bom.csv": {},
    "semicolons.csv": {},
    "tabs.tsv": {},
    "crlf-and-trailing-blank-lines.csv": {},
    "control-characters.csv": {},
    "path-trick-ids.csv": {},
    "parquet-nested-extra-columns.parquet": {},
    "huge-prompt.csv": {2: ("prompt", "characters is too long; expected at most 10000")},
    "empty-prompts.csv": {2: ("prompt", "is empty"), 3: ("prompt", "is empty")},
    "invalid-base64.csv": {
        2: ("input_image", "is not valid base64"),
        3: ("input_image", "is not valid base64"),
        4: ("input_image", "is not an image Pillow can read"),
    },
    "references-not-images.csv": {
        2: ("input_image", "is not an image Pillow can read; expected a JPEG or PNG"),
        3: ("input_image", "broken or truncated image"),
        4: ("input_image", "file 'shots/missing.png' not found"),
        5: ("input_image", "is not a regular file"),
    },
    "references-outside-folder.csv": {
        2: ("input_image", "leads outside the manifest's folder"),
        3: ("input_image", "absolute path '/etc/passwd' is refused"),
        4: ("input_image", "leads outside the manifest's folder"),
        5: ("input_image", "not found"),
    },
    "references-private-urls.csv": {
        2: ("input_image", "resolves to 127.0.0.1, a private, loopback"),
        3: ("input_image", "host 'localhost' resolves to"),
        4: ("input_image", "resolves to 169.254.169.254"),
        5: ("input_image", "resolves to 10.0.0.7"),
        6: ("input_image", "resolves to ::1"),
        7: ("input_image", "uses plain http; expected https://"),
        8: ("input_image", "a private, loopback"),
    },
    "reference-schemes.csv": {
        2: ("input_image", "'file:///etc/passwd' is not allowed"),
        3: ("input_image", "'ftp://example.com/x.png' is not allowed"),
        4: ("input_image", "'gopher://127.0.0.1:6379/_INFO' is not allowed"),
        5: ("input_image", "is a data: URI but not data:image/"),
    },
    "reference-50mb.csv": {2: ("input_image", "MB; at most 10 MB is allowed")},
    "duplicate-ids.csv": {2: ("id", "key 'm1' repeats row 1")},
    "bad-seeds.csv": {
        row: ("seed", f"{value} is not allowed; expected a whole number from 0 to 4294967295")
        for row, value in [
            (2, "'-1'"),
            (3, "'1.5'"),
            (4, "'NaN'"),
            (5, "'4294967296'"),
            (6, "'1e100'"),
            (7, "'twelve'"),
            (8, "'inf'"),
        ]
    },
    "unknown-presets.csv": {
        2: ("aspect_ratio", "'square_2_2' is not allowed; expected one of square_1_1"),
        3: ("resolution", "'4k' is not allowed; expected 1k or 2k"),
        4: ("output_format", "'gif' is not allowed; expected png or jpeg"),
        5: ("safety_tolerance", "'9' is not allowed; expected a whole number from 0"),
        6: ("safety_tolerance", "'-1' is not allowed"),
    },
    "ragged-rows.csv": {
        2: (None, "(line 3): 5 fields where the header has 3"),
        3: (None, "(line 4): 1 fields where the header has 3"),
        4: (None, "opened and never closed"),
    },
    "parquet-bad-cells.parquet": {
        2: ("seed", "'NaN' is not allowed"),
        3: ("input_image", "is not an image Pillow can read"),
        4: ("prompt", "is empty"),
    },
    "parquet-int-ids-and-seeds.parquet": {
        2: ("seed", "-5 is not allowed"),
        3: ("seed", "1099511627776 is not allowed"),
    },
}

#: Where the path-trick ids would land if a key were used as a path unsanitised.
ESCAPE_TARGETS = [Path("/tmp/klein-escape"), Path("/etc/cron.d/klein")]


@dataclass(slots=True)
class Result:
    name: str
    folder: Path
    out: Path
    code: int
    stdout: str
    stderr: str


def _snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames:
            found[str((here / name).relative_to(root))] = (-1, 0)  # entries are compared
        for name in filenames:
            info = (here / name).lstat()
            found[str((here / name).relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return found


def _huge_png(path: Path) -> None:
    """A real PNG of about 50 MB (noise does not compress), made here rather than committed."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(4096, 4096, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Run every corpus manifest once (four at a time), with the file system snapshotted."""
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    home.mkdir()
    fast = root / "fast-sim.toml"
    fast.write_text("[latency]\nmedian_s = 0.05\np95_s = 0.1\n", encoding="utf-8")
    huge = root / "huge-50mb.png"
    _huge_png(huge)
    assert huge.stat().st_size > 45_000_000
    names = sorted({*FILE_ERRORS, *ROW_ERRORS})
    cases: dict[str, tuple[Path, Path]] = {}
    for name in names:
        folder = root / "cases" / name
        shutil.copytree(CORPUS, folder / "corpus", ignore=shutil.ignore_patterns("*.md"))
        # A real image just outside the manifest's folder: refused for where it is, not
        # because it is missing.
        shutil.copy(CORPUS / "shots" / "ok.png", folder / "outside.png")
        os.link(huge, folder / "corpus" / "shots" / "huge-50mb.png")
        cases[name] = (folder, folder / "out")
    outs = {out for _, out in cases.values()}
    before = _snapshot(root, outs)
    env = {k: v for k, v in os.environ.items() if k not in ("FREEPIK_API_KEY", "BFL_API_KEY")}
    env.update(HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", TMPDIR=str(root))
    env.pop("PREFECT_API_URL", None)

    def run(name: str) -> Result:
        folder, out = cases[name]
        result = subprocess.run(
            [
                KLEIN_BATCH,
                "run",
                f"corpus/{name}",
                "--out",
                str(out),
                "--sim-config",
                str(fast),
                "--progress",
                "off",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder,
            timeout=240,
        )
        return Result(name, folder, out, result.returncode, result.stdout, result.stderr)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = {r.name: r for r in pool.map(run, names)}
    after = _snapshot(root, outs)
    assert after == before, {k for k in set(before) ^ set(after)} | {
        k for k in before if k in after and before[k] != after[k]
    }
    return results


def test_corpus_is_big_enough() -> None:
    manifests = [p for p in CORPUS.iterdir() if p.suffix in (".csv", ".tsv", ".parquet")]
    assert len(manifests) >= 30
    assert {p.name for p in manifests} == {*FILE_ERRORS, *ROW_ERRORS}


@pytest.mark.parametrize("name", sorted(FILE_ERRORS))
def test_unusable_file_stops_with_one_clear_line(name: str, runs: dict[str, Result]) -> None:
    result = runs[name]
    assert result.code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {name}: "), lines[0]
    for part in FILE_ERRORS[name]:
        assert part in lines[0], lines[0]
    images = result.out / "images"
    assert not images.exists() or not any(images.iterdir())


@pytest.mark.parametrize("name", sorted(ROW_ERRORS))
def test_bad_rows_are_rejected_and_good_rows_run(name: str, runs: dict[str, Result]) -> None:
    result = runs[name]
    expected = ROW_ERRORS[name]
    assert result.code == (1 if expected else 0), (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "error" not in result.stderr.lower(), result.stderr
    done = pl.read_parquet(result.out / "manifest.parquet").sort("row")
    assert done["row"].to_list() == list(range(1, done.height + 1))
    assert done.height > len(expected), "every corpus file has at least one good row"
    for record in done.iter_rows(named=True):
        row = record["row"]
        if row not in expected:
            assert record["status"] == "succeeded", record
            path = Path(record["output_uri"])
            assert path.parent == (result.out / "images").resolve()
            assert path.is_file()
            continue
        column, part = expected[row]
        assert record["status"] == "rejected", record
        reason = record["reason"]
        where = f"{name} row {row}, column {column}: " if column else f"{name} row {row} (line "
        assert reason.startswith(where), reason
        assert part in reason, reason
    images = result.out / "images"
    stored = {p.name for p in images.iterdir()} if images.exists() else set()
    assert len(stored) == done.filter(pl.col("status") == "succeeded").height


def test_path_trick_ids_stay_inside_dest(runs: dict[str, Result]) -> None:
    result = runs["path-trick-ids.csv"]
    done = pl.read_parquet(result.out / "manifest.parquet")
    images = (result.out / "images").resolve()
    keys = done["key"].to_list()
    assert len(set(keys)) == len(keys) == 14
    for key, uri in zip(keys, done["output_uri"].to_list(), strict=True):
        assert "/" not in key and "\\" not in key and ".." not in key and key[0] not in ".-~"
        assert len(key) <= 120
        assert Path(uri).parent == images
    for target in ESCAPE_TARGETS:
        assert not list(target.parent.glob(target.name + "*"))
    assert not (result.folder / "pwned").exists()
