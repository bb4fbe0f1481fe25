"""The FLUX.1 family and the loader on a tiny random pipeline written by fireflow.testing."""

import numpy as np
import pytest
import torch

from fireflow import FireFlowEditor
from fireflow.models import ModelNotFoundError
from fireflow.models._pipeline import resolve_model_path, shift_mu
from fireflow.models.base import Geometry
from fireflow.models.flux import FLUX_DEV_SCHEDULER, grid_ids, pack, unpack


def test_pack_unpack_round_trip():
    x = torch.randn(2, 4, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 16)
    # Token (row 1, col 2) holds channels then the 2x2 offsets of latent pixels (2..3, 4..5).
    assert torch.equal(tokens[0, 1 * 4 + 2].view(4, 2, 2), x[0, :, 2:4, 4:6])
    assert torch.equal(unpack(tokens, 6, 8), x)
    assert grid_ids(2, 3).tolist() == [[0, r, c] for r in range(2) for c in range(3)]


def test_crop_to_multiple_of_16(tiny_editor, boy_jpg):
    from PIL import Image

    adapter = tiny_editor.adapter
    assert adapter.prepare_image(Image.new("RGB", (1001, 777))).size == (992, 768)
    assert adapter.prepare_image(Image.new("RGB", (1001, 777)), resize=(512, 300)).size == (512, 288)
    with pytest.raises(ValueError, match="smaller than the model's minimum 16x16"):
        adapter.prepare_image(Image.new("RGB", (15, 40)))


def test_vae_uses_posterior_mean_with_scale_and_shift(tiny_editor):
    adapter = tiny_editor.adapter
    vae = adapter.pipe.vae
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    latents = adapter.encode_image(x[:, None])
    assert latents.shape == (1, 2 * 3, 16) and latents.dtype == torch.float32
    assert torch.equal(latents, adapter.encode_image(x[:, None]))  # deterministic: no posterior sampling
    mean = vae.encode(x).latent_dist.mean
    expected = pack((mean - vae.config.shift_factor) * vae.config.scaling_factor)
    torch.testing.assert_close(latents, expected)
    assert adapter.decode(latents, Geometry(32, 48))[:, 0].shape == (1, 3, 32, 48)


def test_prompt_encoding_shapes(tiny_editor):
    e = tiny_editor.adapter.encode_prompt(["a cat", "a dog on grass"])
    embeds, pooled = e["prompt_embeds"], e["pooled_prompt_embeds"]
    assert embeds.shape == (2, 512, 32) and pooled.shape == (2, 32)
    assert (embeds[0] - embeds[1]).abs().max() > 0 and (pooled[0] - pooled[1]).abs().max() > 0


def test_grid_uses_flux_shift(tiny_editor):
    ts = tiny_editor.adapter.timesteps(8, Geometry(512, 512))
    assert ts.tolist() == pytest.approx([1, 0.9293, 0.8492, 0.7578, 0.6525, 0.5298, 0.3849, 0.2115, 0], abs=5e-5)
    cfg = FLUX_DEV_SCHEDULER
    assert shift_mu(1024, cfg) == pytest.approx(0.63, abs=1e-3)
    assert shift_mu(256, cfg) == pytest.approx(0.5) and shift_mu(4096, cfg) == pytest.approx(1.15)
    assert shift_mu(8192, cfg) == pytest.approx(1.15 + 0.65 / 3840 * 4096)  # extrapolated linearly


def test_image_edit_on_real_photo(tiny_editor, boy_jpg):
    out = tiny_editor.edit(boy_jpg, "a boy", ["a boy and a dog", "a boy alone"], resize=(340, 192), reconstruction=True)
    assert out.source.size == (336, 192)
    assert [im.size for im in out.images] == [(336, 192)] * 2
    assert out.reconstruction.size == (336, 192)
    assert out.nfe == 9 + 2 * 9 + 9
    assert len(out.injections) == 2  # 2 single blocks x the first midpoint call
    a, b = (np.asarray(im, dtype=np.int16) for im in out.images)
    assert np.abs(a - b).max() > 0


def test_reconstruct_invert_generate(tiny_editor):
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    rec = tiny_editor.reconstruct(img, "noise", num_steps=4, solver="midpoint")
    assert rec.nfe == 16 and rec.image.size == (64, 48)
    inv = tiny_editor.invert(img, "noise", num_steps=4)
    assert inv.nfe == 5 and inv.latents.shape == (1, 12, 16)
    gen = tiny_editor.generate("a cat", height=48, width=64, num_steps=3, solver="euler", seed=7)
    again = tiny_editor.generate("a cat", height=48, width=64, num_steps=3, solver="euler", seed=7)
    assert gen.nfe == 3 and gen.image.size == (64, 48)
    assert np.array_equal(np.asarray(gen.image), np.asarray(again.image))


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache at .*HF_HUB_OFFLINE is set"):
        resolve_model_path("black-forest-labs/FLUX.1-dev")
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model_path(tmp_path / "nope")


def test_loads_from_hf_cache_layout(tiny_flux_dir, tmp_path, monkeypatch):
    """A repo id resolves to a snapshot in the HF cache, as real FLUX weights do."""
    import shutil

    import huggingface_hub.constants as c

    snap = tmp_path / "hub" / "models--acme--tiny-flux" / "snapshots" / "abc123"
    shutil.copytree(tiny_flux_dir, snap)
    (tmp_path / "hub" / "models--acme--tiny-flux" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-flux" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("acme/tiny-flux") == snap
    editor = FireFlowEditor.from_pretrained("acme/tiny-flux", device="cpu")
    assert editor.model_name == "flux" and editor.transformer.config.num_single_layers == 2


@pytest.mark.parametrize("schnell", [False, True], ids=["dev-config", "schnell-config"])
def test_euler_sampling_equals_flux_pipeline(schnell):
    """The ground truth: FluxPipeline(output_type="latent") with the same weights, noise and
    embeddings. The schnell config (no dynamic shifting, shift 1) sits in a folder not named so."""
    from fireflow.models.flux.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0, schnell=schnell)
    editor = FireFlowEditor.from_pipe(pipe)
    pe, pooled, _ = pipe.encode_prompt("a cat", prompt_2=None, device="cpu", max_sequence_length=64)
    noise = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(3))  # 48x64 pixels
    ref = pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        latents=noise.clone(),
        height=48,
        width=64,
        num_inference_steps=6,
        guidance_scale=3.5,
        output_type="latent",
    ).images
    ours = editor.sample_latents(
        noise, 48, 64, num_steps=6, guidance=3.5, solver="euler", prompt_embeds=pe, pooled_prompt_embeds=pooled
    )
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5
    linear = [1 - i / 6 for i in range(7)]
    grid = editor.adapter.timesteps(6, Geometry(48, 64)).tolist()
    assert (grid == pytest.approx(linear, abs=1e-6)) == schnell  # schnell: unshifted; dev: shifted


def test_mask_keeps_source_latents_and_pixels(tiny_editor):
    img = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[:20, :24] = True  # covers tokens (0..1, 0..1): rows 0-31 of pixels are 2 token rows
    out = tiny_editor.edit(img, "noise", "a red cat", mask=mask, num_steps=4)
    src = tiny_editor.adapter.encode_image(torch.from_numpy(img).permute(2, 0, 1)[None].float()[:, None] / 127.5 - 1)
    latent_mask = tiny_editor.adapter.latent_mask(mask, Geometry(48, 64))
    # Per VAE latent cell (8x8 pixels): rows 0-2 and columns 0-2 of the 6x8 cells, packed like the tokens.
    cells = torch.zeros(1, 4, 6, 8)
    cells[..., :3, :3] = 1
    assert latent_mask.shape == (12, 16) and torch.equal(latent_mask, pack(cells)[0])
    keep = latent_mask == 0
    assert torch.equal(out.latents[0][keep], src[0][keep])
    assert (out.latents[0][~keep] - src[0][~keep]).abs().max() > 1e-3
    assert out.nfe == 10  # no extra model calls
    pasted = tiny_editor.edit(img, "noise", "a red cat", mask=mask, paste_pixels=True, num_steps=4)
    got = np.asarray(pasted.image)
    assert np.array_equal(got[~mask], img[~mask])
    assert np.abs(got[mask].astype(int) - img[mask]).max() > 0
    # Masks of another size are resized; bad ones are one clear error.
    small = tiny_editor.edit(img, "noise", "a red cat", mask=mask[::4, ::4], num_steps=4)
    assert torch.equal(small.latents, out.latents)
    for bad, message in [
        (np.zeros((48, 64), bool), "mask selects nothing"),
        (np.zeros((2, 3, 4)), "is not a mask"),
        (np.full((4, 4), np.nan), "NaN"),
        ("no-such-mask.png", "not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_editor.edit(img, "noise", "a red cat", mask=bad, num_steps=2)
    with pytest.raises(ValueError, match="paste_pixels needs a mask"):
        tiny_editor.edit(img, "noise", "a red cat", paste_pixels=True)


def test_from_pipe_shares_the_pipeline(tiny_editor):
    editor = FireFlowEditor.from_pipe(tiny_editor.adapter.pipe)
    assert editor.transformer is tiny_editor.transformer and editor.model_name == "flux"
    with pytest.raises(ValueError, match="StableDiffusionPipeline is not a supported model"):
        FireFlowEditor.from_pipe(type("StableDiffusionPipeline", (), {})())
