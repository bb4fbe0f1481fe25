"""The benchmark chain on the bundled demo model (skipped until its weights are in the package)."""

from __future__ import annotations

import json
import math

import pytest

from fireflow.bench import pie
from fireflow.bench import reconstruct as R
from fireflow.bench._editing import edit_fn
from fireflow.bench.synthetic import make_synthetic_pie

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_editor():
    from fireflow.models.demo import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "config.json").is_file():
        pytest.skip("the demo model's weights are not in the package yet")
    from fireflow import FireFlowEditor

    return FireFlowEditor.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    # The demo model works at 32x32: the synthetic set is drawn at that size so edits match sources.
    return make_synthetic_pie(tmp_path_factory.mktemp("pie32"), per_type=1, size=32, types=["0", "6", "8"])


def test_demo_bench_and_eval(data32, tmp_path, demo_editor):
    settings = {
        "num_steps": 8,
        "inject": 1,
        "guidance": 2.0,
        "inversion_guidance": 1.0,
        "solver": "fireflow",
        "strategy": "replace_v",
        "blocks": "all",
    }
    counts = pie.run_pie(data32, tmp_path, edit_fn(demo_editor, settings), settings, "demo", progress=False)
    assert counts["merged"] == 3
    lines = (tmp_path / pie.MERGED).read_text().splitlines()
    assert [json.loads(line)["nfe"] for line in lines] == [18] * 3  # FireFlow 8 steps: 9 + 9 NFE
    summary = pie.evaluate_pie(data32, tmp_path, None, pie.MetricModels(), progress=False)
    assert summary["overall"]["n"] == 3 and math.isfinite(summary["overall"]["raw"]["psnr"])


def test_demo_fireflow_beats_euler_at_equal_nfe(data32, tmp_path, demo_editor):
    # The paper's comparison at 18 NFE: FireFlow 8 steps against Euler 9 steps.
    images = sorted((data32 / "annotation_images").rglob("*.jpg"))
    by_path = {it.image_path.split("/")[-1]: it.source_prompt for it in pie.load_pie(data32)}
    prompts = [by_path[p.name] for p in images]
    ff = R.run_reconstruct(demo_editor, images, prompts, ["fireflow"], [8], tmp_path / "ff", progress=False)["runs"][0]
    eu = R.run_reconstruct(demo_editor, images, prompts, ["euler"], [9], tmp_path / "eu", progress=False)["runs"][0]
    assert ff["nfe"] == eu["nfe"] == 18
    assert ff["mse"] < eu["mse"]


def test_cli_chain_at_its_defaults(tmp_path, demo_editor, capsys):
    """``bench synthetic`` -> ``bench pie`` -> ``eval pie`` with no options but the folders: the demo
    model edits at 32x32, the set is drawn at 64x64, and the edits come back at the sources' size."""
    from PIL import Image

    from fireflow.cli import main

    data, edits = tmp_path / "data", tmp_path / "edits"
    assert main(["bench", "synthetic", "--out", str(data)]) == 0
    assert main(["bench", "pie", "--data", str(data), "--out", str(edits), "-q"]) == 0
    assert "20 made at the model's own size, resized to their source's" in capsys.readouterr().out
    assert main(["eval", "pie", "--data", str(data), "--edits", str(edits), "-q"]) == 0

    records = [json.loads(line) for line in (edits / pie.MERGED).read_text().splitlines()]
    assert len(records) == 20
    assert {(tuple(r["size"]), tuple(r["model_size"]), r["nfe"]) for r in records} == {((64, 64), (32, 32), 18)}
    for r in records:
        with Image.open(edits / "annotation_images" / r["image_path"]) as im:
            assert im.size == (64, 64)
    summary = json.loads((edits / "eval_summary.json").read_text())
    assert summary["overall"]["n"] == 20 and set(summary["per_type"]) == set(pie.PIE_TYPES.values())
    for metric in ("psnr", "mse", "ssim"):  # the metrics that need no downloaded weights
        assert math.isfinite(summary["overall"]["raw"][metric]), metric
    assert 10 < summary["overall"]["raw"]["psnr"] < 60
