"""The moving-scenes clips of research/scenes_video (the video demo model's training data)."""

import numpy as np
import pytest
import torch

from research.bundled import scenes as S
from research.scenes_video import clips as C


@pytest.fixture(scope="module")
def drawn():
    train = C.draw_clips(400, torch.Generator().manual_seed(0))
    held = C.draw_clips(100, torch.Generator().manual_seed(1), held_out=True)
    return train, held


def test_sprite_inside_every_frame_and_straight_motion(drawn):
    for clip in drawn[0] + drawn[1]:
        assert clip.frames == C.FRAMES and clip.inside()
        assert abs(clip.vx) <= C.VMAX and abs(clip.vy) <= C.VMAX
        boxes = np.array(clip.boxes)
        assert (np.diff(boxes, axis=0) == [clip.vx, clip.vy, clip.vx, clip.vy]).all()  # constant velocity
    # the draws cover both sizes, moving and still clips, both directions
    train = drawn[0]
    assert {c.size for c in train} == {0, 1}
    assert {c.vx for c in train} == set(range(-C.VMAX, C.VMAX + 1))
    assert any(c.vx == c.vy == 0 for c in train)


def test_frames_masks_and_boxes(drawn):
    spr = S.sprites()
    for clip in drawn[1][:20]:
        video = C.composite(clip, spr)
        masks, opaque, boxes = C.object_masks(clip, spr), C.object_masks(clip, spr, opaque=True), C.box_masks(clip)
        assert video.shape == (C.FRAMES, 3, C.RESOLUTION, C.RESOLUTION)
        assert masks.shape == boxes.shape == (C.FRAMES, C.RESOLUTION, C.RESOLUTION)
        bg = S.background_rgb(clip.bg)[:, None, None]
        bg8 = (bg * 255).round() / 255
        for f, (x0, y0, x1, y1) in enumerate(clip.boxes):
            assert torch.equal(video[f], S.composite(clip.scene(f), spr))
            assert boxes[f].sum() == clip.side**2 and boxes[f, y0:y1, x0:x1].all()
            assert masks[f].any() and not (masks[f] & ~boxes[f]).any() and not (opaque[f] & ~masks[f]).any()
            ys, xs = np.nonzero(masks[f])  # the mask's extent touches the box on the glyph's long axis
            assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
            assert (xs.min() == x0 and xs.max() == x1 - 1) or (ys.min() == y0 and ys.max() == y1 - 1)
            outside = torch.from_numpy(~masks[f])
            assert torch.allclose(video[f][:, outside], bg8.expand_as(video[f])[:, outside], atol=1e-6)
        # the mask moves with the box
        assert np.array_equal(np.roll(masks[0], (clip.vy, clip.vx), axis=(0, 1)), masks[1])


def test_held_out_split_disjoint(drawn):
    train, held = drawn
    assert not any(C.is_held_out(c.obj, c.bg, c.size, c.x, c.y, c.vx, c.vy) for c in train)
    assert all(C.is_held_out(c.obj, c.bg, c.size, c.x, c.y, c.vx, c.vy) for c in held)
    assert not {c for c in train} & {c for c in held}
    # about a tenth of the clips, and the tensor hash agrees with the integer one
    cand = C.draw_clips(2000, torch.Generator().manual_seed(2)) + C.draw_clips(200, torch.Generator(), held_out=True)
    t = [torch.tensor([getattr(c, k) for c in cand]) for k in ("obj", "bg", "size", "x", "y", "vx", "vy")]
    flags = C.is_held_out(*t)
    assert flags.tolist() == [C.is_held_out(c.obj, c.bg, c.size, c.x, c.y, c.vx, c.vy) for c in cand]
    keys = C.clip_key(*t)
    assert int(keys.max()) < 2**31
    rng = np.random.default_rng(0)  # a uniform sample of keys, not the draws' distribution
    sample = torch.from_numpy(rng.integers(0, int(keys.max()), 20000))
    assert 0.08 < (S._mix(sample) % C.HOLDOUT_MOD == 0).float().mean() < 0.12


def test_deterministic_and_packing():
    a = C.draw_clips(16, torch.Generator().manual_seed(5))
    b = C.draw_clips(16, torch.Generator().manual_seed(5))
    assert a == b and a != C.draw_clips(16, torch.Generator().manual_seed(6))
    src = C.ClipSource()
    x1, i1 = src.batch(4, torch.Generator().manual_seed(3))
    x2, i2 = src.batch(4, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(i1, i2)
    assert x1.shape == (4, C.FRAMES * 64, 48)
    clips = C.draw_clips(4, torch.Generator().manual_seed(3))
    pixels = src.pixels(clips)
    assert torch.equal(C.unpack_clips(x1, C.FRAMES), pixels)
    assert torch.equal(x1[:, 64:128], C.pack_clips(pixels[:, 1:2]))  # frame-major
    ids = C.clip_ids()
    assert ids.shape == (C.FRAMES * 64, 3) and ids[64].tolist() == [1, 0, 0]
    assert ids[-1].tolist() == [C.FRAMES - 1, 7, 7]
    assert [S.PROMPTS[i] for i in i1.tolist()] == [c.prompt for c in clips]
