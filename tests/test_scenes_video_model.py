"""The bundled scenes-video model: it loads by name, edits a 6-frame example GIF through the CLI,
and refuses a clip of another length in one line."""

from __future__ import annotations

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
