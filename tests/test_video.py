"""Video in and out (fireflow/video.py) and ``fireflow edit clip.mp4`` on a tiny Wan 2.1 folder."""

import numpy as np
import pytest
from PIL import Image

from fireflow.cli import main
from fireflow.image import load_frames
from fireflow.video import VideoError, probe_video, read_video, write_video

STEPS = ["--steps", "2"]


def smooth_frames(n=9, size=(32, 32), seed=0):
    """Gradients that move: H.264 keeps them to a few levels (random noise it would not)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, 3)
    return [
        Image.fromarray(np.clip(xx[..., None] * 3 + yy[..., None] * 2 + base + 6 * i, 0, 255).astype(np.uint8))
        for i in range(n)
    ]


def mean_abs(a, b):
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean()


@pytest.mark.parametrize("name,tol", [("clip.mp4", 4.0), ("clip.gif", 3.0), ("frames", 0.0)])
def test_round_trip(tmp_path, name, tol):
    frames = smooth_frames()
    frames[4] = frames[3]  # a repeated frame stays a frame (Pillow's GIF writer would merge it)
    path = write_video(frames, tmp_path / name, 8)
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (9, 32, 32, 8.0)
    back, fps = read_video(path)
    assert fps == 8.0 and len(back) == 9 and all(f.size == (32, 32) and f.mode == "RGB" for f in back)
    assert max(mean_abs(a, b) for a, b in zip(back, frames)) <= tol
    assert load_frames(str(path))[0].size == (32, 32)  # the editor's reader takes the path too
    assert read_video(path, max_frames=5)[0][4].tobytes() == back[4].tobytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_webm_and_a_folder_in_natural_order(tmp_path):
    import av

    frames = smooth_frames(5)
    with av.open(str(tmp_path / "c.webm"), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")))
        c.mux(s.encode())
    back, fps = read_video(tmp_path / "c.webm")
    assert len(back) == 5 and fps == 10.0 and mean_abs(back[2], frames[2]) < 6
    folder = tmp_path / "f"
    folder.mkdir()
    for i, f in enumerate(frames):
        f.save(folder / f"f{i * 5}.png")  # f0, f5, f10, f15, f20: f10 after f5
    back, fps = read_video(folder)
    assert fps == 16.0 and [mean_abs(a, b) for a, b in zip(back, frames)] == [0.0] * 5


def test_writes_are_refused_cleanly(tmp_path):
    frames = smooth_frames(2, (31, 32))
    with pytest.raises(VideoError, match="even width and height"):
        write_video(frames, tmp_path / "odd.mp4", 8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(VideoError, match="not an empty folder"):
        write_video(frames, tmp_path / "full", 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


# ---- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from fireflow.testing import save_tiny

    return str(save_tiny("wan2.1", tmp_path_factory.mktemp("tiny-wan")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(write_video(smooth_frames(), tmp_path_factory.mktemp("clip") / "clip.mp4", 8))


def edit(tiny_wan, *args):
    return main(["edit", *args, "-s", "a red square", "-t", "a blue square", "--model", tiny_wan, "-q", *STEPS])


def test_edit_a_clip_end_to_end(tiny_wan, clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert edit(tiny_wan, clip, "-o", str(out)) == 0
    said = capsys.readouterr().out
    # 2 steps: 3 evaluations per pass; inversion at guidance 1, the edit under CFG (guidance 3): 3 + 6
    assert "video: 9 frames of 32x32 at 8 fps; 6 velocity evaluations (inversion 3 + editing 3), 9 model calls" in said
    assert "9 frames, 9 model calls" in said and "6 NFE" in said
    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.fps) == (9, 32, 32, 8.0)


def test_gif_in_gif_out_and_frames_folders(tiny_wan, tmp_path):
    gif = write_video(smooth_frames(5), tmp_path / "in.gif", 10)
    assert edit(tiny_wan, str(gif), "-o", str(tmp_path / "out.gif")) == 0
    info = probe_video(tmp_path / "out.gif")
    assert (info.frames, info.width, info.height, info.fps) == (5, 32, 32, 10.0)
    folder = write_video(smooth_frames(5), tmp_path / "in_frames", 12)
    assert edit(tiny_wan, str(folder), "-o", str(tmp_path / "out_frames"), "-t", "a green square") == 0
    for i in range(2):  # two targets: out_frames-0, out_frames-1
        back, fps = read_video(tmp_path / f"out_frames-{i}")
        assert len(back) == 5 and fps == 12.0 and back[0].size == (32, 32)


def test_max_frames_and_a_mask_video(tiny_wan, clip, tmp_path, capsys):
    out = tmp_path / "five"
    assert edit(tiny_wan, clip, "-o", str(out), "--max-frames", "5") == 0
    assert len(read_video(out)[0]) == 5
    masks = [Image.new("RGB", (32, 32)) for _ in range(9)]
    for k, m in enumerate(masks):
        m.paste((255, 255, 255), (k, 8, k + 16, 24))
    mask = write_video(masks, tmp_path / "mask.mp4", 8)
    assert edit(tiny_wan, clip, "-o", str(tmp_path / "masked.mp4"), "--mask", str(mask)) == 0
    assert "block calls injected, masked" in capsys.readouterr().out
    assert edit(tiny_wan, clip, "-o", str(tmp_path / "m2.mp4"), "--mask", str(mask), "--max-frames", "5") == 0
    short = write_video(masks[:5], tmp_path / "short_mask.mp4", 8)
    assert edit(tiny_wan, clip, "-o", str(tmp_path / "m3.mp4"), "--mask", str(short)) == 2
    assert "the mask video has 5 frames, the clip 9" in capsys.readouterr().err


def test_feature_device_cpu_gives_the_same_video(tiny_wan, clip, tmp_path):
    assert edit(tiny_wan, clip, "-o", str(tmp_path / "a")) == 0
    assert edit(tiny_wan, clip, "-o", str(tmp_path / "b"), "--feature-device", "cpu") == 0
    a, b = read_video(tmp_path / "a")[0], read_video(tmp_path / "b")[0]
    assert len(a) == 9 and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def _bad_inputs(tmp_path):
    bad = {}
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    bad["corrupt.mp4"] = "is not a readable video"
    import av

    with av.open(str(tmp_path / "empty.mp4"), "w") as c:  # a container with no frames in it
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    bad["empty.mp4"] = "has no video frames"
    (tmp_path / "no_frames").mkdir()
    bad["no_frames"] = "has no image files"
    write_video([Image.new("RGB", (16, 16))] * 1100, tmp_path / "huge.mp4", 8)
    bad["huge.mp4"] = "has 1100 frames, more than the 1024 accepted"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, size in enumerate([(32, 32), (32, 32), (48, 32)]):
        Image.new("RGB", size).save(mixed / f"{i}.png")
    bad["mixed"] = "frames of different sizes ('0.png' is 32x32, '2.png' is 48x32)"
    write_video(smooth_frames(7), tmp_path / "seven.mp4", 8)
    bad["seven.mp4"] = "7 frames: Wan takes 4k + 1 frames; give 5 or 9"
    return bad


def test_bad_videos_are_one_line_exit_2_no_output(tiny_wan, tmp_path, capsys):
    for name, message in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}.mp4"
        assert edit(tiny_wan, str(tmp_path / name), "-o", str(out)) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fireflow edit: error: ") and message in err, (name, err)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".", "out-"))]


def test_video_outputs_are_checked_before_any_work(tiny_wan, clip, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"")
    for out, message in [
        (tmp_path / "o.webm", "a video is written as .mp4, .gif, or as PNG frames in a folder"),
        (tmp_path / "full", "exists and is not an empty folder"),
        (tmp_path / "o.png", "a video is written as .mp4, .gif"),
    ]:
        assert main(["edit", clip, "-s", "a", "-t", "b", "-o", str(out), "--model", tiny_wan]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["edit", clip, "-s", "a", "-t", "b", "-o", clip, "--model", tiny_wan]) == 2
    assert "is the same file as the input video" in capsys.readouterr().err


def test_the_web_page_says_video_is_cli_only(tiny_wan, tmp_path):
    pytest.importorskip("gradio")
    from fireflow import FireFlowEditor
    from fireflow.web.page import VIDEO_NOTE, build_app

    editor = FireFlowEditor.from_pretrained(tiny_wan, device="cpu", torch_dtype="fp32")
    app = build_app(editor, examples=[], workdir=tmp_path)
    notes = [c for c in app.config["components"] if c.get("props", {}).get("elem_id") == "video-note"]
    assert len(notes) == 1 and notes[0]["props"]["value"] == VIDEO_NOTE and "CLI-only" in VIDEO_NOTE
