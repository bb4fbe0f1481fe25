"""The Qwen-Image family on a tiny random pipeline: exactness against QwenImagePipeline (true CFG
with its norm rescale), the recording processor, injection, the call counts and the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow import FireFlowEditor
from fireflow.cli import main
from fireflow.features import FeatureReuse
from fireflow.models.base import Geometry
from fireflow.models.qwenimage import QwenImageAdapter
from fireflow.models.qwenimage.processors import QwenImageFeatureProcessor
from fireflow.models.qwenimage.tiny import tiny_qwenimage_pipeline
from fireflow.solvers import VelocityCall

H = W = 32  # the tiny VAE downsamples by 4: latents [4, 8, 8], packed as 4 x 4 tokens of 16 channels
TOKENS, CHANNELS = 16, 16


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwenimage_pipeline(seed=0)


@pytest.fixture(scope="module")
def editor(pipe):
    return FireFlowEditor.from_pipe(pipe)


def _embeds(seed, length=7, pad=2, negative_length=5):
    """Random conditioning of the transformer's width, a padded positive mask, no negative padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, length, dtype=torch.long)
    mask[:, length - pad :] = 0
    return dict(
        prompt_embeds=torch.randn(1, length, 16, generator=g),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(1, negative_length, 16, generator=g),
        negative_prompt_embeds_mask=torch.ones(1, negative_length, dtype=torch.long),
    )


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        latents=torch.randn(1, TOKENS, CHANNELS, generator=g),
        **{f"source_{k}": v for k, v in _embeds(1).items()},
        **{f"target_{k}": v for k, v in _embeds(2, length=6, pad=1).items()},
    )


def _strip(inputs):
    return {k: v for k, v in inputs.items() if k != "latents"}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_registry_and_layers(pipe, editor):
    assert isinstance(editor.adapter, QwenImageAdapter)
    assert editor.adapter.vae_scale_factor == 4 and editor.adapter.multiple == 8
    assert editor.adapter.layers == {
        "transformer_blocks.0.attn": ("joint", 0),
        "transformer_blocks.1.attn": ("joint", 1),
    }
    bare = FireFlowEditor(transformer=pipe.transformer)
    assert bare.adapter.scheduler_config["max_shift"] == 0.9 and bare.adapter.vae_scale_factor == 8


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_euler_sampling_equals_the_pipeline(pipe, editor, guidance):
    noise = torch.randn(1, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(3))
    e = _embeds(4)
    if guidance == 1.0:
        e = {k: v for k, v in e.items() if not k.startswith("negative")}
    ref = pipe(
        **e,
        true_cfg_scale=guidance,
        height=H,
        width=W,
        num_inference_steps=4,
        latents=noise.clone(),
        output_type="latent",
    ).images
    ours = editor.sample_latents(noise, H, W, num_steps=4, guidance=guidance, solver="euler", **e)
    assert ours.shape == ref.shape == (1, TOKENS, CHANNELS)
    assert rel(ours, ref) <= 1e-5
    # The grid is the pipeline's: linspace sigmas, exponential dynamic shift, terminal stretch.
    sigmas = editor.adapter.timesteps(4, Geometry(H, W))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)  # shift_terminal


def _transformer_kwargs(inputs):
    return dict(
        hidden_states=inputs["latents"],
        encoder_hidden_states=inputs["source_prompt_embeds"],
        encoder_hidden_states_mask=inputs["source_prompt_embeds_mask"],
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )


def test_recording_processor_equals_the_stock_one_exactly(editor, inputs):
    kw = _transformer_kwargs(inputs)
    layers = editor.adapter.layers.values()
    with torch.no_grad():
        stock = editor.transformer(**kw)[0]
        with editor.adapter.processors.installed(layers):
            assert all(isinstance(p, QwenImageFeatureProcessor) for p in editor.transformer.attn_processors.values())
            plain = editor.transformer(**kw)[0]
            reuse = FeatureReuse(1, 1, "replace_v add_k add_q", layers)
            with reuse.recording(VelocityCall(0, "start", 0.5, 0.0, 1.0)):
                recorded = editor.transformer(**kw, attention_kwargs={"fireflow": reuse})[0]
    assert torch.equal(stock, plain) and torch.equal(stock, recorded)
    assert len(reuse._store) == 3 * len(editor.adapter.layers)  # Q, K, V of every layer
    v = next(t for key, t in reuse._store.items() if key.target == "v")
    assert v.shape == (1, 7 + TOKENS, 3, 16)  # [B, text + image, heads, head_dim]


def test_joint_sequence_is_text_then_image(editor, inputs):
    seen = {}

    def probe(block, q, k, v):
        seen[block] = v
        return q, k, v

    captured = {}
    attn = editor.transformer.transformer_blocks[0].attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    try:
        with torch.no_grad(), editor.adapter.processors.installed(editor.adapter.layers.values()):
            editor.transformer(**_transformer_kwargs(inputs), attention_kwargs={"fireflow": probe})
    finally:
        hook.remove()
    img, txt = captured["hidden_states"], captured["encoder_hidden_states"]
    v = seen[("joint", 0)]
    torch.testing.assert_close(v[:, :7], attn.add_v_proj(txt).unflatten(-1, (3, 16)))
    torch.testing.assert_close(v[:, 7:], attn.to_v(img).unflatten(-1, (3, 16)))


def test_defaults_counts_and_injections(editor, inputs):
    out = editor.edit_latents(inputs["latents"], H, W, return_dict=True, **_strip(inputs))
    s = out.settings.to_dict()
    assert s["guidance"] == 4.0 and s["inversion_guidance"] == 1.0
    # FireFlow: 9 velocity evaluations per pass (8 steps); CFG makes two forwards of one row per
    # editing evaluation (rows count batch rows per forward: 1 per latent row each time).
    assert out.nfe == 18 and out.transformer_calls == 9 + 2 * 9 and out.transformer_rows == 18
    # Every joint block, at the first denoising midpoint, in both CFG forwards.
    assert sorted(out.injections) == sorted([(0, "midpoint", ("joint", i)) for i in range(2)] * 2)


def test_inject_zero_equals_inversion_then_sampling(editor, inputs):
    edited = editor.edit_latents(inputs["latents"], H, W, inject=0, **_strip(inputs))
    src = {k[7:]: v for k, v in inputs.items() if k.startswith("source_") and "negative" not in k}
    tgt = {k[7:]: v for k, v in inputs.items() if k.startswith("target_")}
    noise = editor.invert_latents(inputs["latents"], H, W, inversion_guidance=1.0, **src)
    plain = editor.sample_latents(noise, H, W, guidance=4.0, **tgt)
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["joint:0", "joint:1"])
def test_injection_changes_the_edit(editor, inputs, spec):
    base = editor.edit_latents(inputs["latents"], H, W, inject=0, num_steps=4, **_strip(inputs))
    out = editor.edit_latents(inputs["latents"], H, W, return_dict=True, num_steps=4, blocks=spec, **_strip(inputs))
    assert {b for *_, b in out.injections} == {("joint", int(spec[-1]))}
    assert (out.latents - base).abs().max() > 1e-4


def test_missing_negatives_under_cfg_is_a_clear_error(editor, inputs):
    e = {k[7:]: v for k, v in inputs.items() if k.startswith("target_") and "negative" not in k}
    with pytest.raises(ValueError, match="guidance 4 > 1 is classifier-free guidance on Qwen-Image"):
        editor.sample_latents(inputs["latents"], H, W, guidance=4.0, **e)


def test_encode_decode_round_trip_shapes(editor):
    pixels = torch.rand(1, 1, 3, H, W) * 2 - 1
    latents = editor.adapter.encode_image(pixels)
    assert latents.shape == (1, TOKENS, CHANNELS)
    image = editor.adapter.decode(latents, Geometry(H, W))
    assert image.shape == (1, 1, 3, H, W) and image.abs().max() <= 1
    embeds = editor.adapter.encode_prompt(["a red cat", "a dog"])
    assert embeds["prompt_embeds"].shape[0] == 2 and embeds["negative_prompt_embeds_mask"].dtype == torch.long


def test_cli_edit_and_from_pretrained_on_a_tiny_folder(tmp_path, capsys):
    from fireflow.testing import save_tiny

    folder = save_tiny("qwenimage", tmp_path / "qwenimage")
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    args = ["edit", str(image), "-s", "a photo", "-t", "a painting", "-o", str(out), "--model", str(folder), "-q"]
    assert main([*args, "--steps", "3"]) == 0
    assert Image.open(out).size == (40, 32)
    assert "8 NFE" in capsys.readouterr().out
    editor = FireFlowEditor.from_pretrained(folder)
    result = editor.edit(Image.open(image), "a photo", "a painting", num_steps=2)
    assert result.image.size == (40, 32) and result.nfe == 6


def test_replaced_text_features_of_another_length_are_fitted():
    from fireflow.models.qwenimage.processors import _split

    cur = torch.randn(1, 6 + 4, 3, 16)  # 6 text tokens, 4 image tokens
    longer, shorter = torch.randn(1, 8 + 4, 3, 16), torch.randn(1, 3 + 4, 3, 16)
    text, image = _split(longer, cur, 4)
    assert torch.equal(text, longer[:, :6]) and torch.equal(image, longer[:, 8:])
    text, image = _split(shorter, cur, 4)
    assert torch.equal(text, torch.cat([shorter[:, :3], cur[:, 3:6]], 1)) and torch.equal(image, shorter[:, 3:])
