"""FireFlowScheduler inside diffusers' own pipelines, on tiny random weights in fp32.

Each pipeline's output with the scheduler must equal fireflow's own FireFlow sampling on the same
weights, noise and embeddings (relative error <= 1e-5) with N + 1 transformer calls: for FLUX.1
and SD3 and FLUX.2 against ``FireFlowEditor.from_pipe(pipe).sample_latents``; for SD3 and FLUX.2
also against ``fireflow.solvers.sample`` with a velocity written here around the
pipeline's transformer (:func:`_velocity`), on the grid a stock ``FlowMatchEulerDiscreteScheduler``
gives for the same call.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

from fireflow import FireFlowEditor, solvers
from fireflow.models.base import Geometry
from fireflow.models.flux.tiny import tiny_flux_pipeline
from fireflow.scheduler import FireFlowScheduler, UnsupportedPipelineError

#: FLUX.1-dev's scheduler config (resolution-dependent shift).
FLUX_DEV = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)
SIDE = 32  # pixels: 2x2 latent tokens for FLUX.1 (64 px would be 4x4), 4 for SD3 and FLUX.2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def counted(module: torch.nn.Module):
    """Count ``module``'s forward calls."""
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def quiet(pipe):
    pipe.set_progress_bar_config(file=io.StringIO())
    bars = []
    make = pipe.progress_bar

    def progress_bar(*args, **kwargs):
        bars.append(make(*args, **kwargs))
        return bars[-1]

    pipe.progress_bar = progress_bar  # keeps each bar, to check it completes
    return bars


# ---- tiny pipelines -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()  # FLUX.1-dev's scheduler config
    assert {k: pipe.scheduler.config[k] for k in FLUX_DEV} == FLUX_DEV
    pipe.scheduler = FireFlowScheduler.from_config(pipe.scheduler.config)  # the one line a user writes
    return pipe


@pytest.fixture(scope="module")
def sd3():
    from fireflow.models.sd3.tiny import tiny_sd3_transformer

    transformer = tiny_sd3_transformer(seed=0)
    none = dict.fromkeys(
        ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    )
    scheduler = FireFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, **none)


def _flux2_transformer(guidance_embeds: bool):
    from fireflow.models.flux2.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**TINY_TRANSFORMER, guidance_embeds=guidance_embeds).eval()


def _flux2_scheduler():
    return FireFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config)


@pytest.fixture(scope="module")
def flux2():
    return Flux2Pipeline(
        scheduler=_flux2_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=_flux2_transformer(True)
    )


@pytest.fixture(scope="module")
def klein():
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4
    )
    vae.bn.running_mean.normal_()
    vae.bn.running_var.uniform_(0.5, 2.0)
    kw = dict(vae=vae.eval(), text_encoder=None, tokenizer=None, transformer=_flux2_transformer(False))
    return Flux2KleinPipeline(scheduler=_flux2_scheduler(), is_distilled=False, **kw)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- the comparison helper for families without a fireflow adapter yet ------------------------
def _velocity(pipe, embeds: dict, guidance: float, latent_ids=None):
    """``v(x, t)`` of ``pipe``'s transformer as the pipeline evaluates it (t in [0, 1]).

    SD3: true CFG on a [negative, positive] batch, timestep t x 1000. FLUX.2 dev: embedded guidance.
    FLUX.2 klein base: true CFG with two forwards; klein distilled: one plain forward. Written apart from
    fireflow's adapters, so the comparison does not rest on them alone.
    """
    tr = pipe.transformer

    def full(x, value):
        return torch.full((x.shape[0],), value, dtype=torch.float32)

    if isinstance(pipe, StableDiffusion3Pipeline):
        emb = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
        pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])

        def v(x, t):
            xx = torch.cat([x, x])
            out = tr(
                hidden_states=xx, timestep=full(xx, t * 1000), encoder_hidden_states=emb, pooled_projections=pooled
            )
            uncond, cond = out.sample.chunk(2)
            return uncond + guidance * (cond - uncond)

        return v

    def flux2(x, t, emb, g):
        txt_ids = pipe._prepare_text_ids(emb)
        return tr(
            hidden_states=x,
            timestep=full(x, t),
            guidance=g,
            encoder_hidden_states=emb,
            txt_ids=txt_ids,
            img_ids=latent_ids,
            return_dict=False,
        )[0]

    if tr.config.guidance_embeds:  # FLUX.2 dev
        return lambda x, t: flux2(x, t, embeds["prompt_embeds"], full(x, guidance))
    if pipe.config.is_distilled:  # klein distilled: no guidance at all
        return lambda x, t: flux2(x, t, embeds["prompt_embeds"], None)

    def klein(x, t):
        cond = flux2(x, t, embeds["prompt_embeds"], None)
        uncond = flux2(x, t, embeds["negative_prompt_embeds"], None)
        return uncond + guidance * (cond - uncond)

    return klein


def _euler_grid(pipe, n: int, **kwargs) -> torch.Tensor:
    """The step grid a stock Euler scheduler gets from the same config and call."""
    euler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler.set_timesteps(n, **kwargs)
    return euler.sigmas


# ---- equality with fireflow's own sampling --------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4])
def test_flux_pipeline_equals_editor(flux, n):
    editor = FireFlowEditor.from_pipe(flux)
    embeds = editor.adapter.encode_prompt(["a red cat", "a dog"])
    noise = _randn(2, (SIDE // 16) ** 2, 16)
    steps = []

    def on_step(pipe, i, t, kw):
        steps.append((i, float(t)))
        return {}

    bars = quiet(flux)
    with counted(flux.transformer) as calls:
        out = flux(
            **embeds,
            latents=noise,
            height=SIDE,
            width=SIDE,
            num_inference_steps=n,
            guidance_scale=3.5,
            output_type="latent",
            callback_on_step_end=on_step,
        ).images
    assert calls[0] == n + 1
    assert [i for i, _ in steps] == list(range(n + 1))
    assert [t for _, t in steps] == pytest.approx(flux.scheduler.timesteps.tolist())
    assert bars[-1].n == bars[-1].total == n + 1
    with counted(flux.transformer) as calls:
        ref = editor.sample_latents(noise, SIDE, SIDE, num_steps=n, guidance=3.5, solver="fireflow", **embeds)
    assert calls[0] == n + 1
    assert rel(out, ref) <= 1e-5
    euler = editor.sample_latents(noise, SIDE, SIDE, num_steps=n, guidance=3.5, solver="euler", **embeds)
    assert rel(out, euler) > 1e-3  # the comparison can tell the solvers apart
    # The editor's grid is the pipeline's step grid (FLUX.1-dev shift at this size).
    grid = editor.adapter.timesteps(n, Geometry(SIDE, SIDE))
    torch.testing.assert_close(flux.scheduler.step_sigmas.double(), grid, atol=1e-7, rtol=0)


def test_flux_generate_equals_pipeline_from_its_prompt(flux):
    editor = FireFlowEditor.from_pipe(flux)
    gen = editor.generate("a red cat", height=SIDE, width=SIDE, num_steps=3, guidance=3.5, seed=3)
    noise = _randn(1, (SIDE // 16) ** 2, 16, seed=3)
    quiet(flux)
    with counted(flux.transformer) as calls:
        out = flux("a red cat", latents=noise, height=SIDE, width=SIDE, num_inference_steps=3, output_type="latent")
    assert gen.nfe == calls[0] == 4
    assert rel(out.images, gen.latents) <= 1e-5


def test_sd3_pipeline_equals_fireflow_sampling(sd3):
    n, g = 3, 5.0
    embeds = dict(
        prompt_embeds=_randn(2, 7, 24, seed=1),
        pooled_prompt_embeds=_randn(2, 20, seed=2),
        negative_prompt_embeds=_randn(2, 7, 24, seed=3),
        negative_pooled_prompt_embeds=_randn(2, 20, seed=4),
    )
    noise = _randn(2, 4, SIDE // 8, SIDE // 8)
    bars = quiet(sd3)
    with counted(sd3.transformer) as calls:
        out = sd3(
            **embeds,
            latents=noise,
            height=SIDE,
            width=SIDE,
            num_inference_steps=n,
            guidance_scale=g,
            output_type="latent",
        ).images
    assert calls[0] == n + 1  # one batched [negative, positive] forward per call
    assert bars[-1].n == bars[-1].total == n  # SD3 counts steps: the first call is its "warm-up"
    editor = FireFlowEditor.from_pipe(sd3)  # fireflow's SD3 adapter
    with counted(sd3.transformer) as calls:
        ref = editor.sample_latents(noise, SIDE, SIDE, num_steps=n, guidance=g, solver="fireflow", **embeds)
    assert calls[0] == n + 1
    assert rel(out, ref) <= 1e-5
    with torch.no_grad():  # and the small helper written here, independently of the adapter
        ref = solvers.sample(_velocity(sd3, embeds, g), noise, _euler_grid(sd3, n).double(), "fireflow")
    assert rel(out, ref) <= 1e-5


def test_flux2_dev_pipeline_equals_fireflow_sampling(flux2):
    n, g = 4, 4.0
    emb = _randn(1, 6, 24, seed=1)
    noise = _randn(1, 16, SIDE // 16, SIDE // 16)  # patchified latents [B, 4C, H/16, W/16]
    quiet(flux2)
    with counted(flux2.transformer) as calls:
        out = flux2(
            prompt_embeds=emb,
            latents=noise,
            height=SIDE,
            width=SIDE,
            num_inference_steps=n,
            guidance_scale=g,
            output_type="latent",
        ).images
    assert calls[0] == n + 1
    packed, ids = flux2._pack_latents(noise), flux2._prepare_latent_ids(noise)
    mu = compute_empirical_mu(packed.shape[1], n)
    grid = _euler_grid(flux2, None, sigmas=np.linspace(1.0, 1 / n, n), mu=mu).double()
    with torch.no_grad():
        ref = solvers.sample(_velocity(flux2, {"prompt_embeds": emb}, g, ids), packed, grid, "fireflow")
        ours = FireFlowEditor.from_pipe(flux2).sample_latents(
            packed, SIDE, SIDE, num_steps=n, guidance=g, prompt_embeds=emb
        )
    assert rel(out, ref) <= 1e-5 and rel(out, ours) <= 1e-5  # fireflow's FLUX.2 adapter, too


@pytest.mark.parametrize("distilled", [False, True])
def test_flux2_klein_pipeline_equals_fireflow_sampling(klein, distilled):
    if distilled:  # the same weights as a distilled klein: one forward per call, no CFG
        klein = Flux2KleinPipeline(**klein.components, is_distilled=True)
    n, g = 3, 4.0
    embeds = dict(prompt_embeds=_randn(1, 6, 24, seed=1), negative_prompt_embeds=_randn(1, 6, 24, seed=2))
    noise = _randn(1, 16, SIDE // 16, SIDE // 16)
    final = {}

    def keep(pipe, i, t, kw):
        final[i] = kw["latents"]  # the packed latents the pipeline then decodes
        return {}

    bars = quiet(klein)
    with counted(klein.transformer) as calls:
        klein(
            **embeds,
            latents=noise,
            height=SIDE,
            width=SIDE,
            num_inference_steps=n,
            guidance_scale=g,
            output_type="latent",
            callback_on_step_end=keep,
        )
    assert calls[0] == (1 if distilled else 2) * (n + 1)  # klein base: true CFG, two forwards per call
    assert sorted(final) == list(range(n + 1)) and bars[-1].n == bars[-1].total == n + 1
    packed, ids = klein._pack_latents(noise), klein._prepare_latent_ids(noise)
    mu = compute_empirical_mu(packed.shape[1], n)
    grid = _euler_grid(klein, None, sigmas=np.linspace(1.0, 1 / n, n), mu=mu).double()
    with torch.no_grad():
        ref = solvers.sample(_velocity(klein, embeds, g, ids), packed, grid, "fireflow")
        kw = embeds if not distilled else {"prompt_embeds": embeds["prompt_embeds"]}
        ed = FireFlowEditor.from_pipe(klein)
        ours = ed.sample_latents(packed, SIDE, SIDE, num_steps=n, guidance=g, **kw)  # the VAE's own latents
        ours = ed.adapter.from_pipeline_latents(ours, Geometry(SIDE, SIDE))  # packed, as the callback saw them
    assert rel(final[n], ref) <= 1e-5 and rel(final[n], ours) <= 1e-5  # fireflow's FLUX.2 adapter, too


# ---- the scheduler on its own ---------------------------------------------------------------------
def test_call_times_are_the_grid_start_and_midpoints():
    cfg = FlowMatchEulerDiscreteScheduler(**FLUX_DEV).config
    for extra in ({}, {"use_karras_sigmas": True}, {"shift_terminal": 0.1}):
        euler = FlowMatchEulerDiscreteScheduler.from_config(cfg, **extra)
        ff = FireFlowScheduler.from_config(cfg, **extra)
        kwargs = dict(sigmas=np.linspace(1, 1 / 6, 6), mu=0.8)
        euler.set_timesteps(**kwargs)
        ff.set_timesteps(**kwargs)
        s = euler.sigmas
        assert ff.num_inference_steps == 6 and ff.num_calls == len(ff.timesteps) == 7
        torch.testing.assert_close(ff.step_sigmas, s)
        torch.testing.assert_close(ff.timesteps, torch.cat([s[:1], (s[:-1] + s[1:]) / 2]) * 1000)
        torch.testing.assert_close(ff.sigmas[:-1] * 1000, ff.timesteps)
        assert ff.sigmas[-1] == s[-1]


def test_scheduler_loop_equals_solver_and_keeps_fp32_state():
    """The bare loop a pipeline runs, with a bf16 'model': the state inside stays fp32."""
    a = torch.tensor([[0.3, -1.2], [0.7, 0.2]])

    def velocity(x, t):
        return torch.tanh(x @ a) * (1 + t) - x

    ff = FireFlowScheduler(shift=3.0)
    ff.set_timesteps(5)
    x = _randn(3, 2)
    ref = solvers.sample(velocity, x, ff.step_sigmas.double(), "fireflow")
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        ff.set_timesteps(5)
        lat = x.to(dtype)
        for t in ff.timesteps:
            lat = ff.step(velocity(lat.float(), float(t) / 1000).to(dtype), t, lat).prev_sample
            assert lat.dtype == dtype and ff._anchor.dtype == torch.float32
        assert rel(ff._anchor, ref) <= tol and rel(lat, ref) <= tol
    assert rel(ff._anchor, ref) > 0  # bf16 model outputs: not bit-equal, but the fp32 state keeps it close


def test_callback_changes_to_latents_reach_the_state(flux):
    """A callback returning a copy changes nothing; one that edits the latents moves the ODE state."""
    adapter = FireFlowEditor.from_pipe(flux).adapter
    embeds = adapter.encode_prompt(["a cat"])
    noise = _randn(1, (SIDE // 16) ** 2, 16)
    quiet(flux)
    kw = dict(**embeds, height=SIDE, width=SIDE, num_inference_steps=3)
    kw.update(output_type="latent", guidance_scale=3.5)
    plain = flux(latents=noise, **kw).images
    copied = flux(latents=noise, callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"].clone()}, **kw)
    assert torch.equal(copied.images, plain)
    delta = 0.05 * _randn(*noise.shape, seed=9)

    def nudge(pipe, i, t, k):
        return {"latents": k["latents"] + delta} if i == 0 else {}

    nudged = flux(latents=noise, callback_on_step_end=nudge, **kw).images
    # Expected: FireFlow from x_0 + delta whose first (start) velocity is the one taken at x_0.
    cond = adapter.conditioning(embeds, Geometry(SIDE, SIDE), 3.5)
    with torch.no_grad():
        v0 = adapter.velocity(noise, 1.0, cond).float()
        calls = []

        def velocity(x, t):
            calls.append(t)
            return v0 if len(calls) == 1 else adapter.velocity(x, t, cond)

        ref = solvers.sample(velocity, noise + delta, flux.scheduler.step_sigmas.double(), "fireflow")
    assert rel(nudged, ref) <= 1e-5 and rel(nudged, plain) > 1e-3


def test_save_and_load_round_trip(tmp_path, flux):
    ff = FireFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX_DEV).config)
    assert {k: ff.config[k] for k in FLUX_DEV} == FLUX_DEV
    ff.save_pretrained(tmp_path / "scheduler")
    back = FireFlowScheduler.from_pretrained(tmp_path / "scheduler")
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ff.config) and back.config["_class_name"] == "FireFlowScheduler"
    for s in (ff, back):
        s.set_timesteps(sigmas=np.linspace(1, 0.25, 4), mu=0.7)
    assert torch.equal(back.timesteps, ff.timesteps)
    # A whole pipeline saved with it loads it back (model_index names fireflow.scheduler).
    flux.save_pretrained(tmp_path / "pipe")
    from diffusers import FluxPipeline

    assert type(FluxPipeline.from_pretrained(tmp_path / "pipe").scheduler) is FireFlowScheduler


def test_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FireFlowScheduler(stochastic_sampling=True)
    ff = FireFlowScheduler(shift=3.0)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ff.step(torch.zeros(1), torch.tensor(1000.0), torch.zeros(1))
    with pytest.raises(ValueError, match="pass sigmas"):
        ff.set_timesteps(timesteps=[1000.0, 500.0])
    ff.set_timesteps(2)
    ff.set_begin_index(0)  # what text-to-image pipelines call
    x, noise = torch.zeros(1, 3), torch.ones(1, 3)
    assert torch.equal(ff.scale_noise(x, ff.timesteps[:1], noise), noise)  # strength 1: pure noise at sigma 1
    with pytest.raises(UnsupportedPipelineError, match="strength < 1"):
        ff.set_begin_index(1)
    with pytest.raises(UnsupportedPipelineError, match="starts at call 1 of 3"):
        ff.step(torch.zeros(1, 3), ff.timesteps[1], x)  # a sliced schedule, without set_begin_index
    for t in ff.timesteps:
        x = ff.step(torch.ones(1, 3), t, x).prev_sample
    with pytest.raises(UnsupportedPipelineError, match="re-noise"):
        ff.scale_noise(x, ff.timesteps[1:2], noise)
    with pytest.raises(RuntimeError, match="3 calls"):
        ff.step(torch.ones(1, 3), ff.timesteps[-1], x)


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))


def test_img2img_and_inpainting_are_refused_before_wrong_output(flux, sd3):
    embeds = FireFlowEditor.from_pipe(flux).adapter.encode_prompt(["a cat"])
    kw = dict(**embeds, height=SIDE, width=SIDE, num_inference_steps=4)
    img2img = FluxImg2ImgPipeline.from_pipe(flux)
    quiet(img2img)
    with counted(flux.transformer) as calls, pytest.raises(UnsupportedPipelineError, match="strength < 1"):
        img2img(image=_image(), strength=0.6, **kw)
    assert calls[0] == 0
    inpaint = FluxInpaintPipeline.from_pipe(flux)
    quiet(inpaint)
    mask = Image.new("L", (SIDE, SIDE), 255)
    with pytest.raises(UnsupportedPipelineError, match="strength < 1"):
        inpaint(image=_image(), mask_image=mask, strength=0.6, **kw)
    with pytest.raises(UnsupportedPipelineError, match="re-noise"):  # strength 1: refused at the first re-noising
        inpaint(image=_image(), mask_image=mask, strength=1.0, **kw)
    sd3_img2img = StableDiffusion3Img2ImgPipeline.from_pipe(sd3)
    quiet(sd3_img2img)
    e = dict(prompt_embeds=_randn(1, 7, 24), pooled_prompt_embeds=_randn(1, 20))
    e.update(negative_prompt_embeds=_randn(1, 7, 24), negative_pooled_prompt_embeds=_randn(1, 20))
    with pytest.raises(UnsupportedPipelineError, match="strength < 1"):
        sd3_img2img(image=torch.zeros(1, 4, SIDE // 8, SIDE // 8), strength=0.5, num_inference_steps=4, **e)


def test_img2img_at_strength_one_is_text_to_image(flux):
    """strength=1 starts from pure noise at the first call: served, and equal to FluxPipeline's output."""
    embeds = FireFlowEditor.from_pipe(flux).adapter.encode_prompt(["a cat"])
    kw = dict(**embeds, height=SIDE, width=SIDE, num_inference_steps=3)
    kw.update(output_type="latent", guidance_scale=3.5)  # the two pipelines default to different guidance
    img2img = FluxImg2ImgPipeline.from_pipe(flux)
    quiet(img2img)
    quiet(flux)
    with counted(flux.transformer) as calls:
        # The image given as latents: no VAE sampling draws from the generator before the noise does.
        image = _randn(1, 4, SIDE // 8, SIDE // 8, seed=6)
        a = img2img(image=image, strength=1.0, generator=torch.Generator().manual_seed(5), **kw).images
    assert calls[0] == 4
    b = flux(generator=torch.Generator().manual_seed(5), **kw).images
    assert rel(a, b) <= 1e-5
