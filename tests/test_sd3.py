"""The SD3 / SD3.5 family on tiny random pipelines: exactness against StableDiffusion3Pipeline,
the processors, the CFG halves, the defaults, masks and the CLI."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow import FireFlowEditor
from fireflow.cli import main
from fireflow.features import FeatureReuse, _fit
from fireflow.models.base import Geometry
from fireflow.models.sd3.processors import SD3FeatureProcessor
from fireflow.models.sd3.tiny import tiny_sd3_pipeline
from fireflow.solvers import VelocityCall

H = W = 64  # latents [4, 8, 8]: 4 x 4 tokens of 2 x 2 latent cells


@pytest.fixture(scope="module", params=[False, True], ids=["sd3", "sd3.5"])
def pipe(request):
    return tiny_sd3_pipeline(seed=0, sd35=request.param)


@pytest.fixture(scope="module")
def editor(pipe):
    return FireFlowEditor.from_pipe(pipe)


def _embeds(pipe, prompt):
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=True, negative_prompt=""
    )
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, (pe, npe, ppe, nppe)))


@pytest.fixture(scope="module")
def inputs(pipe):
    g = torch.Generator().manual_seed(0)
    src, tgt = _embeds(pipe, "a red cat"), _embeds(pipe, "a blue dog")
    return dict(
        latents=torch.randn(1, 4, 8, 8, generator=g),
        **{f"source_{k}": v for k, v in src.items()},
        **{f"target_{k}": v for k, v in tgt.items()},
    )


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_euler_sampling_equals_the_pipeline(pipe, editor, guidance):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    e = _embeds(pipe, "a cat on a mat")
    ref = pipe(**e, latents=noise.clone(), num_inference_steps=6, guidance_scale=guidance, output_type="latent").images
    ours = editor.sample_latents(noise, num_steps=6, guidance=guidance, solver="euler", **e)
    assert rel(ours, ref) <= 1e-5
    # The grid is the pipeline's: static shift 3 on set_timesteps(N).
    sigmas = editor.adapter.timesteps(6, Geometry(H, W))
    pipe.scheduler.set_timesteps(6)
    assert sigmas.tolist() == pytest.approx(pipe.scheduler.sigmas.double().tolist(), abs=1e-7)


def test_layers_and_attn2_have_their_own_processors(pipe, editor):
    layers = editor.adapter.layers
    assert layers["transformer_blocks.0.attn"] == ("joint", 0)
    assert ("attn2", 0) in layers.values() if pipe.transformer.config.dual_attention_layers else True
    with editor.adapter.processors.installed(layers.values()):
        procs = editor.transformer.attn_processors
        assert all(isinstance(p, SD3FeatureProcessor) for p in procs.values())
        assert len({id(p) for p in procs.values()}) == len(procs)  # one instance per layer
        assert {p.block for p in procs.values()} == set(layers.values())
    assert not any(isinstance(p, SD3FeatureProcessor) for p in editor.transformer.attn_processors.values())


def test_recording_processors_equal_the_stock_ones_exactly(pipe, editor, inputs):
    x = inputs["latents"]
    kw = dict(
        hidden_states=x,
        encoder_hidden_states=inputs["source_prompt_embeds"],
        pooled_projections=inputs["source_pooled_prompt_embeds"],
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )
    with torch.no_grad():
        stock = editor.transformer(**kw)[0]
        reuse = FeatureReuse(1, 1, "replace_v add_k add_q", editor.adapter.layers.values())
        call = VelocityCall(0, "start", 0.5, 0.0, 1.0)
        with editor.adapter.processors.installed(editor.adapter.layers.values()), reuse.recording(call):
            recorded = editor.transformer(**kw, joint_attention_kwargs={"fireflow": reuse})[0]
    assert torch.equal(stock, recorded)
    assert len(reuse._store) == 3 * len(editor.adapter.layers)  # Q, K, V of every layer


def test_joint_sequence_is_image_then_text(pipe, editor, inputs):
    """V as the processor hands it over: image tokens first, then text; attn2 image tokens only."""
    seen = {}

    class Probe:
        def __call__(self, block, q, k, v):
            seen[block] = v
            return q, k, v

    captured = {}
    attn = editor.transformer.transformer_blocks[0].attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    try:
        with torch.no_grad(), editor.adapter.processors.installed(editor.adapter.layers.values()):
            editor.transformer(
                hidden_states=inputs["latents"],
                encoder_hidden_states=inputs["source_prompt_embeds"],
                pooled_projections=inputs["source_pooled_prompt_embeds"],
                timestep=torch.tensor([500.0]),
                joint_attention_kwargs={"fireflow": Probe()},
                return_dict=False,
            )
    finally:
        hook.remove()
    img, txt = captured["hidden_states"], captured["encoder_hidden_states"]
    heads = attn.heads
    v_img = attn.to_v(img).view(1, -1, heads, 8).transpose(1, 2)
    v_txt = attn.add_v_proj(txt).view(1, -1, heads, 8).transpose(1, 2)
    v = seen[("joint", 0)]
    assert v.shape[2] == img.shape[1] + txt.shape[1] == 16 + 333
    torch.testing.assert_close(v[:, :, :16], v_img)
    torch.testing.assert_close(v[:, :, 16:], v_txt)
    if ("attn2", 0) in seen:
        assert seen[("attn2", 0)].shape[2] == 16


def test_defaults_inject_in_the_documented_calls(editor, inputs):
    out = editor.edit_latents(inputs["latents"], return_dict=True, **_strip(inputs))
    n = editor.transformer.config.num_layers
    # V in every joint block but the context_pre_only last one, at the first denoising midpoint.
    assert out.injections == [(0, "midpoint", ("joint", i)) for i in range(n - 1)]
    assert out.settings.to_dict()["guidance"] == 2.0 and out.settings.to_dict()["inversion_guidance"] == 1.0
    # FireFlow: 9 velocity evaluations per pass; CFG doubles the rows of the editing calls only.
    assert out.nfe == 18 and out.transformer_calls == 18 and out.transformer_rows == 9 + 2 * 9


def _strip(inputs):
    return {k: v for k, v in inputs.items() if k != "latents"}


def test_inject_zero_equals_inversion_then_sampling(editor, inputs):
    edited = editor.edit_latents(inputs["latents"], inject=0, **_strip(inputs))
    src = {k[7:]: v for k, v in inputs.items() if k.startswith("source_")}
    tgt = {k[7:]: v for k, v in inputs.items() if k.startswith("target_")}
    noise = editor.invert_latents(inputs["latents"], inversion_guidance=1.0, **src)
    plain = editor.sample_latents(noise, guidance=2.0, **tgt)
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


def test_injection_changes_the_output_in_each_block_kind(pipe, editor, inputs):
    base = editor.edit_latents(inputs["latents"], inject=0, num_steps=4, **_strip(inputs))
    last = pipe.transformer.config.num_layers - 1
    specs = [f"joint:{last}", "joint:0"] + (["attn2:0"] if pipe.transformer.config.dual_attention_layers else [])
    for spec in specs:
        out = editor.edit_latents(inputs["latents"], return_dict=True, num_steps=4, blocks=spec, **_strip(inputs))
        kind, i = spec.split(":")
        assert {b for *_, b in out.injections} == {(kind, int(i))}
        assert (out.latents - base).abs().max() > 1e-4, spec  # the context_pre_only block too


def test_cfg_halves_get_the_source_features():
    stored = torch.randn(1, 2, 5, 3)
    both = _fit(stored, torch.zeros(2, 2, 5, 3))  # an unguided inversion, a CFG edit
    assert torch.equal(both[0], stored[0]) and torch.equal(both[1], stored[0])
    guided = torch.randn(2, 2, 5, 3)  # [negative, positive] from a CFG inversion, an unguided edit
    assert torch.equal(_fit(guided, torch.zeros(1, 2, 5, 3)), guided[1:])
    assert torch.equal(_fit(guided, torch.zeros(2, 2, 5, 3)), guided)


def test_guided_inversion_and_unguided_edit_run(editor, inputs):
    kw = dict(num_steps=3, inversion_guidance=3.0, guidance=1.0)
    out = editor.edit_latents(inputs["latents"], return_dict=True, **kw, **_strip(inputs))
    assert out.transformer_rows == 2 * 4 + 4 and len(out.injections) == editor.transformer.config.num_layers - 1


def test_mask_keeps_the_source_latents_exactly(editor, inputs):
    mask = np.zeros((H, W), bool)
    mask[:30, :30] = True  # latent cells (8 x 8 pixels) 0..3 x 0..3
    latent_mask = editor.adapter.latent_mask(mask, Geometry(H, W))
    assert latent_mask.shape == (1, 8, 8) and latent_mask.sum() == 16 and latent_mask[0, :4, :4].all()
    out = editor.edit_latents(inputs["latents"], mask=latent_mask, **_strip(inputs))
    free = editor.edit_latents(inputs["latents"], **_strip(inputs))
    src = inputs["latents"]
    assert torch.equal(out[..., 4:, :], src[..., 4:, :]) and torch.equal(out[..., :, 4:], src[..., :, 4:])
    assert (out[..., :4, :4] - src[..., :4, :4]).abs().max() > 1e-3  # inside, the edit happened
    assert (free[..., 4:, :] - src[..., 4:, :]).abs().max() > 1e-3  # unmasked, the background drifts


def test_missing_negatives_under_cfg_is_a_clear_error(editor, inputs):
    e = {k[7:]: v for k, v in inputs.items() if k.startswith("target_") and "negative" not in k}
    with pytest.raises(ValueError, match="guidance 4 > 1 is classifier-free guidance on SD3"):
        editor.sample_latents(inputs["latents"], guidance=4.0, **e)
    with pytest.raises(ValueError, match="sd3 takes no source_guidance_embeds"):
        editor.edit_latents(inputs["latents"], source_guidance_embeds=torch.zeros(1), **_strip(inputs))


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_cli_edit_generate_reconstruct_on_a_tiny_sd3_folder(tmp_path, variant, capsys):
    from fireflow.testing import save_tiny

    folder = save_tiny(variant, tmp_path / variant)
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    mask = tmp_path / "mask.png"
    Image.new("L", (100, 70), 0).save(mask)
    Image.new("L", (40, 40), 255).save(tmp_path / "white.png")
    m = Image.open(mask)
    m.paste(255, (0, 0, 50, 35))
    m.save(mask)
    common = ["--model", str(folder), "-q"]
    assert main(["edit", str(image), "-s", "a photo", "-t", "a painting", "-o", str(out), *common]) == 0
    assert Image.open(out).size == (96, 64)
    text = capsys.readouterr().out
    assert "18 NFE" in text and "2 block calls injected" in text and "cropped or resized to 96x64" in text
    masked = tmp_path / "masked.png"
    args = ["edit", str(image), "-s", "a photo", "-t", "a painting", "-o", str(masked), "--mask", str(mask)]
    assert main([*args, "--paste-pixels", *common]) == 0
    got, src = np.asarray(Image.open(masked)), np.asarray(Image.open(image))[:64, :96]
    keep = np.asarray(Image.open(mask))[:64, :96] < 128
    assert np.array_equal(got[keep], src[keep])  # pixel paste: the background is the source's
    assert np.abs(got[~keep].astype(int) - src[~keep]).max() > 0
    gen = tmp_path / "gen.png"
    assert main(["generate", "-p", "a cat", "--height", "48", "--width", "64", "-o", str(gen), *common]) == 0
    assert Image.open(gen).size == (64, 48)
    assert main(["generate", "-p", "a cat", "--height", "17", "-o", str(gen), *common]) == 2
    assert "--height 17 is not accepted; this model takes multiples of 16" in capsys.readouterr().err
    rec = tmp_path / "rec.png"
    assert main(["reconstruct", str(image), "-p", "a photo", "-o", str(rec), "--steps", "3", *common]) == 0
    assert "8 NFE" in capsys.readouterr().out
    assert os.path.exists(rec)


def test_bench_pie_and_the_web_handler_run_on_sd3(tmp_path):
    pytest.importorskip("gradio")
    from fireflow.bench import pie
    from fireflow.bench._editing import edit_fn
    from fireflow.bench.synthetic import make_synthetic_pie
    from fireflow.web import make_edit_fn

    editor = FireFlowEditor.from_pipe(tiny_sd3_pipeline(seed=1, sd35=True))
    data = make_synthetic_pie(tmp_path / "pie", per_type=1, size=64)
    settings = {"num_steps": 2}
    counts = pie.run_pie(
        data, tmp_path / "out", edit_fn(editor, settings), settings, "tiny-sd3.5", {"1"}, progress=False
    )
    assert counts["edited"] == 1 and counts["merged"] == 1
    rec = (tmp_path / "out" / pie.MERGED).read_text()
    assert '"nfe": 6' in rec  # 2 steps: 3 velocity evaluations a pass
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    (tmp_path / "web").mkdir()
    _, api = make_edit_fn(editor, max_pixels=256 * 256, workdir=tmp_path / "web")
    result = api(str(image), "a photo", "a painting", 2, 1, 2.0, "fireflow", "replace_v", "default", 1.0, False)
    source, edited = result[0], result[1]
    assert source.size == edited.size == (64, 64) and "6 NFE" in result[3]
