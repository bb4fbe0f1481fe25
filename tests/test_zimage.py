"""The Z-Image family on tiny random pipelines: exactness against ZImagePipeline (CFG, its
normalisation and truncation), the variants from the scheduler config, the processors set per
module on the context route, injection and cost counts, and edits from tiny folders (API and CLI)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow import FireFlowEditor
from fireflow.cli import main
from fireflow.features import FeatureReuse, bound
from fireflow.models.base import Geometry
from fireflow.models.zimage import (
    FEW_STEP_WARNING,
    ZImageBaseAdapter,
    ZImageTurboAdapter,
    _captions,
    _pad,
)
from fireflow.models.zimage.processors import JointFit, ZImageFeatureProcessor, _fit_caption
from fireflow.models.zimage.tiny import tiny_transformer, tiny_zimage_pipeline
from fireflow.solvers import VelocityCall

H = W = 32  # latents [16, 4, 4]: 4 image tokens, padded to 32
G = Geometry(H, W)


@pytest.fixture(scope="module")
def pipes():
    return {v: tiny_zimage_pipeline(0, v, text=False) for v in ("zimage", "zimage-turbo")}


@pytest.fixture(scope="module")
def editors(pipes):
    return {v: FireFlowEditor.from_pipe(p) for v, p in pipes.items()}


def _embeds(seed, n=7, m=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, n, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, m, 16, generator=g),
    }


def _inputs(src=7, tgt=9):
    s, t = _embeds(1, src), _embeds(2, tgt)
    return {**{f"source_{k}": v for k, v in s.items()}, **{f"target_{k}": v for k, v in t.items()}}


def latents(seed=0):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class Calls:
    """Counts the transformer's forwards and the rows (list items) each got."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.hook = model.register_forward_pre_hook(lambda m, args: self.rows.append(len(args[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def _pipe(pipe, e, noise, **kw):
    return pipe(
        prompt_embeds=list(e["prompt_embeds"]),
        negative_prompt_embeds=list(e["negative_prompt_embeds"]),
        height=H,
        width=W,
        num_inference_steps=4,
        latents=noise.clone(),
        output_type="latent",
        **kw,
    ).images


@pytest.mark.parametrize("variant", ["zimage", "zimage-turbo"])
def test_euler_sampling_equals_the_pipeline(pipes, editors, variant):
    pipe, ed = pipes[variant], editors[variant]
    e, noise = _embeds(4), latents(3)
    with Calls(ed.transformer) as calls:
        ref = _pipe(pipe, e, noise, guidance_scale=3.0)
    piped = calls.rows
    with Calls(ed.transformer) as calls:
        ours = ed.sample_latents(noise, num_steps=4, guidance=3.0, solver="euler", **e)
    assert rel(ours, ref) <= 1e-5
    assert calls.rows == piped == [2, 2, 2, 2]  # CFG: one batched forward of 2 rows per step
    assert ed.adapter.geometry_of(noise) == G
    want = [1, 0.9, 0.75, 0.5, 0] if variant == "zimage-turbo" else [1, 18 / 19, 6 / 7, 2 / 3, 0]
    assert ed.adapter.timesteps(4, G).tolist() == pytest.approx(want, abs=1e-6)


def test_guidance_zero_options_and_a_masked_batch_equal_the_pipeline(pipes, editors):
    pipe, ed, a = pipes["zimage"], editors["zimage"], editors["zimage"].adapter
    e, noise = _embeds(5), latents(4)
    # guidance 0: no CFG, one row, no negatives needed
    ref = pipe(
        prompt_embeds=list(e["prompt_embeds"]),
        guidance_scale=0.0,
        height=H,
        width=W,
        num_inference_steps=3,
        latents=noise.clone(),
        output_type="latent",
    ).images
    ours = ed.sample_latents(noise, num_steps=3, guidance=0.0, solver="euler", prompt_embeds=e["prompt_embeds"])
    assert rel(ours, ref) <= 1e-5
    # the pipeline's cfg_normalization and cfg_truncation, as adapter attributes
    for kw in ({"cfg_normalization": 1.05}, {"cfg_truncation": 0.3}):
        ref = _pipe(pipe, e, noise, guidance_scale=4.0, **kw)
        plain = _pipe(pipe, e, noise, guidance_scale=4.0)
        for k, v in kw.items():
            setattr(a, k, v)
        try:
            ours = ed.sample_latents(noise, num_steps=4, guidance=4.0, solver="euler", **e)
        finally:
            a.cfg_normalization, a.cfg_truncation = 0.0, 1.0
        assert rel(ours, ref) <= 1e-5 and rel(plain, ref) > 1e-3, kw
    # two captions of different lengths: padded with masks, as encode_prompt gives them
    caps = [torch.randn(7, 16), torch.randn(40, 16)]  # 32 and 64 padded tokens: the model masks
    negs = [torch.randn(3, 16), torch.randn(5, 16)]
    noise2 = torch.randn(2, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(6))
    ref = pipe(
        prompt_embeds=caps,
        negative_prompt_embeds=negs,
        guidance_scale=2.0,
        height=H,
        width=W,
        num_inference_steps=3,
        latents=noise2.clone(),
        output_type="latent",
    ).images
    (pe, pm), (ne, nm) = _pad(caps), _pad(negs)
    assert pe.shape == (2, 40, 16) and pm.sum(1).tolist() == [7, 40]
    got = ed.sample_latents(
        noise2,
        num_steps=3,
        guidance=2.0,
        solver="euler",
        prompt_embeds=pe,
        prompt_embeds_mask=pm,
        negative_prompt_embeds=ne,
        negative_prompt_embeds_mask=nm,
    )
    assert rel(got, ref) <= 1e-5
    assert [c.shape[0] for c in _captions(pe, pm, "cpu", torch.float32)] == [7, 40]


def test_variants_come_from_the_scheduler_config(pipes, editors):
    assert type(editors["zimage"].adapter) is ZImageBaseAdapter and editors["zimage"].model_name == "zimage"
    assert type(editors["zimage-turbo"].adapter) is ZImageTurboAdapter
    assert editors["zimage-turbo"].model_name == "zimage-turbo"
    assert pipes["zimage"].scheduler.config.shift == 6.0 and pipes["zimage-turbo"].scheduler.config.shift == 3.0
    # chosen explicitly where the config misleads (a fine-tune with another shift)
    assert type(ZImageTurboAdapter.from_pipe(pipes["zimage"])) is ZImageTurboAdapter
    assert type(ZImageBaseAdapter.from_pipe(pipes["zimage-turbo"])) is ZImageBaseAdapter
    bare = FireFlowEditor(transformer=tiny_transformer())
    assert type(bare.adapter) is ZImageBaseAdapter and bare.adapter.scheduler_config["shift"] == 6.0
    a = editors["zimage"].adapter
    assert a.defaults == {"guidance": 2.0, "inversion_guidance": 0.0, "blocks": "joint:all"}
    assert a.generate_guidance == 5.0
    assert editors["zimage-turbo"].adapter.defaults["guidance"] == 0.0
    assert a.route == "context" and a.block_counts == {"joint": 2, "refiner": 1}
    assert editors["zimage"].resolve().blocks == (("joint", 0), ("joint", 1))
    assert not hasattr(a.transformer, "set_attn_processor")  # processors are set per module


def test_recording_processors_equal_the_stock_ones_exactly(editors):
    a = editors["zimage"].adapter
    model = a.transformer
    e = _embeds(7, 9)
    x = [latents(1)[0].unsqueeze(1), latents(2)[0].unsqueeze(1)]
    caps = [e["prompt_embeds"][0], e["negative_prompt_embeds"][0]]
    kw = dict(t=torch.tensor([0.3, 0.3]), cap_feats=caps, return_dict=False)
    with torch.no_grad():
        stock = model(x, **kw)[0]
        reuse = FeatureReuse(1, 1, "replace_v add_k add_q", set(a.layers.values()))
        with a.processors.installed(a.layers.values()), reuse.recording(VelocityCall(0, "start", 0.5, 0.0, 1.0)):
            assert all(isinstance(m.processor, ZImageFeatureProcessor) for m in a.processors.modules.values())
            with bound(reuse):
                recorded = model(x, **kw)[0]
        assert not any(isinstance(m.processor, ZImageFeatureProcessor) for m in a.processors.modules.values())
    assert all(torch.equal(s, r) for s, r in zip(stock, recorded, strict=True))
    assert len(reuse._store) == 3 * 3  # Q, K, V of 2 joint blocks and 1 refiner
    shapes = {k.block: tuple(v.shape) for k, v in reuse._store.items() if k.target == "v"}
    assert shapes == {("joint", 0): (2, 64, 2, 16), ("joint", 1): (2, 64, 2, 16), ("refiner", 0): (2, 32, 2, 16)}


def test_defaults_counts_and_injection(editors):
    ed = editors["zimage"]
    with Calls(ed.transformer) as calls:
        out = ed.edit_latents(latents(), return_dict=True, **_inputs())
    s = out.settings.to_dict()
    # The family's unguided inversion is guidance 0 (CFG is on above 0 on Z-Image).
    assert s["guidance"] == 2.0 and s["inversion_guidance"] == 0.0
    assert out.injections == [(0, "midpoint", ("joint", 0)), (0, "midpoint", ("joint", 1))]
    # FireFlow: N + 1 = 9 evaluations a pass; the inversion one row a call, the edit 2 under CFG
    assert out.nfe == 18 and out.transformer_calls == 18 and out.transformer_rows == 9 + 18
    assert calls.rows == [1] * 9 + [2] * 9
    with Calls(ed.transformer) as calls:
        out = ed.edit_latents(latents(), return_dict=True, inversion_guidance=1.0, **_inputs())
    assert out.nfe == 18 and out.transformer_calls == 18 and out.transformer_rows == 36  # a guided inversion
    assert len(calls.rows) == 18 and sum(calls.rows) == 36


@pytest.mark.parametrize("variant", ["zimage", "zimage-turbo"])
def test_inject_zero_equals_inversion_then_sampling(editors, variant):
    ed, inputs = editors[variant], _inputs()
    g = ed.resolve().guidance
    src = {k[7:]: v for k, v in inputs.items() if k.startswith("source_")}
    tgt = {k[7:]: v for k, v in inputs.items() if k.startswith("target_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Turbo's inversion warning
        edited = ed.edit_latents(latents(), inject=0, num_steps=4, **inputs)
        noise = ed.invert_latents(latents(), num_steps=4, **src)  # the family default, as the edit
    plain = ed.sample_latents(noise, num_steps=4, guidance=g, **tgt)
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


def test_injection_changes_the_edit_in_each_block_kind(editors):
    ed, inputs = editors["zimage"], _inputs(7, 40)  # the target caption pads to 64 tokens, the source to 32
    base = ed.edit_latents(latents(), inject=0, num_steps=4, **inputs)
    for spec in ("joint:0", "joint:all", "refiner:all"):
        out = ed.edit_latents(latents(), return_dict=True, num_steps=4, blocks=spec, **inputs)
        assert out.injections and {b[0] for *_, b in out.injections} == {spec.split(":")[0]}
        assert (out.latents - base).abs().max() > 1e-4, spec
    with pytest.raises(ValueError, match="do not fit this call's"):
        ed.edit_latents(latents(), num_steps=2, strategy="add_v", **inputs)


def test_caption_features_of_another_length_are_fitted():
    cur = torch.randn(2, 32 + 64, 2, 4)  # 32 image tokens, 64 caption tokens
    longer, shorter = torch.randn(2, 32 + 96, 2, 4), torch.randn(2, 32 + 32, 2, 4)
    assert torch.equal(_fit_caption(longer, cur, 32), longer[:, :96])
    assert torch.equal(_fit_caption(shorter, cur, 32), torch.cat([shorter, cur[:, 64:]], 1))
    calls = []
    fit = JointFit(lambda block, q, k, v: (calls.append(block), (q, k, shorter))[1], 32)
    q, k, v = fit(("joint", 0), cur, cur, cur)
    assert calls == [("joint", 0)] and torch.equal(v[:, :64], shorter) and torch.equal(v[:, 64:], cur[:, 64:])


def test_turbo_warns_once_and_only_for_inversion(editors):
    ed = editors["zimage-turbo"]
    ed.adapter._warned = False
    e = _embeds(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ed.sample_latents(latents(), num_steps=2, prompt_embeds=e["prompt_embeds"])  # guidance 0: no negatives
        assert not caught
        ed.invert_latents(latents(), num_steps=2, inversion_guidance=0.0, prompt_embeds=e["prompt_embeds"])
        ed.edit_latents(latents(), num_steps=2, **_inputs())
    assert [str(w.message) for w in caught] == [FEW_STEP_WARNING]
    editors["zimage"].invert_latents(latents(), num_steps=2, inversion_guidance=0.0, prompt_embeds=e["prompt_embeds"])


def test_missing_negatives_under_cfg_is_a_clear_error(editors):
    e = _embeds(3)
    with pytest.raises(ValueError, match="guidance 1 > 0 is classifier-free guidance on Z-Image"):
        editors["zimage"].invert_latents(
            latents(), num_steps=2, inversion_guidance=1.0, prompt_embeds=e["prompt_embeds"]
        )
    with pytest.raises(ValueError, match="does not fit embeddings"):
        editors["zimage"].sample_latents(
            latents(), num_steps=2, guidance=0.0, prompt_embeds=e["prompt_embeds"], prompt_embeds_mask=torch.ones(1, 3)
        )


def test_masks_and_vae_round_trip(editors):
    a = editors["zimage"].adapter
    m = np.zeros((H, W), bool)
    m[:8, :8] = True
    lm = a.latent_mask(m, G)
    assert lm.shape == (1, 4, 4) and lm.sum() == 1 and lm[0, 0, 0] == 1
    assert a.image_tokens(G) == 32 and a.image_tokens(Geometry(192, 192)) == 160  # 144 patches -> 160
    px = torch.rand(1, 1, 3, H, W) * 2 - 1
    z = a.encode_image(px)
    vae = a.pipe.vae
    want = (vae.encode(px[:, 0]).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(z, want)
    assert a.decode(z, G).shape == (1, 1, 3, H, W)


def test_edit_from_tiny_folders_and_the_cli(tmp_path, capsys):
    from fireflow.testing import save_tiny

    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(image)
    base = save_tiny("zimage", tmp_path / "zimage")
    out = tmp_path / "out.png"
    args = ["edit", str(image), "-s", "a photo", "-t", "a painting", "-o", str(out), "--model", str(base), "-q"]
    assert main([*args, "--steps", "2", "--inversion-guidance", "0"]) == 0
    assert Image.open(out).size == (32, 32)
    assert "6 NFE" in capsys.readouterr().out
    turbo = FireFlowEditor.from_pretrained(save_tiny("zimage-turbo", tmp_path / "turbo"), device="cpu")
    assert turbo.model_name == "zimage-turbo"
    embeds = turbo.adapter.encode_prompt(["a red cat", "a dog"])
    assert embeds["prompt_embeds"].shape[0] == 2 and embeds["prompt_embeds_mask"].dtype == torch.bool
    with pytest.warns(UserWarning, match="Z-Image-Turbo is a few-step"):
        result = turbo.edit(Image.open(image), "a photo", "a painting", num_steps=2)
    assert result.image.size == (32, 32) and result.nfe == 6
