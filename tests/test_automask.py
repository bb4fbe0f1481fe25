"""mask="auto": found per latent cell on every image family's tiny pipeline (and a clip), the
source latents kept exactly outside it, its model calls counted; a background edit's mask covers
the background (the scenes model); knobs, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow import FireFlowEditor, automask
from fireflow.cli import main
from fireflow.settings import EditSettings, SettingError

#: One tiny pipeline per landed family (image families, and Wan for a clip's still mask).
VARIANTS = ["flux", "sd3", "flux2-klein", "chroma", "qwenimage", "wan2.1"]
EXTRA_NFE = 2 * len(automask.TIMES)


def _media(editor, rng):
    side = 32 if editor.adapter.video or editor.adapter.name == "demo" else 64
    frame = lambda: Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))  # noqa: E731
    return [frame() for _ in range(9)] if editor.adapter.video else frame()


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_masks_on_every_family(tmp_path, variant):
    from fireflow.testing import save_tiny

    editor = FireFlowEditor.from_pretrained(save_tiny(variant, tmp_path / variant), device="cpu", torch_dtype="fp32")
    a = editor.adapter
    media = _media(editor, np.random.default_rng(0))
    plain = editor.edit(media, "a cat", "a dog", num_steps=2)
    out = editor.edit(media, "a cat", "a dog", num_steps=2, mask="auto")
    # Cost: source and target velocity at each noise level, counted like the edit's own calls.
    assert out.nfe == plain.nfe + EXTRA_NFE
    calls = out.transformer_calls - plain.transformer_calls
    assert EXTRA_NFE <= calls <= 2 * EXTRA_NFE and out.transformer_rows > plain.transformer_rows
    # The found mask: binary, whole latent cells, at the model's size, and it went through the blend.
    _, latents, g, _ = editor._prepare(media, None, None)
    layout = automask.cell_layout(a, g)
    m = out.mask
    assert m.dtype == bool and m.shape == (1, g.height, g.width) and m.any()
    fy, fx = layout.factor
    blocks = m[0].reshape(layout.grid[0], fy, layout.grid[1], fx)
    assert (blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3))).all()  # constant on every cell
    found = automask.find(a, latents, g, *_embeds(editor), threshold=0.2, dilation=1)
    assert np.array_equal(found.union, m)
    lm = found.latent[0]
    assert set(lm.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(lm, torch.broadcast_to(a.latent_mask(m, g), lm.shape))
    # Per element, the latent mask agrees with its cell's verdict.
    cells = found.cells[0].flatten()[layout.index.flatten()].reshape(lm.shape).float()
    assert torch.equal(cells, lm)
    # Outside the mask the edited latents are the source's exactly (the landed blend).
    edited = editor._edit(latents, g, *_embeds(editor), editor.resolve(None, num_steps=2), mask=found.latent).latents
    keep = torch.broadcast_to(lm == 0, edited.shape[1:])
    assert keep.any() or lm.all()
    assert torch.equal(edited[0][keep], latents[0].float()[keep])


def _embeds(editor):
    e = editor._encode_prompts(["a cat", "a dog"])
    return {k: v[:1] for k, v in e.items()}, {k: v[1:] for k, v in e.items()}


@pytest.fixture(scope="module")
def scenes():
    return FireFlowEditor.from_pretrained("scenes", device="cpu")


def test_a_background_edit_masks_the_background(scenes):
    from research.bundled import scenes as S

    src = S.Scene(S.OBJECT_NAMES.index("yellow heart"), S.BACKGROUND_NAMES.index("black"), 0, 2, 2)
    image = Image.fromarray(S.to_uint8(S.composite(src)))
    out = scenes.edit(image, src.prompt, src.replace(bg=S.BACKGROUND_NAMES.index("sky blue")).prompt, mask="auto")
    background = ~S.object_mask(src, opaque=True)
    obj = S.object_mask(src, opaque=True)
    assert out.mask[0][background].mean() >= 0.9  # the background is what changes
    assert out.mask[0][obj].mean() <= 0.5  # the heart is mostly kept
    assert out.nfe == 18 + EXTRA_NFE


def test_several_targets_get_one_mask_each(scenes):
    from research.bundled import scenes as S

    src = S.Scene(S.OBJECT_NAMES.index("cat face"), S.BACKGROUND_NAMES.index("white"), 0, 3, 3)
    image = Image.fromarray(S.to_uint8(S.composite(src)))
    targets = [src.replace(obj=S.OBJECT_NAMES.index("dog face")).prompt, src.replace(bg=2).prompt]
    out = scenes.edit(image, src.prompt, targets, mask="auto")
    assert len(out.images) == 2 and out.mask.shape == (1, 32, 32)
    assert out.nfe == 9 + 2 * 9 + len(automask.TIMES) * (1 + 2)  # one inversion; source + 2 targets per level


def test_identical_prompts_select_everything():
    scores = torch.zeros(1, 4, 4)
    mask, _ = automask.threshold_cells(scores, 0.2, 1)
    assert mask.all()


def test_knobs_are_checked():
    with pytest.raises(SettingError, match="mask_threshold must be a finite number between 0 and 1"):
        EditSettings(mask_threshold=1.5).check()
    with pytest.raises(SettingError, match="mask_dilation must be between 0 and 64"):
        EditSettings(mask_dilation=-1).check()
    s = EditSettings(mask_threshold=0.3, mask_dilation=2).check()
    assert (s.mask_threshold, s.mask_dilation) == (0.3, 2)


def test_cli_mask_auto_and_save_mask(tmp_path, capsys):
    from research.bundled import scenes as S

    src = S.Scene(S.OBJECT_NAMES.index("red heart"), S.BACKGROUND_NAMES.index("white"), 0, 14, 13)
    image = tmp_path / "in.png"
    Image.fromarray(S.to_uint8(S.composite(src))).save(image)
    out, mask = tmp_path / "out.png", tmp_path / "mask.png"
    args = ["edit", str(image), "-s", src.prompt, "-t", src.replace(obj=S.OBJECT_NAMES.index("blue heart")).prompt]
    args += ["-o", str(out), "--model", "scenes", "-q"]
    assert main([*args, "--save-mask", str(mask)]) == 2
    assert "--save-mask needs --mask" in capsys.readouterr().err
    assert main([*args, "--mask", "auto", "--save-mask", str(mask), "--mask-dilation", "0"]) == 0
    assert f"{18 + EXTRA_NFE} NFE" in capsys.readouterr().out
    m = np.asarray(Image.open(mask))
    assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255} and m.any()
    got, src_px = np.asarray(Image.open(out)), np.asarray(Image.open(image))
    assert np.array_equal(got[m == 0], src_px[m == 0])  # pixel space: kept latents are kept pixels


def test_the_page_shows_the_found_mask(scenes, tmp_path):
    from fireflow.web.handlers import make_edit_fn
    from research.bundled import scenes as S

    src = S.Scene(S.OBJECT_NAMES.index("red heart"), S.BACKGROUND_NAMES.index("white"), 0, 14, 13)
    image = tmp_path / "in.png"
    Image.fromarray(S.to_uint8(S.composite(src))).save(image)
    page, _ = make_edit_fn(scenes, max_pixels=None, workdir=tmp_path)
    knobs = [8, 1, 1.0, "fireflow", "replace_v", "default", 1.0, False]
    target = src.replace(obj=S.OBJECT_NAMES.index("blue heart")).prompt
    out = page(str(image), src.prompt, target, *knobs, None, None, False, True)
    assert out[1] is not None and out[5].visible and out[5].value is not None
    assert f"{18 + EXTRA_NFE} NFE" in out[3] and "masked" in out[3]
    both = page(str(image), src.prompt, target, *knobs, None, str(image), False, True)
    assert "Auto finds the mask itself" in both[3] and both[5].visible is False


def test_mask_overlay_tints_the_mask():
    from fireflow.web.handlers import mask_overlay

    m = np.zeros((1, 4, 4), bool)
    m[0, :2] = True
    img = np.asarray(mask_overlay(Image.new("RGB", (4, 4), (0, 0, 255)), m))
    assert img.shape == (4, 4, 3) and img[0, 0, 0] > img[3, 3, 0] and img[3, 3, 2] < 255
