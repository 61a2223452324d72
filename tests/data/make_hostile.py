"""Writes the hostile manifest corpus in ``tests/data/hostile/`` (run it after editing).

``.venv/bin/python tests/data/make_hostile.py``. The files are committed so that anyone can
open them and see exactly what the pipeline is fed; the test (``tests/hostile``) says what
each must produce. Files too big to commit (a 50 MB reference) are made by the test itself.
"""

from __future__ import annotations

import codecs
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent / "hostile"
GOOD = "a red ceramic mug on white"


def csv(name: str, text: str, *, encoding: str = "utf-8", bom: bytes = b"") -> None:
    (HERE / name).write_bytes(bom + text.encode(encoding))


def parquet(name: str, table: pa.Table) -> None:
    pq.write_table(table, HERE / name)


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    shots = HERE / "shots"
    shots.mkdir(exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (30, 160, 60)).save(buf, format="PNG")
    (shots / "ok.png").write_bytes(buf.getvalue())
    (shots / "not-an-image.png").write_bytes(b"name,price\nmug,9.99\n")
    (shots / "truncated.jpg").write_bytes(_jpeg()[:200])

    # --- whole-file problems: the run must not start (exit 2, one clear line) ----------------
    csv("empty.csv", "")
    csv("blank-lines-only.csv", "\n\n  \n\r\n")
    csv("header-only.csv", "id,prompt,seed\n")
    csv("no-prompt-column.csv", "id,description,seed\nm1,a red mug,1\n")
    csv("pipe-delimited.csv", "id|prompt|seed\nm1|a red mug|1\n")
    csv("utf16-without-bom.csv", f"id,prompt\nm1,{GOOD}\n", encoding="utf-16-le")
    csv("latin1.csv", "id,prompt\nm1,caf\u00e9 au lait mug\nm2,plain mug\n", encoding="latin-1")
    csv("duplicate-prompt-column.csv", f"id,prompt,Prompt\nm1,{GOOD},again\n")
    csv("reserved-column.csv", f"id,prompt,__index\nm1,{GOOD},3\n")
    (HERE / "zip-named-csv.csv").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    (HERE / "binary-garbage.csv").write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))
    (HERE / "text-named-parquet.parquet").write_text(f"id,prompt\nm1,{GOOD}\n")
    parquet(
        "parquet-prompt-is-int.parquet",
        pa.table({"id": ["m1"], "prompt": pa.array([42], pa.int64())}),
    )
    parquet(
        "parquet-prompt-is-struct.parquet",
        pa.table({"id": ["m1"], "prompt": pa.array([{"text": GOOD}])}),
    )
    parquet(
        "parquet-seed-is-list.parquet",
        pa.table({"id": ["m1"], "prompt": [GOOD], "seed": pa.array([[1, 2]])}),
    )
    parquet(
        "parquet-no-rows.parquet",
        pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}),
    )

    # --- row problems: bad rows rejected (exit 1), good rows still run --------------------
    csv("utf8-bom.csv", f"id,prompt\nm1,{GOOD}\nm2,caf\u00e9 mug \u2615\n", bom=codecs.BOM_UTF8)
    csv("utf16-bom.csv", f"id,prompt\nm1,{GOOD}\nm2,caf\u00e9 mug\n", encoding="utf-16")
    csv("semicolons.csv", f"id;prompt;seed\nm1;{GOOD};7\nm2;blue mug, matte;8\n")
    csv("tabs.tsv", f"id\tprompt\tseed\nm1\t{GOOD}\t7\n")
    csv("crlf-and-trailing-blank-lines.csv", f"id,prompt\r\nm1,{GOOD}\r\n\r\n\r\n")
    csv(
        "huge-prompt.csv",
        f"id,prompt\nm1,{GOOD}\nm2,{'very long prompt ' * 1200}\n",
    )
    csv("empty-prompts.csv", f'id,prompt\nm1,{GOOD}\nm2,\nm3,"   "\n')
    csv(
        "invalid-base64.csv",
        f'id,prompt,input_image\nm1,{GOOD},\nm2,mug,"data:image/png;base64,!!!notbase64@@@"\n'
        f"m3,mug,{'QUJD' * 20}Q\n"
        f'm4,mug,"data:image/png;base64,{"QUJD" * 4}"\n',
    )
    csv(
        "references-not-images.csv",
        f"id,prompt,input_image\nm1,{GOOD},shots/ok.png\nm2,mug,shots/not-an-image.png\n"
        "m3,mug,shots/truncated.jpg\nm4,mug,shots/missing.png\nm5,mug,shots\n",
    )
    csv(
        "references-outside-folder.csv",
        f"id,prompt,input_image\nm1,{GOOD},shots/ok.png\nm2,mug,../outside.png\n"
        "m3,mug,/etc/passwd\nm4,mug,shots/../../outside.png\nm5,mug,~/outside.png\n",
    )
    csv(
        "references-private-urls.csv",
        f"id,prompt,input_image\nm1,{GOOD},\n"
        "m2,mug,https://127.0.0.1/x.png\n"
        "m3,mug,https://localhost:9/x.png\n"
        "m4,mug,https://169.254.169.254/latest/meta-data/\n"
        "m5,mug,https://10.0.0.7/x.png\n"
        "m6,mug,https://[::1]/x.png\n"
        "m7,mug,http://192.168.1.1/x.png\n"
        "m8,mug,https://[::ffff:127.0.0.1]/x.png\n",
    )
    csv(
        "reference-schemes.csv",
        f"id,prompt,input_image\nm1,{GOOD},\nm2,mug,file:///etc/passwd\n"
        "m3,mug,ftp://example.com/x.png\nm4,mug,gopher://127.0.0.1:6379/_INFO\n"
        'm5,mug,"data:text/plain;base64,aGVsbG8="\n',
    )
    csv("reference-50mb.csv", f"id,prompt,input_image\nm1,{GOOD},\nm2,mug,shots/huge-50mb.png\n")
    csv("duplicate-ids.csv", f"id,prompt\nm1,{GOOD}\nm1,{GOOD} again\nM1,uppercase id\n")
    tricks = [
        "../../../../tmp/klein-escape",
        "/etc/cron.d/klein",
        "..",
        ".",
        ".hidden",
        "a/b\\c",
        "C:\\Windows\\win.ini",
        "~root",
        "CON",
        "x" * 400,
        "\u202eexe.png",
        "sku with spaces",
        "$(touch pwned)",
        "images/../../escape",
    ]
    lines = [f'"{t}",{GOOD} {i}' for i, t in enumerate(tricks)]
    csv("path-trick-ids.csv", "id,prompt\n" + "\n".join(lines) + "\n")
    csv(
        "bad-seeds.csv",
        f"id,prompt,seed\nm1,{GOOD},42\nm2,mug,-1\nm3,mug,1.5\nm4,mug,NaN\n"
        "m5,mug,4294967296\nm6,mug,1e100\nm7,mug,twelve\nm8,mug,inf\nm9,mug,4294967295\n",
    )
    csv(
        "unknown-presets.csv",
        "id,prompt,aspect_ratio,resolution,output_format,safety_tolerance\n"
        f"m1,{GOOD},square_1_1,1k,jpeg,2\n"
        "m2,mug,square_2_2,,,\n"
        "m3,mug,,4k,,\n"
        "m4,mug,,,gif,\n"
        "m5,mug,,,,9\n"
        "m6,mug,,,,-1\n",
    )
    csv(
        "ragged-rows.csv",
        f'id,prompt,seed\nm1,{GOOD},1\nm2,mug,2,extra,fields\nm3\nm4,"unclosed, 3\n',
    )
    csv(
        "control-characters.csv",
        f'id,prompt\nm1,{GOOD}\nm2,"tab\there, bell\x07, escape \x1b[31mred"\n'
        'm3,"=HYPERLINK(""http://evil"")"\n',
    )
    parquet(
        "parquet-bad-cells.parquet",
        pa.table(
            {
                "id": ["m1", "m2", "m3", "m4"],
                "prompt": [GOOD, "mug", "mug", None],
                "seed": pa.array([7.0, math.nan, 3.0, 1.0], pa.float64()),
                "input_image": pa.array([None, None, b"not an image", None], pa.binary()),
            }
        ),
    )
    parquet(
        "parquet-nested-extra-columns.parquet",
        pa.table(
            {
                "id": ["m1", "m2"],
                "prompt": [GOOD, "blue mug"],
                "attributes": pa.array([{"colour": "red", "sizes": [1, 2]}, None]),
                "tags": pa.array([["a", "b"], []]),
            }
        ),
    )
    parquet(
        "parquet-int-ids-and-seeds.parquet",
        pa.table(
            {
                "id": pa.array([1, 2, 3], pa.int64()),
                "prompt": [GOOD, "mug", "mug"],
                "seed": pa.array([5, -5, 2**40], pa.int64()),
            }
        ),
    )
    (HERE / "README.md").write_text(
        "# Hostile manifests\n\nMalformed, tricky and malicious inputs, made by "
        "`tests/data/make_hostile.py`; `tests/hostile/test_hostile_corpus.py` says what "
        "each must produce. Never use these as examples.\n"
    )
    print(json.dumps(sorted(p.name for p in HERE.iterdir()), indent=1))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 200)).save(buf, format="JPEG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
