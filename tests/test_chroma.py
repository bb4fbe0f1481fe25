"""The Chroma family on a tiny random ChromaPipeline: exactness against the pipeline (true CFG as
two forwards, the T5 mask with padding), the processors of both block kinds, the injections and
their cost, and the CLI and from_pretrained on a tiny folder."""

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow import FireFlowEditor
from fireflow.cli import main
from fireflow.features import FeatureReuse
from fireflow.models.base import Geometry
from fireflow.models.chroma import ChromaAdapter
from fireflow.models.chroma.tiny import tiny_chroma_pipeline
from fireflow.models.flux.processors import FluxFeatureProcessor
from fireflow.solvers import VelocityCall

H = W = 64  # VAE latents [4, 8, 8]: 4 x 4 packed tokens of 16 channels


@pytest.fixture(scope="module")
def pipe():
    p = tiny_chroma_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def editor(pipe):
    return FireFlowEditor.from_pipe(pipe)


@pytest.fixture(scope="module")
def inputs(editor):
    e = editor.adapter.encode_prompt(["a red cat", "a blue dog"])
    return dict(
        latents=torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0)),
        **{f"source_{k}": v[:1] for k, v in e.items()},
        **{f"target_{k}": v[1:] for k, v in e.items()},
    )


def _side(inputs, side):
    return {k[len(side) + 1 :]: v for k, v in inputs.items() if k.startswith(side + "_")}


def _strip(inputs):
    return {k: v for k, v in inputs.items() if k != "latents"}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_the_family_is_registered(editor):
    assert isinstance(editor.adapter, ChromaAdapter)
    assert editor.adapter.guidance_kind == "cfg" and editor.adapter.block_counts == {"double": 1, "single": 1}
    assert editor.adapter.layers == {
        "transformer_blocks.0.attn": ("double", 0),
        "single_transformer_blocks.0.attn": ("single", 0),
    }


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_euler_sampling_equals_the_pipeline(pipe, editor, guidance):
    e = editor.adapter.encode_prompt(["a cat on a mat"])
    # The pipeline's mask: the prompt and one pad token attended to, the other pads masked out.
    mask = e["prompt_attention_mask"]
    assert mask.dtype == torch.float32 and 0 < mask.sum() < mask.shape[1] and mask[0, -1] == 0
    noise = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=guidance, output_type="latent")
    ref = pipe(**e, latents=noise.clone(), **kw).images
    ours = editor.sample_latents(noise, H, W, num_steps=4, guidance=guidance, solver="euler", **e)
    assert ref.shape == (1, 16, 16)
    assert rel(ours, ref) <= 1e-5
    # The grid is the pipeline's: linspace sigmas shifted by mu(16 tokens).
    sigmas = editor.adapter.timesteps(4, Geometry(H, W))
    assert sigmas.tolist() == pytest.approx(pipe.scheduler.sigmas.double().tolist(), abs=1e-7)


def test_a_hand_made_padded_mask_matches_the_pipeline_too(pipe, editor):
    """A float 0/1 mask with padding in the middle of the sequence, batch 2, CFG on."""
    g = torch.Generator().manual_seed(2)
    pe, ne = torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    pm = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    nm = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]] * 2, dtype=torch.float32)
    e = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne, negative_prompt_attention_mask=nm)
    noise = torch.randn(2, 16, 16, generator=g)
    ref = pipe(**e, latents=noise.clone(), height=H, width=W, num_inference_steps=4, output_type="latent").images
    ours = editor.sample_latents(noise, H, W, num_steps=4, guidance=5.0, solver="euler", **e)
    assert rel(ours, ref) <= 1e-5
    # The mask matters: all ones gives another result.
    ones = dict(e, prompt_attention_mask=torch.ones_like(pm), negative_prompt_attention_mask=torch.ones_like(nm))
    other = editor.sample_latents(noise, H, W, num_steps=4, guidance=5.0, solver="euler", **ones)
    assert rel(other, ref) > 1e-3


def _transformer_kwargs(editor, inputs):
    a = editor.adapter
    cond = a.conditioning(_side(inputs, "source"), Geometry(H, W), 1.0)
    return dict(
        hidden_states=inputs["latents"],
        encoder_hidden_states=cond.prompt_embeds,
        timestep=torch.tensor([0.5]),
        img_ids=cond.img_ids,
        txt_ids=cond.txt_ids,
        attention_mask=cond.attention_mask,
        return_dict=False,
    )


def test_recording_processors_equal_the_stock_ones_exactly(editor, inputs):
    kw = _transformer_kwargs(editor, inputs)
    layers = editor.adapter.layers.values()
    assert {kind for kind, _ in layers} == {"double", "single"}
    with torch.no_grad():
        stock = editor.transformer(**kw)[0]
        reuse = FeatureReuse(1, 1, "replace_v add_k add_q", layers)
        call = VelocityCall(0, "start", 0.5, 0.0, 1.0)
        with editor.adapter.processors.installed(layers):
            procs = editor.transformer.attn_processors.values()
            assert all(isinstance(p, FluxFeatureProcessor) for p in procs)
            plain = editor.transformer(**kw)[0]
            with reuse.recording(call):
                recorded = editor.transformer(**kw, joint_attention_kwargs={"fireflow": reuse})[0]
    assert torch.equal(stock, plain) and torch.equal(stock, recorded)
    assert len(reuse._store) == 3 * len(editor.adapter.layers)  # Q, K, V of both block kinds
    # V over the joint [text, image] sequence: 512 T5 tokens, then 16 image tokens.
    assert all(v.shape[1] == 512 + 16 for k, v in reuse._store.items() if k.target == "v")
    assert not any(isinstance(p, FluxFeatureProcessor) for p in editor.transformer.attn_processors.values())


def test_defaults_cost_and_injections(editor, inputs):
    out = editor.edit_latents(inputs["latents"], H, W, return_dict=True, **_strip(inputs))
    s = out.settings.to_dict()
    assert s["guidance"] == 2.0 and s["inversion_guidance"] == 1.0
    # FireFlow: N + 1 = 9 velocity evaluations a pass; CFG is two forwards of one row each while editing.
    assert out.nfe == 18 and out.transformer_calls == 9 + 2 * 9 and out.transformer_rows == 9 + 2 * 9
    # V in the single block, at the first denoising midpoint, in both CFG forwards.
    assert out.injections == [(0, "midpoint", ("single", 0))] * 2


def test_inject_zero_equals_inversion_then_sampling(editor, inputs):
    edited = editor.edit_latents(inputs["latents"], H, W, inject=0, **_strip(inputs))
    noise = editor.invert_latents(inputs["latents"], H, W, inversion_guidance=1.0, **_side(inputs, "source"))
    plain = editor.sample_latents(noise, H, W, guidance=2.0, **_side(inputs, "target"))
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks", ["single:0", "double:0"])
def test_injection_changes_the_edit_in_each_block_kind(editor, inputs, blocks):
    base = editor.edit_latents(inputs["latents"], H, W, inject=0, num_steps=4, **_strip(inputs))
    out = editor.edit_latents(inputs["latents"], H, W, return_dict=True, num_steps=4, blocks=blocks, **_strip(inputs))
    kind, i = blocks.split(":")
    assert {b for *_, b in out.injections} == {(kind, int(i))}
    assert (out.latents - base).abs().max() > 1e-4


def test_guided_inversion_runs(editor, inputs):
    out = editor.edit_latents(
        inputs["latents"], H, W, return_dict=True, num_steps=3, inversion_guidance=3.0, **_strip(inputs)
    )
    assert out.nfe == 8 and out.transformer_calls == 16 and out.transformer_rows == 16


def test_missing_mask_or_negatives_are_clear_errors(editor, inputs):
    src = _side(inputs, "source")
    no_mask = {k: v for k, v in src.items() if k != "prompt_attention_mask"}
    with pytest.raises(ValueError, match="Chroma needs prompt_attention_mask"):
        editor.sample_latents(inputs["latents"], H, W, guidance=1.0, **no_mask)
    positive = {k: v for k, v in src.items() if "negative" not in k}
    with pytest.raises(ValueError, match="guidance 4 > 1 is classifier-free guidance on Chroma"):
        editor.sample_latents(inputs["latents"], H, W, guidance=4.0, **positive)
    with pytest.raises(ValueError, match="chroma takes no source_pooled_prompt_embeds"):
        editor.edit_latents(inputs["latents"], H, W, source_pooled_prompt_embeds=torch.zeros(1, 32), **_strip(inputs))


def test_cli_edit_and_from_pretrained_on_a_tiny_chroma_folder(tmp_path, capsys):
    from fireflow.testing import save_tiny

    folder = save_tiny("chroma", tmp_path / "chroma")
    assert (folder / "model_index.json").is_file()
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    args = ["edit", str(image), "-s", "a photo", "-t", "a painting", "-o", str(out), "--model", str(folder), "-q"]
    assert main(args) == 0
    assert Image.open(out).size == (96, 64)
    text = capsys.readouterr().out
    assert "18 NFE" in text and "cropped or resized to 96x64" in text
    editor = FireFlowEditor.from_pretrained(folder, device="cpu")
    assert isinstance(editor.adapter, ChromaAdapter) and editor.adapter.pipe.text_encoder is not None
    result = editor.edit(Image.open(image), "a photo", "a painting", num_steps=2)
    assert result.images[0].size == (96, 64) and result.nfe == 6


def test_a_bare_transformer_gets_the_latent_api(editor, inputs):
    """The reference scheduler (FLUX.1-dev's, as the tiny pipeline's) with no pipeline around it."""
    bare = FireFlowEditor(transformer=editor.transformer)
    assert isinstance(bare.adapter, ChromaAdapter) and bare.adapter.pipe is None
    kw = dict(num_steps=3, guidance=3.0, **_side(inputs, "target"))
    torch.testing.assert_close(
        bare.sample_latents(inputs["latents"], H, W, **kw), editor.sample_latents(inputs["latents"], H, W, **kw)
    )
    with pytest.raises(ValueError, match="no text encoder"):
        bare.adapter.encode_prompt(["a cat"])
