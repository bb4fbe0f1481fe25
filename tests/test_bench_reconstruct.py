"""bench reconstruct: solvers x steps, NFE accounting, metrics, table, JSON and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from fireflow.bench import reconstruct as R
from fireflow.bench.synthetic import _draw


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    import random

    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    for name, (color, shape) in {"a.png": ("red", "circle"), "b.png": ("blue", "square")}.items():
        _draw(64, color, shape, "white", rng)[0].save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_prompts_from_json_and_tsv(images, tmp_path):
    files = R.list_images(images)
    assert [f.name for f in files] == ["a.png", "b.png"]
    (tmp_path / "p.json").write_text(json.dumps({"a.png": "a red circle", "b": "a blue square"}))
    assert R.load_prompts(tmp_path / "p.json", files, "x") == ["a red circle", "a blue square"]
    (tmp_path / "p.tsv").write_text("a\ta red circle\nb.png\ta blue square\n")
    assert R.load_prompts(tmp_path / "p.tsv", files, "x") == ["a red circle", "a blue square"]
    assert R.load_prompts(None, files, "a photo") == ["a photo", "a photo"]
    (tmp_path / "q.json").write_text(json.dumps({"a.png": "a red circle"}))
    with pytest.raises(ValueError, match="no prompt for image b.png"):
        R.load_prompts(tmp_path / "q.json", files, "x")
    with pytest.raises(ValueError, match="no .png"):
        R.list_images(tmp_path)


def test_solvers_by_steps_with_a_tiny_flux(images, tmp_path, tiny_editor):
    files = R.list_images(images)
    result = R.run_reconstruct(
        tiny_editor,
        files,
        ["a red circle", "a blue square"],
        ["fireflow", "midpoint", "euler"],
        [1, 3],
        tmp_path,
        progress=False,
        model="tiny",
    )
    nfe = {(r["solver"], r["steps"]): r["nfe"] for r in result["runs"]}
    # Inversion + reconstruction: FireFlow 2(N+1), midpoint 4N, Euler 2N (docs/method.md, section 3).
    assert nfe == {
        ("fireflow", 1): 4,
        ("fireflow", 3): 8,
        ("midpoint", 1): 4,
        ("midpoint", 3): 12,
        ("euler", 1): 2,
        ("euler", 3): 6,
    }
    assert result["metrics"] == ["psnr", "ssim", "mse"]  # no LPIPS weights given
    for run in result["runs"]:
        assert len(run["per_image"]) == 2
        for row in run["per_image"]:
            assert row["psnr"] == pytest.approx(10 * math.log10(1 / row["mse"]), rel=1e-5)
        assert run["mse"] == pytest.approx(sum(r["mse"] for r in run["per_image"]) / 2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "tiny" and len(saved["runs"]) == 6
    assert (tmp_path / "table.txt").read_text().count("\n") == 2 + 6 + 1  # header, rule, runs, orders
    assert set(saved["order"]) == {"fireflow", "midpoint", "euler"}
    with Image.open(tmp_path / "error_vs_nfe.png") as im:
        assert im.width > 300
    with Image.open(tmp_path / "comparison_grid.png") as im:
        assert im.size == (160 * 7, 18 + 160 * 2)  # source + 6 runs, 2 images
    # A rerun with the same inputs reuses every finished run: the editor is not called again.
    grid = (tmp_path / "comparison_grid.png").read_bytes()
    again = R.run_reconstruct(
        object(),
        files,
        ["a red circle", "a blue square"],
        ["fireflow", "midpoint", "euler"],
        [1, 3],
        tmp_path,
        progress=False,
        model="tiny",
    )
    assert again["runs"] == saved["runs"] and (tmp_path / "comparison_grid.png").read_bytes() == grid


def test_fitted_order_is_the_rmse_slope():
    runs = [{"solver": "s", "nfe": n, "mse": (1 / n**2) ** 2} for n in (4, 8, 16)]  # RMSE ~ NFE^-2
    runs += [{"solver": "e", "nfe": n, "mse": 3.0 / n**2} for n in (4, 8)]  # RMSE ~ NFE^-1
    runs += [{"solver": "one", "nfe": 4, "mse": 0.1}]  # one point: no fit
    orders = R.fitted_orders(runs)
    assert orders["s"] == pytest.approx(2.0) and orders["e"] == pytest.approx(1.0) and "one" not in orders


def test_cli_rejects_bad_input_before_loading_a_model(images, tmp_path, capsys):
    from fireflow.cli import main

    out = tmp_path / "out"
    base = ["bench", "reconstruct", "--images", str(images), "--out", str(out), "--model", "no/such-model"]
    assert main([*base, "--solvers", "rk4"]) == 2
    assert "rk4" in capsys.readouterr().err
    assert main([*base, "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
