"""bench pie / eval pie: dataset, resume, sharding, merging, evaluation tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fireflow import metrics as M
from fireflow.bench import pie
from fireflow.bench._editing import Outcome
from fireflow.bench._tiny import tiny_clip, tiny_dino
from fireflow.bench.synthetic import PIE_TYPES, make_synthetic_pie

SETTINGS = {"num_steps": 8, "inject": 1, "guidance": 2.0, "solver": "fireflow", "strategy": "replace_v"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_pie(tmp_path_factory.mktemp("pie"), per_type=2, size=64)


class FakeEdit:
    """A deterministic stand-in for the editor that counts its calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, image: Image.Image, source_prompt: str, target_prompt: str) -> Outcome:
        assert "[" not in source_prompt + target_prompt and "]" not in source_prompt + target_prompt
        self.calls.append(target_prompt)
        return Outcome(image.filter(ImageFilter.GaussianBlur(1)), nfe=18, seconds=0.01)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / pie.MERGED).read_text().splitlines()]


def _stable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("seconds", "rank", "world_size", "run_id")}


# ---- the synthetic dataset -----------------------------------------------------------------------


def test_synthetic_set_has_pie_layout_and_fields(data):
    mapping = json.loads((data / "mapping_file.json").read_text())
    assert len(mapping) == 20
    assert {e["editing_type_id"] for e in mapping.values()} == set(PIE_TYPES)
    for key, e in mapping.items():
        assert len(key) == 12 and key.isdigit()
        assert set(e) == {
            "image_path",
            "original_prompt",
            "editing_prompt",
            "editing_instruction",
            "editing_type_id",
            "blended_word",
            "mask",
        }
        assert e["image_path"].startswith(PIE_TYPES[e["editing_type_id"]] + "/")
        assert "[" in e["editing_prompt"] and "]" in e["editing_prompt"]
        im = Image.open(data / "annotation_images" / e["image_path"])
        assert im.size == (64, 64) and im.mode == "RGB"
        mask = M.decode_pie_mask(e["mask"], size=64)
        assert 0 < mask[1:-1, 1:-1].mean() < 1


def test_synthetic_set_is_reproducible(tmp_path, data):
    other = make_synthetic_pie(tmp_path / "again", per_type=2, size=64)
    assert (other / "mapping_file.json").read_text() == (data / "mapping_file.json").read_text()


# ---- parsing -------------------------------------------------------------------------------------


def test_prompts_lose_only_the_brackets():
    assert pie.clean_prompt("a [green] circle on a [ white] background") == "a green circle on a  white background"


def test_types_accept_ids_and_folders_and_reject_others():
    assert pie.parse_types(["1", "6_change_attribute_color_40", "2,3"]) == {"1", "2", "3", "6"}
    assert pie.parse_types(None) is None
    with pytest.raises(pie.BenchError, match="'11' is not an editing type"):
        pie.parse_types(["11"])


def test_missing_mapping_file_is_a_clear_error(tmp_path):
    with pytest.raises(pie.BenchError, match="no mapping_file.json"):
        pie.load_pie(tmp_path)


# ---- bench pie: resume, sharding, merging --------------------------------------------------------


def _run(data, out, edit=None, **kw):
    return pie.run_pie(data, out, edit or FakeEdit(), SETTINGS, "fake", progress=False, **kw)


def test_run_writes_mirrored_images_and_one_record_each(data, tmp_path):
    edit = FakeEdit()
    counts = _run(data, tmp_path, edit)
    assert counts == {"share": 20, "skipped": 0, "edited": 20, "resized": 0, "merged": 20}
    recs = _records(tmp_path)
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)
    for r in recs:
        assert (tmp_path / "annotation_images" / r["image_path"]).is_file()
        assert r["nfe"] == 18 and r["model"] == "fake" and r["settings"] == SETTINGS
        assert "[" not in r["target_prompt"]
    assert not list(tmp_path.rglob("*.tmp"))
    # A rerun finds everything done.
    again = FakeEdit()
    assert _run(data, tmp_path, again)["edited"] == 0 and again.calls == []


def test_interrupted_run_resumes_without_repeats(data, tmp_path):
    first = FakeEdit()
    counts = _run(data, tmp_path, first, limit=7)
    assert counts["edited"] == 7 and counts["merged"] == 0 and not (tmp_path / pie.MERGED).exists()
    second = FakeEdit()
    counts = _run(data, tmp_path, second)
    assert counts == {"share": 20, "skipped": 7, "edited": 13, "resized": 0, "merged": 20}
    assert sorted(first.calls + second.calls) == sorted(
        pie.clean_prompt(e["editing_prompt"]) for e in json.loads((data / "mapping_file.json").read_text()).values()
    )
    assert len({r["run_id"] for r in _records(tmp_path)}) == 2


def test_two_shards_merge_to_the_single_run(data, tmp_path):
    _run(data, tmp_path / "one")
    c0 = _run(data, tmp_path / "two", rank=0, world=2)
    assert c0["share"] == 10 and c0["merged"] == 0  # rank 1 has not run yet
    c1 = _run(data, tmp_path / "two", rank=1, world=2)
    assert c1["share"] == 10 and c1["merged"] == 20
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [_stable(r) for r in one] == [_stable(r) for r in two]
    assert {r["rank"] for r in two} == {0, 1}
    for r in one:
        a = (tmp_path / "one" / "annotation_images" / r["image_path"]).read_bytes()
        assert a == (tmp_path / "two" / "annotation_images" / r["image_path"]).read_bytes()


def test_types_select_a_subset(data, tmp_path):
    counts = _run(data, tmp_path, types={"6", "9"})
    assert counts["edited"] == 4
    assert {r["editing_type_id"] for r in _records(tmp_path)} == {"6", "9"}


def test_other_settings_in_the_same_folder_are_refused(data, tmp_path):
    _run(data, tmp_path, limit=1)
    with pytest.raises(pie.BenchError, match="inject: 1 there, 2 now; num_steps: 8 there, 15 now"):
        pie.run_pie(data, tmp_path, FakeEdit(), {**SETTINGS, "num_steps": 15, "inject": 2}, "fake", progress=False)


# ---- eval pie ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model, proc = tiny_clip(tmp_path_factory.mktemp("clip"))
    lpips = M.SqueezeLPIPS()
    for i in range(len(M.SqueezeLPIPS.CHANNELS)):
        getattr(lpips, f"lin{i}").model[1].weight.data.abs_()  # LPIPS heads are non-negative
    return pie.MetricModels(structure=M.StructureDistance(tiny_dino()), lpips=lpips, clip=M.ClipScore(model, proc))


def test_eval_writes_csv_and_scaled_tables(data, tmp_path, metric_models):
    _run(data, tmp_path)
    summary = pie.evaluate_pie(data, tmp_path, None, metric_models, progress=False)
    with open(tmp_path / "eval_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert summary["metrics"] == list(pie.COLUMNS)
    overall = summary["overall"]
    assert overall["n"] == 20 and summary["model"] == "fake"
    assert {k: v["n"] for k, v in summary["per_type"].items()} == {f: 2 for f in PIE_TYPES.values()}
    psnr = [float(r["psnr"]) for r in rows]
    assert overall["raw"]["psnr"] == pytest.approx(np.mean(psnr))
    assert 15 < overall["raw"]["psnr"] < 60  # a 1 px blur outside the edit region
    assert overall["scaled"]["mse"] == pytest.approx(overall["raw"]["mse"] * 1e4)
    assert overall["scaled"]["ssim"] == pytest.approx(overall["raw"]["ssim"] * 1e2)
    assert overall["raw"]["structure_distance"] > 0
    assert all(0 <= float(r["clip_whole"]) <= 100 for r in rows)
    saved = json.loads((tmp_path / "eval_summary.json").read_text())
    assert saved["overall"]["raw"]["psnr"] == pytest.approx(overall["raw"]["psnr"])
    assert "overall" in summary["table"] and "PSNR" in summary["table"]


def test_eval_drops_nan_rows_from_the_means():
    rows = [
        {"editing_type_id": "0", "psnr": 20.0},
        {"editing_type_id": "0", "psnr": math.nan},
        {"editing_type_id": "1", "psnr": 30.0},
    ]
    s = pie.summarize(rows, ["psnr"])
    assert s["overall"]["raw"]["psnr"] == 25.0 and s["overall"]["dropped_nan"]["psnr"] == 1
    assert s["per_type"]["0_random_140"]["raw"]["psnr"] == 20.0


def test_eval_without_learned_models_keeps_pixel_metrics(data, tmp_path):
    _run(data, tmp_path, types={"0"})
    summary = pie.evaluate_pie(data, tmp_path, tmp_path / "ev", pie.MetricModels(), types={"0"}, progress=False)
    assert summary["metrics"] == ["psnr", "mse", "ssim"]
    assert (tmp_path / "ev" / "eval_summary.json").is_file()


def test_eval_refuses_missing_edits_and_writes_nothing(data, tmp_path):
    _run(data, tmp_path, limit=3)
    with pytest.raises(pie.BenchError, match="17 of 20 edited images missing"):
        pie.evaluate_pie(data, tmp_path, None, pie.MetricModels(), progress=False)
    assert not (tmp_path / "eval_per_image.csv").exists()


def test_edits_at_the_models_size_come_back_at_the_sources(data, tmp_path):
    """A model working at its own size (the demo model: 32x32) gets its edits resized to the source's
    size, with both sizes recorded; an edit of another size put there by hand is still refused."""

    def shrink(image, s, t):
        return Outcome(image.resize((32, 32)), 18, 0.0)

    counts = _run(data, tmp_path, shrink, types={"0"})
    assert counts["resized"] == counts["edited"] == 2
    recs = _records(tmp_path)
    assert [(r["size"], r["model_size"]) for r in recs] == [([64, 64], [32, 32])] * 2
    summary = pie.evaluate_pie(data, tmp_path, None, pie.MetricModels(), types={"0"}, progress=False)
    assert summary["overall"]["n"] == 2 and math.isfinite(summary["overall"]["raw"]["psnr"])

    Image.new("RGB", (32, 32)).save(tmp_path / "annotation_images" / recs[0]["image_path"])
    with pytest.raises(pie.BenchError, match="edited image is 32x32, the source 64x64"):
        pie.evaluate_pie(data, tmp_path, None, pie.MetricModels(), types={"0"}, progress=False)


# ---- the real chain: tiny random FLUX through the editor -----------------------------------------


def _tiny_settings():
    from fireflow.bench._editing import settings_from_args
    from fireflow.cli import build_parser

    args = build_parser().parse_args(["bench", "pie", "--data", "d", "--out", "o", "--steps", "2"])
    return settings_from_args(args)


def test_bench_then_eval_with_a_tiny_flux(data, tmp_path, tiny_editor, metric_models):
    from fireflow.bench._editing import edit_fn

    settings = _tiny_settings()
    assert settings["num_steps"] == 2 and settings["blocks"] == "default" and "feature_device" not in settings
    types = {"0", "6"}
    counts = pie.run_pie(data, tmp_path, edit_fn(tiny_editor, settings), settings, "tiny", types, progress=False)
    assert counts["edited"] == 4 and counts["merged"] == 4
    recs = _records(tmp_path)
    assert [r["nfe"] for r in recs] == [2 * (2 + 1)] * 4  # FireFlow: N + 1 per pass, two passes
    assert all(r["size"] == [64, 64] for r in recs)
    summary = pie.evaluate_pie(data, tmp_path, None, metric_models, types, progress=False)
    assert summary["overall"]["n"] == 4 and summary["settings"] == settings
    o = summary["overall"]["raw"]
    assert math.isfinite(o["psnr"]) and 0 < o["ssim"] < 1 and o["lpips"] > 0 and o["structure_distance"] > 0


def test_masked_run_keeps_the_background_and_is_reported_apart(data, tmp_path, tiny_editor, metric_models):
    from fireflow.bench._editing import edit_fn, settings_from_args
    from fireflow.cli import build_parser

    argv = ["bench", "pie", "--data", "d", "--out", "o", "--steps", "2", "--use-mask", "--paste-pixels"]
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    settings.update(mask=pie.MASK_LABEL, paste_pixels=True)  # as bench_cli records them
    types = {"1"}
    masked, free = tmp_path / "masked", tmp_path / "free"
    pie.run_pie(data, masked, edit_fn(tiny_editor, settings), settings, "tiny", types, progress=False)
    plain = _tiny_settings()
    pie.run_pie(data, free, edit_fn(tiny_editor, plain), plain, "tiny", types, progress=False)
    a = pie.evaluate_pie(data, masked, None, metric_models, types, progress=False)
    b = pie.evaluate_pie(data, free, None, metric_models, types, progress=False)
    assert a["masked"] and not b["masked"] and a["table"].startswith("MASKED run")
    # Pixel paste: the background is the source's, up to the JPEG re-encoding of the saved edit
    # (the data set's .jpg names); the mask-free edit of the random tiny model repaints it.
    assert a["overall"]["raw"]["psnr"] >= 40 and a["overall"]["raw"]["psnr"] > b["overall"]["raw"]["psnr"] + 15
    table = pie.format_comparison({"masked": a, "free": b})
    head, _, tail = table.partition("MASKED runs")
    assert "free" in head and "masked" not in head.split("\n", 1)[1] and "masked" in tail


def test_json_outputs_are_standard(tmp_path):
    from fireflow.bench import _io

    _io.write_json(tmp_path / "x.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


@pytest.mark.parametrize(
    "mapping, message",
    [
        ([1, 2], "expected an object keyed by image id"),
        ({"../x": {}}, "is not a plain name"),
        ({"1": {"image_path": "a.jpg"}}, "entry 1 lacks field"),
        (
            {
                "1": {
                    "image_path": "../a.jpg",
                    "original_prompt": "",
                    "editing_prompt": "",
                    "editing_type_id": "0",
                    "mask": [],
                }
            },
            "must be a relative path",
        ),
    ],
)
def test_bad_mapping_files_are_refused(tmp_path, mapping, message):
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    with pytest.raises(pie.BenchError, match=message):
        pie.load_pie(tmp_path)


def test_eval_cli_loads_every_metric_from_local_files(data, tmp_path, capsys):
    import torch

    from fireflow.cli import main

    _run(data, tmp_path / "edits", types={"6"})
    tiny_dino().save_pretrained(tmp_path / "dino")
    model, proc = tiny_clip(tmp_path / "tok")
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    lp = M.SqueezeLPIPS()
    torch.save({k: v for k, v in lp.state_dict().items() if k.startswith("features.")}, tmp_path / "sq.pth")
    torch.save({k: v.abs() for k, v in lp.state_dict().items() if k.startswith("lin")}, tmp_path / "heads.pth")
    argv = ["eval", "pie", "--data", str(data), "--edits", str(tmp_path / "edits"), "--types", "6", "-q"]
    weights_none = [
        "--dino",
        str(tmp_path / "none"),
        "--clip",
        str(tmp_path / "none"),
        "--squeezenet",
        str(tmp_path / "none.pth"),
    ]
    weights = [
        "--dino",
        str(tmp_path / "dino"),
        "--clip",
        str(tmp_path / "clip"),
        "--squeezenet",
        str(tmp_path / "sq.pth"),
        "--lpips-heads",
        str(tmp_path / "heads.pth"),
        "--device",
        "cpu",
    ]
    assert main(argv + weights) == 0
    out = capsys.readouterr()
    assert "skipped" not in out.err and "Structure x1e3" in out.out and "CLIP edited" in out.out
    summary = json.loads((tmp_path / "edits" / "eval_summary.json").read_text())
    assert summary["metrics"] == list(pie.COLUMNS) and summary["overall"]["n"] == 2
    # Without the weights: each learned metric is skipped with a message, the rest still computed.
    assert main(argv + weights_none) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 3
    assert json.loads((tmp_path / "edits" / "eval_summary.json").read_text())["metrics"] == ["psnr", "mse", "ssim"]


def test_cli_checks_the_folder_before_loading_a_model(data, tmp_path, capsys):
    from fireflow.cli import main

    _run(data, tmp_path, limit=1)
    argv = ["bench", "pie", "--data", str(data), "--out", str(tmp_path), "--model", "no/such-model", "-q"]
    assert main([*argv, "--steps", "15", "--inject", "2"]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err  # not a model-not-found error
    assert main([*argv, "--inject", "9"]) == 2
    assert "--inject must be between 0 and the step count 8" in capsys.readouterr().err


def test_eval_compares_several_edit_folders(data, tmp_path, capsys):
    from fireflow.cli import main

    _run(data, tmp_path / "blur", types={"0"})
    pie.run_pie(data, tmp_path / "same", lambda im, s, t: Outcome(im, 9, 0.0), SETTINGS, "id", {"0"}, progress=False)
    argv = ["eval", "pie", "--data", str(data), "--types", "0", "-q", "--skip", "structure", "clip", "lpips"]
    assert main([*argv, "--edits", str(tmp_path / "blur"), str(tmp_path / "same"), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    table = out.split("overall\n")[-1]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert rows["blur"][1:3] == ["2", "18"] and rows["same"][1:3] == ["2", "9"]
    assert float(rows["same"][3]) > float(rows["blur"][3])  # PSNR: re-encoding only beats a blur
    assert (tmp_path / "ev" / "blur" / "eval_summary.json").is_file()
    assert (tmp_path / "ev" / "same" / "eval_per_image.csv").is_file()
    assert (tmp_path / "ev" / "comparison.txt").read_text().strip() == table.strip()


def test_runs_go_through_the_batch_runner_and_resume_older_runs(data, tmp_path):
    """bench pie is the batch runner's front end: its results file is there too; a folder of an
    older bench pie (records only) resumes without edits; a record lost to a kill after its
    result is written back from the result."""
    _run(data, tmp_path, types={"0", "1"})
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [r["id"] for r in _records(tmp_path)]
    assert all(r["status"] == "ok" and r["size"] == [64, 64] for r in results)
    before = _records(tmp_path)
    for f in tmp_path.glob("results*.jsonl"):
        f.unlink()  # an older bench pie's folder
    (tmp_path / pie.MERGED).unlink()
    again = FakeEdit()
    counts = _run(data, tmp_path, again, types={"0", "1"})
    assert again.calls == [] and counts["skipped"] == 4 and counts["merged"] == 4
    assert _records(tmp_path) == before
    pie.record_path(tmp_path, before[0]["id"]).unlink()
    (tmp_path / pie.MERGED).unlink()
    assert _run(data, tmp_path, again, types={"0", "1"})["edited"] == 0 and again.calls == []
    assert _records(tmp_path) == before


def test_masked_run_passes_each_items_mask_at_its_size(data, tmp_path):
    got = []

    def edit(image, s, t, mask=None):
        got.append((mask.shape, mask.dtype, round(float(mask.mean()), 3)))
        return Outcome(image, 18, 0.0)

    settings = {**SETTINGS, "mask": pie.MASK_LABEL, "paste_pixels": True}
    pie.run_pie(data, tmp_path, edit, settings, "fake", {"3"}, progress=False)
    items = pie.load_pie(data, {"3"})
    assert got == [
        ((64, 64), np.dtype(bool), round(float(M.decode_pie_mask(it.mask, 64).astype(bool).mean()), 3)) for it in items
    ]
