"""The bundled scenes-video model: it loads by name, edits a 6-frame example GIF through the CLI,
and refuses a clip of another length in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fireflow.cli import main
from fireflow.models.demo import BUNDLED

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "video" / "banana_black.gif"
PROMPTS = ["-s", "banana, black background", "-t", "red apple, black background"]

pytestmark = pytest.mark.skipif(
    not (BUNDLED["scenes-video"] / "diffusion_pytorch_model.safetensors").is_file(), reason="weights not bundled"
)


def test_bundled_video_weights_load_by_name_and_edit_six_frames():
    from fireflow.editor import FireFlowEditor
    from fireflow.video import read_video

    editor = FireFlowEditor.from_pretrained("scenes-video")
    assert editor.adapter.video and editor.adapter.frames == 6
    frames, _ = read_video(str(EXAMPLE))
    out = editor.edit(frames, PROMPTS[1], PROMPTS[3], num_steps=2)
    assert not out.images
    assert len(out.videos) == 1 and len(out.videos[0]) == 6
    assert {f.size for f in out.videos[0]} == {(32, 32)}


def test_cli_edits_an_example_gif_to_a_six_frame_gif(tmp_path):
    from fireflow.video import read_video

    out = tmp_path / "out.gif"
    assert main(["edit", str(EXAMPLE), *PROMPTS, "--model", "scenes-video", "--steps", "2", "-q", "-o", str(out)]) == 0
    frames, _ = read_video(str(out))
    assert len(frames) == 6 and {f.size for f in frames} == {(32, 32)}


def test_cli_refuses_a_five_frame_clip_in_one_line(tmp_path, capsys):
    from fireflow.video import read_video, write_video

    frames, fps = read_video(str(EXAMPLE))
    short = tmp_path / "short.gif"
    write_video(frames[:5], short, fps)
    code = main(["edit", str(short), *PROMPTS, "--model", "scenes-video", "-q", "-o", str(tmp_path / "o.gif")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "5 frames" in err and "6-frame" in err
    assert not (tmp_path / "o.gif").exists()


def _weights_with(tmp_path: Path, defaults) -> Path:
    import json
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(BUNDLED["scenes-video"], folder)
    marker = folder / "fireflow_demo.json"
    data = json.loads(marker.read_text())
    data["defaults"] = defaults
    marker.write_text(json.dumps(data))
    return folder


def test_the_weights_folder_carries_its_default_inject(tmp_path):
    from fireflow.editor import FireFlowEditor

    editor = FireFlowEditor.from_pretrained(str(_weights_with(tmp_path, {"inject": 3})))
    resolved = editor.resolve(None)
    assert resolved.inject == 3 and resolved.num_steps == 8  # the marker's knob over the family's; the rest kept
    assert editor.resolve(None, inject=0).inject == 0  # the caller's value still wins


def test_a_marker_default_that_is_no_knob_is_refused(tmp_path):
    from fireflow.editor import FireFlowEditor

    with pytest.raises(ValueError, match="knob names"):
        FireFlowEditor.from_pretrained(str(_weights_with(tmp_path, {"injekt": 3})))


def test_choose_takes_the_best_fireflow_row_and_the_fewer_injected_steps_on_a_tie():
    from research.scenes_video.eval import choose

    def row(inject, hit, iou, consistent):
        summary = {"frame_hit": hit, "frame_iou": iou, "consistent": consistent}
        return {"solver": "fireflow", "steps": 8, "inject": inject, "summary": summary}

    euler = {"solver": "euler", "steps": 9, "inject": 0, "summary": {"frame_hit": 1, "frame_iou": 1, "consistent": 1}}
    report = {"editing": [euler, row(0, 0.7, 0.5, 0.7), row(1, 0.8, 0.6, 0.8), row(2, 0.8, 0.6, 0.8)]}
    assert choose(report) == 1
    report["editing"].append(row(3, 0.9, 0.7, 0.8))
    assert choose(report) == 3


def test_validation_clips_are_unseen_and_never_the_tables():
    from research.scenes_video import clips as C
    from research.scenes_video.eval import TABLE_MAX, _key, edit_cases

    val = edit_cases(96, split="validation")
    table = {_key(c) for c, _ in edit_cases(TABLE_MAX)}
    assert len(val) == 96
    assert all(bool(C.is_held_out(*_key(c))) for c, _ in val)  # never trained on, like the table's
    assert not table & {_key(c) for c, _ in val}
    assert edit_cases(96, split="validation") == val  # deterministic


def test_eval_settings_spec_is_parsed_or_refused_in_one_line():
    import argparse

    from research.scenes_video.eval import Setting, parse_settings

    assert parse_settings("midpoint-4:0,3") == [Setting("midpoint", 4, 0), Setting("midpoint", 4, 3)]
    for bad, said in [("rk4-8:1", "SOLVER one of fireflow"), ("fireflow-8", "SOLVER-STEPS:INJECT"),
                      ("fireflow-2:3", "between 0 and the steps"), ("fireflow-0:0", "at least 1")]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            parse_settings(bad)


def test_steps_line_says_whether_more_steps_reach_the_bars(tmp_path):
    from research.scenes_video.examples import steps_line

    def row(steps, inject, hit, iou, consistent):
        summary = {"frame_hit": hit, "frame_iou": iou, "consistent": consistent}
        return {"solver": "fireflow", "steps": steps, "inject": inject, "label": f"fireflow-{steps} inject {inject}",
                "summary": summary}  # fmt: skip

    rows = [row(8, 3, 0.7, 0.77, 0.76), row(16, 0, 0.8, 0.5, 0.8), row(16, 6, 0.74, 0.75, 0.8)]
    report = {"clips": 96, "editing": rows}
    (tmp_path / "validation_steps_eval.json").write_text(json.dumps(report))
    line = steps_line(tmp_path)
    assert line.startswith("More sampling steps do not reach them") and "--settings fireflow-16:0,6 --tag" in line
    assert "fireflow-16 inject 6 hit 74%, IoU 0.75, consistent 80%" in line  # the better of 16's by the score
    report["editing"].append(row(16, 4, 0.75, 0.6, 0.8))
    (tmp_path / "validation_steps_eval.json").write_text(json.dumps(report))
    assert steps_line(tmp_path).startswith("More sampling steps reach all three at fireflow-16 inject 4:")
    assert steps_line(tmp_path / "nothing") == ""


def test_training_line_compares_the_longer_run_with_the_bundled_weights(tmp_path):
    from research.scenes_video.examples import training_line

    def report(hit, iou, consistent):
        summary = {"frame_hit": hit, "frame_iou": iou, "consistent": consistent}
        return {"editing": [{"label": "fireflow-8 inject 3", "summary": summary}]}

    runs = tmp_path / "runs"
    (runs / "more").mkdir(parents=True)
    assert training_line(tmp_path, 3, runs) == ""  # no longer run: nothing said
    (tmp_path / "validation_eval.json").write_text(json.dumps(report(0.705, 0.765, 0.76)))
    (tmp_path / "validation_trained_more_eval.json").write_text(json.dumps(report(0.69, 0.76, 0.74)))
    (runs / "probes.jsonl").write_text(json.dumps({"step": 10500, "heldout_loss": 0.07119}) + "\n")
    probes = [{"step": 500, "heldout_loss": 0.0722}, {"step": 4000, "heldout_loss": 0.06946}]
    (runs / "more" / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probes))
    log = [{"step": 50, "lr": 1.2e-4, "elapsed_s": 47.5}, {"step": 4000, "lr": 2.4e-6, "elapsed_s": 3571.7}]
    (runs / "more" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    line = training_line(tmp_path, 3, runs)
    assert "4,000 more steps" in line and "(LR 0.00012, 60 min;" in line and "from 0.0712 to 0.0695" in line
    assert "at 69% / 0.76 / 74% (hit / IoU / consistent; bundled: 70% / 0.77 / 76%" in line
