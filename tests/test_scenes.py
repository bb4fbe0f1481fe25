"""Scenes: exact compositing, the held-out PIE-Bench-format set, and the layout metrics."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow.metrics import decode_pie_mask
from research.bundled import scenes as S
from research.bundled import scenes_eval as E


@pytest.fixture(scope="module")
def spr():
    return S.load_sprites()


@pytest.fixture(scope="module")
def cases():
    return E.load_set()


def some_scenes(n=24, seed=0, held_out=False):
    return S.draw_scenes(n, torch.Generator().manual_seed(seed), held_out=held_out)


def test_sprites_shapes_and_alpha(spr):
    for side in S.SIZES:
        assert spr.rgb[side].shape == (len(S.OBJECTS), 3, side, side)
        assert spr.alpha[side].shape == (len(S.OBJECTS), 1, side, side)
        # Premultiplied: no channel exceeds its alpha, up to Pillow's 8-bit premultiply rounding
        # (at most 7/255, on about 1% of pixels); every sprite has opaque pixels and reaches the
        # square's edge on at least one side (the glyph's bounding square).
        assert (spr.rgb[side] <= spr.alpha[side] + 7.5 / 255).all()
        a = spr.alpha[side][:, 0]
        assert (a.flatten(1).max(1).values == 1).all()
        edges = torch.stack([a[:, 0].amax(1), a[:, -1].amax(1), a[:, :, 0].amax(1), a[:, :, -1].amax(1)], 1)
        assert (edges.amax(1) > 0).all()


def test_composite_is_exact(spr):
    for sc in some_scenes():
        img = S.composite(sc, spr)
        assert img.shape == (3, S.RESOLUTION, S.RESOLUTION)
        assert torch.equal(img, (img * 255).round() / 255)  # on the 8-bit grid
        bg = (torch.tensor(S.BACKGROUNDS[sc.bg][1]) / 255)[:, None]
        touched = torch.from_numpy(S.object_mask(sc, spr))
        # Outside the mask: exactly the background colour.
        assert torch.allclose(img[:, ~touched], bg.expand(3, int((~touched).sum())), atol=1e-7)
        # Where the object is opaque: exactly the sprite (rounded to 8 bits), whatever the background.
        opaque = torch.from_numpy(S.object_mask(sc, spr, opaque=True))
        x0, y0, x1, y1 = sc.box
        sprite = torch.zeros_like(img)
        sprite[:, y0:y1, x0:x1] = spr.rgb[sc.side][sc.obj]
        assert torch.allclose(img[:, opaque], ((sprite * 255).round() / 255)[:, opaque], atol=1e-6)
        # The mask lies in the placement box, and the box is the mask's bounding square side.
        ys, xs = np.nonzero(touched.numpy())
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 == sc.side
        assert opaque.sum() > 0.1 * sc.side**2
        # The PNG's pixels are the composite's.
        assert np.array_equal(S.to_uint8(img).astype(np.float32) / 255, img.permute(1, 2, 0).numpy())


def test_prompts_name_object_and_background_never_layout():
    assert len(S.PROMPTS) == len(set(S.PROMPTS)) == len(S.OBJECTS) * len(S.BACKGROUNDS)
    sc = S.Scene(obj=7, bg=4, size=1, x=3, y=9)
    assert sc.prompt == "cat face, sky blue background" == S.PROMPTS[S.prompt_index(7, 4)]
    assert sc.replace(x=0, y=0, size=0).prompt == sc.prompt


def test_training_draws_never_held_out_and_split_is_a_tenth():
    train = some_scenes(3000, seed=1)
    assert not any(S.is_held_out(s.obj, s.bg, s.size, s.x, s.y) for s in train)
    held = some_scenes(200, seed=1, held_out=True)
    assert all(S.is_held_out(s.obj, s.bg, s.size, s.x, s.y) for s in held)
    for s in train[:200]:  # positions stay inside the canvas
        assert 0 <= s.x <= S.RESOLUTION - s.side and 0 <= s.y <= S.RESOLUTION - s.side
    # The tensor hash agrees with the integer one, and about a tenth of all scenes are held out.
    keys = [(o, b, si, x, y) for o in range(20) for b in range(6) for si in range(2) for y in range(0, 17, 4)
            for x in range(0, 11, 2)]  # fmt: skip
    cols = [torch.tensor(c) for c in zip(*keys)]
    as_tensor = S.is_held_out(*cols).tolist()
    assert as_tensor == [bool(S.is_held_out(*k)) for k in keys]
    assert 0.08 < np.mean(as_tensor) < 0.12


def test_committed_set_is_held_out_distinct_and_reproducible(cases):
    assert len(cases) == sum(E.COUNTS.values())
    sources = [c.source for c in cases]
    assert len(set(sources)) == len(sources)
    assert all(S.is_held_out(s.obj, s.bg, s.size, s.x, s.y) for s in sources)
    rebuilt = E.build_set()
    assert [(c.key, c.type_id, c.source, c.target) for c in rebuilt] == [
        (c.key, c.type_id, c.source, c.target) for c in cases
    ]
    for c in cases:
        a, b = c.source, c.target
        assert (a.size, a.x, a.y) == (b.size, b.x, b.y)  # an edit never asks to move the object
        if c.type_id == "8":
            assert a.obj == b.obj and a.bg != b.bg
        else:
            assert a.obj != b.obj and a.bg == b.bg and S.FAMILIES[a.obj] == S.FAMILIES[b.obj]
        if c.type_id == "1":
            assert {S.OBJECT_NAMES[a.obj], S.OBJECT_NAMES[b.obj]} != set(E.APPLES)
        assert S.FAMILIES[a.obj] == "hearts" or c.type_id != "6" or S.OBJECT_NAMES[a.obj] in E.APPLES


def test_committed_set_files_match_compositing(cases):
    from fireflow.bench.pie import load_pie

    items = {it.key: it for it in load_pie(E.SET_DIR)}
    mapping = json.loads((E.SET_DIR / "mapping_file.json").read_text())
    assert set(items) == {c.key for c in cases}
    for c in cases[::7]:
        it = items[c.key]
        with Image.open(E.SET_DIR / "annotation_images" / it.image_path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), S.to_uint8(S.composite(c.source)))
        assert it.source_prompt == c.source.prompt and it.target_prompt == c.target.prompt
        # RLE round trip: the decoded mask is the edit mask, plus PIE-Bench's one-pixel border.
        decoded = decode_pie_mask(it.mask, size=(S.RESOLUTION, S.RESOLUTION)).astype(bool)
        want = E.edit_mask(c).copy()
        want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = True
        assert np.array_equal(decoded, want)
        assert mapping[c.key]["blended_word"] in it.target_prompt


def test_edit_masks_cover_what_an_ideal_edit_changes(cases):
    for c in cases:
        src, ideal = S.composite(c.source), S.composite(c.target)
        changed = (src != ideal).any(0).numpy()
        mask = E.edit_mask(c)
        assert not (changed & ~mask).any(), c.key  # nothing changes outside the mask


def test_detect_recovers_exact_layout(spr):
    scenes = some_scenes(40, seed=3)
    det = E.detect(torch.stack([S.composite(s, spr) for s in scenes]), spr)
    assert [det.scene(i) for i in range(len(scenes))] == scenes


def test_box_iou_and_masked_psnr_known_values():
    a = S.Scene(0, 0, 0, 0, 0)  # 16 px square at the corner
    assert E.box_iou(a, a) == 1.0
    assert E.box_iou(a, a.replace(x=8)) == pytest.approx(128 / 384)
    assert E.box_iou(a, a.replace(x=16)) == 0.0
    assert E.box_iou(a, a.replace(size=1)) == pytest.approx(256 / 484)  # 16 inside 22
    img = torch.full((3, 32, 32), 0.5)
    keep = np.zeros((32, 32), bool)
    keep[:, :16] = True
    other = img.clone()
    other[:, :, :16] += 0.1  # MSE 0.01 on the kept half: 20 dB
    other[:, :, 16:] = 0  # outside the kept region: ignored
    assert E.masked_psnr(other, img, keep) == pytest.approx(20.0, abs=1e-4)
    assert E.masked_psnr(img, img, keep) == 100.0
    assert math.isnan(E.masked_psnr(img, img, np.zeros((32, 32), bool)))


def test_layout_metrics_of_ideal_and_unchanged_edits(cases):
    ideal = torch.stack([S.composite(c.target) for c in cases])
    summ = E.summarize(E.layout_metrics(cases, ideal))
    assert summ["overall"]["target_hit"] == 1.0
    assert summ["overall"]["object_iou"] == 1.0
    assert summ["overall"]["kept_psnr"] == 100.0 and summ["overall"]["psnr_to_ideal"] == 100.0
    unchanged = torch.stack([S.composite(c.source) for c in cases])
    summ = E.summarize(E.layout_metrics(cases, unchanged))
    assert summ["overall"]["target_hit"] == 0.0 and summ["overall"]["object_iou"] == 1.0
    assert summ["overall"]["kept_psnr"] == 100.0
    # An edit that moves the target object by 8 px keeps neither the box nor the background.
    moved = torch.stack([S.composite(c.target.replace(x=(c.target.x + 8) % (33 - c.target.side))) for c in cases])
    rows = E.layout_metrics(cases[:60], moved[:60])  # object edits
    assert all(r["target_hit"] for r in rows)
    assert np.mean([r["object_iou"] for r in rows]) < 0.7
    assert np.mean([r["kept_psnr"] for r in rows]) < 20


def test_scene_batches_are_deterministic_and_in_range():
    src = S.SceneSource()
    a, ia = src.batch(8, torch.Generator().manual_seed(5))
    b, ib = src.batch(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert a.shape == (8, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert ia.max() < len(S.PROMPTS)


def test_nfe_of_the_table_settings():
    assert E.nfe("fireflow", 8) == E.nfe("euler", 9) == 18
    assert E.nfe("midpoint", 4) == 16 and E.nfe("midpoint", 5) == 20 and E.nfe("fireflow", 15) == 32


def test_training_on_scenes_resumes_exactly(tmp_path):
    from fireflow.models.demo import transformer_config
    from research.bundled.train import TrainConfig, train

    tiny = TrainConfig(
        steps=4,
        batch_size=4,
        warmup=1,
        dataset="scenes",
        model=transformer_config(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=8),
    )
    straight = train(tmp_path / "a", tiny, device="cpu")
    assert len(straight.prompts) == len(S.PROMPTS)
    train(tmp_path / "b", tiny, until=2, device="cpu")
    resumed = train(tmp_path / "b", resume=True, device="cpu")
    assert resumed.step == straight.step == 4
    for k, a in straight.model.state_dict().items():
        assert torch.equal(a, resumed.model.state_dict()[k]), k
    assert torch.equal(straight.gen.get_state(), resumed.gen.get_state())


def test_web_gallery_of_the_scenes_model():
    pytest.importorskip("gradio")
    from fireflow import web

    found = web.default_examples(Path("/nonexistent"), "scenes")
    assert [Path(e.image).stem for e in found] == list(web.SCENE_GALLERY)
    by_key = {c.key: c for c in E.example_cases()}
    for e in found:
        c = by_key[Path(e.image).stem]
        assert (e.source, e.target) == (c.source.prompt, c.target.prompt)
        with Image.open(e.image) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), S.to_uint8(S.composite(c.source)))
