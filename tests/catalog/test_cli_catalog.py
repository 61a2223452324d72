"""The catalog options on the command line and in a config file, as a user types them."""

from __future__ import annotations

from pathlib import Path

from catalog_helpers import klein as _klein

from pipeline.contract import cost_credits, output_size


def test_config_file_settings_reach_the_dry_run(products: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "styles.csv").write_text("style\nstudio\nloft\n", encoding="utf-8")
    config = jobs / "nightly.toml"
    config.write_text(
        'out = "out"\n'
        "sim = true\n"
        'prompt_template = "Photo of a {color} {title}, {style}"\n'
        'vary = ["seed=1,2"]\n'
        'variations = ["styles.csv"]\n'  # relative to the config file
        "max_credits = 5\n",
        encoding="utf-8",
    )
    result = _klein("run", str(products), "--config", str(config), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "products.csv: 3 rows x 4 variations (seed 2 x style 2) = 12 images checked" in (
        result.stdout
    )
    # 2 squares and 1 portrait (1k) x 4 variations, at the published price.
    square, portrait = (cost_credits(*output_size(p, "1k")) for p in ("square_1_1", "portrait_2_3"))
    estimate = round(8 * square + 4 * portrait, 2)
    assert f"Estimated cost: {estimate:.2f} credits" in result.stdout
    fit = int(12 * 5 / estimate)
    assert f"budget:   5 credits is below the estimate ({estimate:.2f}): about {fit} of 12 " in (
        result.stdout
    )
    assert not (jobs / "out").exists()  # a dry run sends and writes nothing


def test_validate_rejects_rows_the_template_cannot_fill(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,title,color\na,mug,red\nb,mug,\n", encoding="utf-8")
    result = _klein(
        "validate", str(manifest), "--prompt-template", "{title} in {color}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "m.csv row 2, column color: is empty, but the prompt template needs {color}" in (
        result.stdout
    )


def test_bad_catalog_options_are_one_line_errors(products: Path, tmp_path: Path) -> None:
    cases = [
        (["--vary", "aspect_ratio=huge"], "error: --vary aspect_ratio: 'huge' is not allowed"),
        (["--prompt-template", "{nope}"], "error: --prompt-template uses {nope}, but"),
        (["--variations", "missing.csv"], "error: missing.csv: variations file not found"),
        (["--max-credits", "-1"], "error: --max-credits -1.0 is not allowed"),
    ]
    for flags, message in cases:
        result = _klein(
            "run", str(products), "--sim", "--out", "o", "--dry-run", *flags, cwd=tmp_path
        )
        assert result.returncode == 2, (flags, result.stdout, result.stderr)
        assert result.stderr.startswith(message), (flags, result.stderr)
        assert "Traceback" not in result.stderr
