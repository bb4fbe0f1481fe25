"""The FLUX.2 family on tiny random [dev], [klein] base and [klein] distilled pipelines: exactness
against Flux2Pipeline and Flux2KleinPipeline, the grid, the latent layout, the processors of both
block kinds, the defaults, and every front end (CLI edit / reconstruct / generate, bench pie, web)."""

from __future__ import annotations

import copy
import importlib.util
import socket
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from fireflow import FireFlowEditor
from fireflow.cli import main
from fireflow.features import FeatureReuse
from fireflow.models.base import Geometry
from fireflow.models.flux2 import (
    FEW_STEP_WARNING,
    Flux2Adapter,
    empirical_mu,
    image_ids,
    pack,
    patchify,
    text_ids,
    v_store_bytes,
)
from fireflow.models.flux2.processors import Bounded, Flux2DoubleProcessor, Flux2SingleProcessor
from fireflow.models.flux2.tiny import tiny_flux2_pipeline
from fireflow.solvers import VelocityCall

# Flux2Pipeline first ships in diffusers 0.36, Flux2KleinPipeline in 0.37: below that the tiny pipelines
# cannot be built, and the lowest-versions CI step (.ci/lowest.sh, at diffusers' floor) skips this file.
if not hasattr(diffusers, "Flux2KleinPipeline"):
    pytest.skip("FLUX.2 needs diffusers >= 0.37 (Flux2KleinPipeline)", allow_module_level=True)

H, W = 48, 64  # 3 x 4 tokens: rows and columns differ, so a transposed layout would show
VARIANTS = ["flux2-dev", "flux2-klein", "flux2-klein-distilled"]


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for v in VARIANTS:
        pipe = tiny_flux2_pipeline(seed=0, variant=v)
        pipe.set_progress_bar_config(disable=True)
        out[v] = pipe
    return out


@pytest.fixture(scope="module")
def editors(pipes):
    return {v: FireFlowEditor.from_pipe(p) for v, p in pipes.items()}


@pytest.fixture(scope="module")
def embeds(editors):
    """Source and target conditioning by the adapters' own encode_prompt (the pipelines')."""
    out = {}
    for v, ed in editors.items():
        e = ed.adapter.encode_prompt(["a red cat", "a blue dog"])
        out[v] = {**{f"source_{k}": x[:1] for k, x in e.items()}, **{f"target_{k}": x[1:] for k, x in e.items()}}
    return out


def _side(e: dict, side: str) -> dict:
    return {k[len(side) + 1 :]: x for k, x in e.items() if k.startswith(side + "_")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def noise(seed: int = 1) -> torch.Tensor:
    """Noise in the pipelines' ``latents=`` layout ``[1, 128-like, h, w]``."""
    return torch.randn(1, 16, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def latents(seed: int = 0) -> torch.Tensor:
    return pack(noise(seed))


# ---- variants, conditioning and the grid --------------------------------------------------------
def test_variants_come_from_the_pipeline_and_its_config(editors):
    a = {v: ed.adapter for v, ed in editors.items()}
    assert {v: x.name for v, x in a.items()} == {v: v for v in VARIANTS}
    assert [a[v].guidance_kind for v in VARIANTS] == ["embedded", "cfg", "none"]
    assert a["flux2-klein"].embed_names == ("prompt_embeds", "negative_prompt_embeds")
    assert a["flux2-dev"].embed_names == a["flux2-klein-distilled"].embed_names == ("prompt_embeds",)  # no pooled
    assert all(x.block_counts == {"double": 2, "single": 2} for x in a.values())
    assert [a[v].few_step for v in VARIANTS] == [False, False, True]
    assert all(x.multiple == 16 and x.latent_shape(Geometry(H, W)) == (12, 16) for x in a.values())
    # A bare transformer: [dev]'s guidance input, or [klein] base's CFG without one.
    bare = {v: FireFlowEditor(transformer=editors[v].transformer).adapter for v in ("flux2-dev", "flux2-klein")}
    assert all(isinstance(x, Flux2Adapter) for x in bare.values())
    assert [x.guidance_kind for x in bare.values()] == ["embedded", "cfg"]


def test_conditioning_is_the_pipelines(pipes, editors, embeds):
    for v, pipe in pipes.items():
        e = _side(embeds[v], "source")
        pe, ids = pipe.encode_prompt("a red cat", device="cpu")
        torch.testing.assert_close(e["prompt_embeds"], pe, rtol=0, atol=0)
        assert pe.shape[1] == 512  # padded to the pipelines' 512 tokens
        torch.testing.assert_close(text_ids(512), ids[0])
        if "negative_prompt_embeds" in e:
            neg, _ = pipe.encode_prompt("", device="cpu")
            assert torch.equal(e["negative_prompt_embeds"], neg)
        z = torch.zeros(1, 16, H // 16, W // 16)
        assert torch.equal(image_ids(H // 16, W // 16), pipe._prepare_latent_ids(z)[0])


def test_mu_and_grid_are_the_pipelines(pipes, editors):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    for seq in (12, 256, 1024, 4096, 4300, 4301, 8192):
        for n in (1, 4, 8, 28, 50):
            assert empirical_mu(seq, n) == pytest.approx(compute_empirical_mu(seq, n), rel=1e-12, abs=1e-12)
    assert empirical_mu(4096, 4) == pytest.approx(2.29, abs=0.01)
    assert empirical_mu(4096, 28) == pytest.approx(2.15, abs=0.01)
    pipe, adapter = pipes["flux2-klein"], editors["flux2-klein"].adapter
    for h, w, n in ((H, W, 2), (H, W, 8), (1024, 1024, 4), (1024, 1024, 28), (1536, 1536, 8)):
        seq = (h // 16) * (w // 16)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(seq, n))
        ours = adapter.timesteps(n, Geometry(h, w))
        assert len(ours) == n + 1 and ours[-1] == 0
        assert ours.tolist() == pytest.approx(pipe.scheduler.sigmas.double().tolist(), abs=1e-7)
    # mu depends on N: the 8-step grid is not a subset of the 28-step one, so each pass uses its own N.
    g8, g28 = adapter.timesteps(8, Geometry(1024, 1024)), adapter.timesteps(28, Geometry(1024, 1024))
    assert not any(abs(g8[4].item() - x) < 1e-4 for x in g28.tolist())


def test_the_scheduler_config_decides_the_rest(pipes, embeds):
    """A config without dynamic shifting ignores mu, in the pipeline and here alike."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    parts = {k: getattr(pipes["flux2-dev"], k) for k in ("vae", "text_encoder", "tokenizer", "transformer")}
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=2.0), **parts)
    pipe.set_progress_bar_config(disable=True)
    ed = FireFlowEditor.from_pipe(pipe)
    grid = ed.adapter.timesteps(4, Geometry(H, W))
    sigmas = np.linspace(1.0, 1 / 4, 4)
    assert grid[:-1].tolist() == pytest.approx((2 * sigmas / (1 + sigmas)).tolist(), abs=1e-7)  # static shift 2
    e = _side(embeds["flux2-dev"], "target")
    kwargs = dict(num_inference_steps=4, output_type="latent", height=H, width=W)
    ref = pipe(prompt_embeds=e["prompt_embeds"], latents=noise(), **kwargs).images
    ours = ed.sample_latents(pack(noise()), H, W, num_steps=4, solver="euler", **e)
    assert rel(ours, ref) <= 1e-6


# ---- the latent layout ----------------------------------------------------------------------------
def test_vae_encoding_is_the_pipelines_mode_patchify_and_batchnorm(pipes, editors):
    pipe, adapter = pipes["flux2-klein"], editors["flux2-klein"].adapter
    assert not torch.allclose(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))
    assert not hasattr(pipe.vae.config, "scaling_factor")
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        theirs = pipe._pack_latents(pipe._encode_vae_image(x, generator=None))
        ours = adapter.encode_image(x[:, None])
        assert ours.shape == (1, 12, 16)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        # Deterministic (the mode), and the inverse layout gives back the VAE's own latents.
        assert torch.equal(adapter.encode_image(x[:, None]), ours)
        z = pipe.vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(adapter.vae_latents(ours, Geometry(H, W)), z, rtol=1e-5, atol=1e-5)
        assert torch.equal(patchify(z), pipe._patchify_latents(z))
        image = adapter.decode(ours, Geometry(H, W))[:, 0]
        assert image.shape == (1, 3, H, W)
        torch.testing.assert_close(image, pipe.vae.decode(z).sample, rtol=1e-4, atol=1e-4)


# ---- exactness against the pipelines ------------------------------------------------------------
@pytest.mark.parametrize(
    "variant, guidance",
    [
        ("flux2-dev", 4.0),
        ("flux2-dev", 1.0),
        ("flux2-klein", 4.0),
        ("flux2-klein", 1.0),
        ("flux2-klein-distilled", 1.0),
    ],
)
def test_euler_sampling_equals_the_pipeline(pipes, editors, embeds, variant, guidance):
    pipe, ed = pipes[variant], editors[variant]
    e = _side(embeds[variant], "target")
    kwargs = dict(num_inference_steps=5, guidance_scale=guidance, output_type="latent", height=H, width=W)
    if "negative_prompt_embeds" in e:
        kwargs["negative_prompt_embeds"] = e["negative_prompt_embeds"]
    ref = pipe(prompt_embeds=e["prompt_embeds"], latents=noise(), **kwargs).images
    # The pipeline's own layouts both ways: ``latents=`` takes [B, 128, H/16, W/16]; the output is
    # packed tokens for [dev] and the VAE's own latents for [klein]. No height/width needed.
    ours = ed.sample_latents(noise(), num_steps=5, guidance=guidance, solver="euler", **e)
    assert ours.shape == ref.shape
    packed = ed.sample_latents(pack(noise()), H, W, num_steps=5, guidance=guidance, solver="euler", **e)
    assert torch.equal(packed, ours)  # packed tokens are accepted too
    err = rel(ours, ref)
    print(f"{variant} guidance {guidance:g}: relative error {err:.2e}")
    assert err <= 1e-5


def test_cfg_in_two_forwards_equals_the_batched_one(editors, embeds):
    ed = editors["flux2-klein"]
    e = _side(embeds["flux2-klein"], "target")
    batched = ed.adapter.conditioning(e, Geometry(H, W), 3.0)
    assert (batched.forwards, batched.rows) == (1, 2)
    separate = copy.copy(batched)
    separate.forwards = 2
    x = latents()
    with torch.no_grad():
        a, b = ed.adapter.velocity(x, 0.7, batched), ed.adapter.velocity(x, 0.7, separate)
    assert rel(a, b) < 1e-6


# ---- the processors -----------------------------------------------------------------------------
def _forward(transformer, e, x=None, ids=None, **kw):
    x = latents() if x is None else x
    with torch.no_grad():
        return transformer(
            hidden_states=x,
            encoder_hidden_states=e["prompt_embeds"],
            timestep=torch.tensor([0.6]),
            img_ids=image_ids(H // 16, W // 16) if ids is None else ids,
            txt_ids=text_ids(e["prompt_embeds"].shape[1]),
            guidance=torch.tensor([2.0]) if transformer.config.guidance_embeds else None,
            return_dict=False,
            **kw,
        )[0]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_recording_processors_equal_the_stock_ones_exactly(pipes, embeds, fused):
    transformer = copy.deepcopy(pipes["flux2-dev"].transformer)
    if fused:
        transformer.fuse_qkv_projections()
        assert transformer.transformer_blocks[0].attn.fused_projections
    adapter = Flux2Adapter(transformer)
    e = _side(embeds["flux2-dev"], "source")
    stock = _forward(transformer, e)
    layers = adapter.layers.values()
    reuse = FeatureReuse(1, 1, "replace_v add_k add_q", layers)
    with adapter.processors.installed(layers):
        procs = transformer.attn_processors
        assert {type(p) for p in procs.values()} == {Flux2DoubleProcessor, Flux2SingleProcessor}
        assert all(isinstance(p, Flux2SingleProcessor) == (p.block[0] == "single") for p in procs.values())
        plain = _forward(transformer, e)
        with reuse.recording(VelocityCall(0, "start", 0.6, 0.0, 1.0)):
            recorded = _forward(transformer, e, joint_attention_kwargs={"fireflow": Bounded(reuse, 512 + 12)})
    assert torch.equal(stock, plain) and torch.equal(stock, recorded)
    assert len(reuse._store) == 3 * len(adapter.layers)  # Q, K and V of every block of both kinds


def test_v_is_taken_after_the_qk_norm_and_before_rope(pipes, embeds):
    transformer = pipes["flux2-dev"].transformer
    adapter = Flux2Adapter(transformer)
    e = _side(embeds["flux2-dev"], "source")
    seen, inputs = {}, {}

    def probe(block, q, k, v):
        seen[block] = (q, k, v)
        return q, k, v

    hooks = [
        m.register_forward_pre_hook(lambda mod, a, kw, n=n: inputs.update({n: kw}), with_kwargs=True)
        for n, m in (
            ("double", transformer.transformer_blocks[0].attn),
            ("single", transformer.single_transformer_blocks[0].attn),
        )
    ]
    try:
        with adapter.processors.installed(adapter.layers.values()):
            _forward(transformer, e, joint_attention_kwargs={"fireflow": probe})
    finally:
        for h in hooks:
            h.remove()
    attn = transformer.transformer_blocks[0].attn
    img, txt = inputs["double"]["hidden_states"], inputs["double"]["encoder_hidden_states"]
    q, _, v = seen[("double", 0)]
    assert v.shape == (1, 512 + 12, 2, 8)  # [B, text + image, heads, head_dim]
    torch.testing.assert_close(v[:, :512], attn.add_v_proj(txt).unflatten(-1, (-1, 8)))
    torch.testing.assert_close(v[:, 512:], attn.to_v(img).unflatten(-1, (-1, 8)))
    torch.testing.assert_close(q[:, 512:], attn.norm_q(attn.to_q(img).unflatten(-1, (-1, 8))))  # normed, no RoPE
    single = transformer.single_transformer_blocks[0].attn
    proj = single.to_qkv_mlp_proj(inputs["single"]["hidden_states"])
    q, k, v = seen[("single", 0)]
    width = single.inner_dim
    torch.testing.assert_close(v.flatten(2), proj[..., 2 * width : 3 * width])
    torch.testing.assert_close(k, single.norm_k(proj[..., width : 2 * width].unflatten(-1, (-1, 8))))


def test_reference_tokens_are_never_recorded_or_injected(pipes, embeds):
    """FLUX.2's multi-reference input appends reference tokens after the image: the store sees
    only [text, image], and replacing V there leaves the reference tokens' V alone."""
    transformer = pipes["flux2-dev"].transformer
    adapter = Flux2Adapter(transformer)
    e = _side(embeds["flux2-dev"], "source")
    ref = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(5))
    ref_ids = image_ids(2, 3)
    ref_ids[:, 0] = 10  # the first reference image's time coordinate
    x = torch.cat([latents(), ref], dim=1)
    ids = torch.cat([image_ids(H // 16, W // 16), ref_ids])
    lengths = {}

    def probe(block, q, k, v):
        lengths[block] = v.shape[1]
        return q, k, v

    def zero_v(block, q, k, v):
        return q, k, torch.zeros_like(v)

    with adapter.processors.installed(adapter.layers.values()):
        stock = _forward(transformer, e, x, ids)
        same = _forward(transformer, e, x, ids, joint_attention_kwargs={"fireflow": Bounded(probe, 512 + 12)})
        assert set(lengths.values()) == {512 + 12} and len(lengths) == 4  # both kinds, every block
        assert torch.equal(stock, same)
        changed = _forward(transformer, e, x, ids, joint_attention_kwargs={"fireflow": Bounded(zero_v, 512 + 12)})
        assert (changed - stock).abs().max() > 1e-4
    # What attention then sees: the replacement on [text, image], the reference tokens' own V after it.
    q, k, v = (torch.randn(1, 530, 2, 8) for _ in range(3))
    q2, k2, v2 = Bounded(zero_v, 524)(("single", 0), q, k, v)
    assert torch.equal(q2, q) and torch.equal(k2, k)
    assert not v2[:, :524].any() and torch.equal(v2[:, 524:], v[:, 524:])
    assert stock.shape == (1, 18, 16)


# ---- editing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_defaults_inject_in_the_documented_calls(editors, embeds, variant):
    ed = editors[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ed.edit_latents(latents(), H, W, return_dict=True, **embeds[variant])
    # V replaced in every single block, in one call: the midpoint of the first denoising step.
    assert out.injections == [(0, "midpoint", ("single", i)) for i in range(2)]
    assert out.settings.to_dict()["blocks"] == [["single", 0], ["single", 1]]
    assert out.settings.to_dict()["inversion_guidance"] == 1.0 and out.settings.to_dict()["num_steps"] == 8
    want = {"flux2-dev": 2.0, "flux2-klein": 2.0, "flux2-klein-distilled": 1.0}[variant]
    assert out.settings.guidance == want
    # FireFlow: N + 1 = 9 velocity evaluations per pass; klein base's CFG doubles the editing rows.
    assert out.nfe == 18 and out.transformer_calls == 18
    assert out.transformer_rows == (9 + 2 * 9 if variant == "flux2-klein" else 18)


@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein"])
def test_inject_zero_equals_inversion_then_sampling(editors, embeds, variant):
    ed, e = editors[variant], embeds[variant]
    edited = ed.edit_latents(latents(), H, W, inject=0, **e)
    inverted = ed.invert_latents(latents(), H, W, inversion_guidance=1.0, **_side(e, "source"))
    plain = ed.sample_latents(inverted, H, W, guidance=2.0, **_side(e, "target"))
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein"])
def test_injection_changes_the_output_in_each_block_kind(editors, embeds, variant):
    ed, e = editors[variant], embeds[variant]
    base = ed.edit_latents(latents(), H, W, inject=0, num_steps=3, **e)
    for spec in ("single:1", "double:0"):
        out = ed.edit_latents(latents(), H, W, return_dict=True, num_steps=3, blocks=spec, **e)
        kind, i = spec.split(":")
        assert {b for *_, b in out.injections} == {(kind, int(i))}
        assert (out.latents - base).abs().max() > 1e-4, spec


def test_guided_inversion_on_klein_base_stores_both_rows(editors, embeds):
    ed, e = editors["flux2-klein"], embeds["flux2-klein"]
    for g_inv, g, rows in ((3.0, 1.0, 2 * 3 + 3), (3.0, 3.0, 2 * 3 + 2 * 3)):
        out = ed.edit_latents(latents(), H, W, return_dict=True, num_steps=2, inversion_guidance=g_inv, guidance=g, **e)
        assert out.transformer_rows == rows and len(out.injections) == 2


def test_nfe_per_pass_is_n_plus_one(editors, embeds):
    ed = editors["flux2-dev"]
    calls = []
    velocity = ed.adapter.velocity

    def counting(x, t, cond, kw=None):
        calls.append(t)
        return velocity(x, t, cond, kw)

    ed.adapter.velocity = counting
    try:
        for n in (1, 3, 8):
            calls.clear()
            ed.invert_latents(latents(), H, W, num_steps=n, **_side(embeds["flux2-dev"], "source"))
            assert len(calls) == n + 1 and calls[0] == 0.0
            calls.clear()
            ed.sample_latents(latents(), H, W, num_steps=n, **_side(embeds["flux2-dev"], "target"))
            assert len(calls) == n + 1 and calls[0] == 1.0
    finally:
        del ed.adapter.velocity


def test_features_on_the_cpu_give_the_same_edit(editors, embeds):
    ed, e = editors["flux2-klein"], embeds["flux2-klein"]
    a = ed.edit_latents(latents(), H, W, num_steps=3, **e)
    b = ed.edit_latents(latents(), H, W, num_steps=3, feature_device="cpu", **e)
    assert torch.equal(a, b)


def test_mask_keeps_the_source_latents_exactly(editors, embeds):
    ed, e = editors["flux2-dev"], embeds["flux2-dev"]
    mask = np.zeros((H, W), bool)
    mask[:16, :32] = True  # the first two tokens of the first row: 2 x 4 VAE latent cells
    latent_mask = ed.adapter.latent_mask(mask, Geometry(H, W))
    assert latent_mask.shape == latents().shape[1:] and latent_mask[:2].all() and not latent_mask[2:].any()
    mask[:8, :8] = False  # now the first token is only partly edited: a per-cell mask, not per token
    partial = ed.adapter.latent_mask(mask, Geometry(H, W))
    assert 0 < partial[0].sum() < partial[0].numel() and partial[1].all()
    src = latents()
    out = ed.edit_latents(src, H, W, mask=latent_mask, num_steps=3, **e)
    assert torch.equal(out[:, 2:], src[:, 2:]) and (out[:, :2] - src[:, :2]).abs().max() > 1e-3


def test_klein_distilled_warns_once_and_only_for_inversion(editors, embeds):
    ed, e = editors["flux2-klein-distilled"], embeds["flux2-klein-distilled"]
    ed.adapter._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ed.sample_latents(latents(), H, W, num_steps=2, **_side(e, "target"))
        assert not caught  # sampling alone is what the model is for
        ed.invert_latents(latents(), H, W, num_steps=2, **_side(e, "source"))
        ed.edit_latents(latents(), H, W, num_steps=2, **e)
    assert [str(w.message) for w in caught] == [FEW_STEP_WARNING]


def test_missing_negative_under_cfg_is_a_clear_error(editors, embeds):
    ed = editors["flux2-klein"]
    e = {"prompt_embeds": embeds["flux2-klein"]["target_prompt_embeds"]}
    with pytest.raises(ValueError, match="guidance 3 > 1 is classifier-free guidance on flux2-klein"):
        ed.sample_latents(latents(), H, W, guidance=3.0, **e)
    ed.sample_latents(latents(), H, W, guidance=1.0, num_steps=1, **e)  # guidance 1: no CFG, no negative
    with pytest.raises(ValueError, match="flux2-dev takes no source_pooled_prompt_embeds"):
        editors["flux2-dev"].edit_latents(
            latents(), H, W, source_pooled_prompt_embeds=torch.zeros(1), **embeds["flux2-dev"]
        )
    with pytest.raises(ValueError, match="height= and width="):
        editors["flux2-dev"].sample_latents(latents(), **_side(embeds["flux2-dev"], "target"))


def test_v_store_arithmetic_in_the_docs():
    """docs/flux2.md: one block's V for one recorded call at 1024² (512 text + 4096 image tokens), bf16."""
    mb = {name: v_store_bytes(width, 4096) / 1e6 for name, width in (("dev", 6144), ("4B", 3072), ("9B", 4096))}
    assert [round(mb[k], 1) for k in ("dev", "4B", "9B")] == [56.6, 28.3, 37.7]
    assert [round(mb[k] * n / 1e3, 2) for k, n in (("dev", 48), ("4B", 20), ("9B", 24))] == [2.72, 0.57, 0.91]


# ---- front ends on tiny folders --------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from fireflow.testing import save_tiny

    root = tmp_path_factory.mktemp("tiny-flux2")
    return {v: save_tiny(v, root / v) for v in VARIANTS}


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_edit_reconstruct_generate_on_a_tiny_flux2_folder(folders, picture, tmp_path, variant, capsys):
    common = ["--model", str(folders[variant]), "-q"]
    out = tmp_path / "out.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["edit", str(picture), "-s", "a photo", "-t", "a painting", "-o", str(out), *common]) == 0
    assert Image.open(out).size == (96, 64)
    text = capsys.readouterr().out
    assert "18 NFE" in text and "2 block calls injected" in text and "cropped or resized to 96x64" in text
    assert any(FEW_STEP_WARNING in str(w.message) for w in caught) == (variant == "flux2-klein-distilled")
    if variant == "flux2-klein-distilled":
        return  # the same code paths as [klein] base, without CFG
    gen = tmp_path / "gen.png"
    assert (
        main(["generate", "-p", "a cat", "--height", "48", "--width", "64", "--steps", "2", "-o", str(gen), *common])
        == 0
    )
    assert Image.open(gen).size == (64, 48) and "3 NFE" in capsys.readouterr().out
    rec = tmp_path / "rec.png"
    assert main(["reconstruct", str(picture), "-p", "a photo", "-o", str(rec), "--steps", "3", *common]) == 0
    assert Image.open(rec).size == (96, 64) and "8 NFE" in capsys.readouterr().out


def test_bench_pie_with_a_tiny_flux2_folder(folders, tmp_path, capsys):
    import json

    from fireflow.bench import pie
    from fireflow.bench.synthetic import make_synthetic_pie

    data = make_synthetic_pie(tmp_path / "pie", per_type=1, size=64)
    out = tmp_path / "edits"
    argv = ["bench", "pie", "--data", str(data), "--out", str(out), "--types", "0", "1", "--steps", "2"]
    assert main([*argv, "--model", str(folders["flux2-klein"]), "-q"]) == 0
    assert "all done: 2 records" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / pie.MERGED).read_text().splitlines()]
    assert [r["nfe"] for r in records] == [6, 6] and all(r["size"] == [64, 64] for r in records)


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="the web page needs gradio")
def test_web_page_edits_with_a_tiny_flux2(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client, handle_file

    from fireflow.web import build_app, launch

    editor = FireFlowEditor.from_pretrained(folders["flux2-klein"], device="cpu", torch_dtype="fp32")
    app = build_app(editor, examples=[], workdir=tmp_path / "web")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    try:
        photo = tmp_path / "circle.png"
        Image.new("RGB", (64, 48), (40, 90, 200)).save(photo)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        args = (
            "a photo",
            "a painting",
            2,
            1,
            2.0,
            "fireflow",
            "replace_v",
            "default",
            1.0,
            False,
            None,
            None,
            False,
            False,
        )
        source, edit, _, info, _, _ = client.predict(handle_file(str(photo)), *args, api_name="/edit")
    finally:
        app.close()
    assert "6 NFE" in info and "single 0-1" in info
    direct = editor.edit(Image.open(photo), "a photo", "a painting", num_steps=2, guidance=2.0)
    shown = np.asarray(Image.open(edit).convert("RGB")).astype(int)
    assert shown.shape == (48, 64, 3) and np.abs(shown - np.asarray(direct.image)).max() <= 1


def test_a_bare_klein_transformer_edits_packed_latents(editors, embeds):
    # No VAE, so no BatchNorm statistics to give the VAE's own layout: the edit returns packed tokens,
    # the same edit as the pipeline's editor (whose result is in the VAE's layout) once packed.
    piped = editors["flux2-klein"]
    bare = FireFlowEditor(transformer=piped.transformer)
    x = piped.adapter.from_pipeline_latents(latents(), Geometry(H, W))
    got = bare.edit_latents(x, H, W, num_steps=3, **embeds["flux2-klein"])
    assert got.shape == x.shape == (1, 12, 16)
    want = piped.edit_latents(latents(), H, W, num_steps=3, **embeds["flux2-klein"])
    assert want.dim() == 4  # [klein]'s pipeline layout: the VAE's own latents
    assert rel(got, piped.adapter.from_pipeline_latents(want, Geometry(H, W))) < 1e-5
