"""The Wan 2.1 / 2.2 family on tiny random pipelines: exactness against WanPipeline (one expert,
two experts, TI2V), the processors on the context route, the expert switch, frames and masks, and
an edit from a tiny pipeline folder."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from fireflow import FireFlowEditor
from fireflow.features import FeatureReuse, bound
from fireflow.models.base import Geometry
from fireflow.models.wan.processors import WanFeatureProcessor
from fireflow.models.wan.tiny import BOUNDARY_RATIO, tiny_transformer, tiny_wan_pipeline
from fireflow.solvers import VelocityCall

VARIANTS = ["wan2.1", "wan2.2", "wan-ti2v"]
G = Geometry(32, 32, 9)  # latents [16, 3, 4, 4] ([48, 3, 2, 2] for TI2V)


@pytest.fixture(scope="module", params=VARIANTS)
def pipe(request):
    # A flow-match Euler scheduler swapped in (shift 3), so the pipeline is an Euler loop.
    return tiny_wan_pipeline(0, request.param, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.fixture(scope="module")
def editor(pipe):
    return FireFlowEditor.from_pipe(pipe)


def _embeds(seed):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, 10, 32, generator=g), "negative_prompt_embeds": torch.randn(1, 10, 32)}


@pytest.fixture(scope="module")
def inputs(editor):
    g = torch.Generator().manual_seed(0)
    src, tgt = _embeds(1), _embeds(2)
    return dict(
        latents=torch.randn(1, *editor.adapter.latent_shape(G), generator=g),
        **{f"source_{k}": v for k, v in src.items()},
        **{f"target_{k}": v for k, v in tgt.items()},
    )


def _strip(inputs):
    return {k: v for k, v in inputs.items() if k != "latents"}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class Calls:
    """Counts each expert's forwards and the timesteps they got."""

    def __init__(self, models):
        self.seen: list[tuple[int, float]] = []
        self.hooks = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(models)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            self.seen.append((i, kwargs["timestep"].flatten()[0].item()))

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def test_euler_sampling_equals_the_pipeline(pipe, editor):
    a = editor.adapter
    noise = torch.randn(1, *a.latent_shape(G), generator=torch.Generator().manual_seed(3))
    e = _embeds(4)
    with Calls(a.models) as calls:
        ref = pipe(
            **e,
            height=32,
            width=32,
            num_frames=9,
            num_inference_steps=4,
            guidance_scale=5.0,
            latents=noise.clone(),
            output_type="latent",
        ).frames
    piped = calls.seen
    with Calls(a.models) as calls:
        ours = editor.sample_latents(noise, num_steps=4, guidance=5.0, solver="euler", **e)
    assert a.geometry_of(noise) == G
    assert rel(ours, ref) <= 1e-5
    # The same expert at each call (two forwards each under CFG) as the pipeline, timesteps sigma x 1000.
    assert [i for i, _ in calls.seen] == [i for i, _ in piped]
    assert [t for _, t in calls.seen] == pytest.approx([t for _, t in piped], abs=1e-3)
    # diffusers' flow-match Euler applies the shift twice on WanPipeline's path: matched.
    assert a.timesteps(4, G).tolist() == pytest.approx([1, 0.85769, 0.60215, 0.00893, 0], abs=1e-5)
    if len(a.models) == 2:  # the switch happens on this grid: T1 at 1000, T2 after
        assert [i for i, _ in calls.seen] == [0, 0, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("variant", ["wan2.1", "wan2.2"])
def test_the_unipc_grid_is_the_wan_folders(variant):
    editor = FireFlowEditor.from_pipe(tiny_wan_pipeline(0, variant))
    s = np.linspace(1, 1 / 1000, 5)[:-1]
    want = [*(3 * s / (1 + 2 * s)), 0.0]
    assert editor.adapter.timesteps(4, G).tolist() == pytest.approx(want, abs=2e-6)
    assert editor.adapter.timesteps(4, G).dtype == torch.float64
    bare = FireFlowEditor(transformer=tiny_transformer())
    assert bare.adapter.timesteps(4, G).tolist() == pytest.approx(want, abs=2e-6)


def test_layers_and_processors(editor):
    a = editor.adapter
    n = len(a.models)
    prefix = [f"{i}." for i in range(n)] if n > 1 else [""]
    for p in prefix:
        assert a.layers[f"{p}blocks.1.attn1"] == ("attn1", 1) and a.layers[f"{p}blocks.0.attn2"] == ("attn2", 0)
    assert a.block_counts == {"attn1": 2, "attn2": 2} and a.route == "context"
    assert editor.resolve().blocks == (("attn1", 0), ("attn1", 1))
    with a.processors.installed(a.layers.values()):
        for m in a.models:
            procs = m.attn_processors
            assert all(isinstance(p, WanFeatureProcessor) for p in procs.values())
    assert not any(isinstance(p, WanFeatureProcessor) for m in a.models for p in m.attn_processors.values())


@pytest.mark.parametrize("fused", [False, True])
def test_recording_processors_equal_the_stock_ones_exactly(editor, inputs, fused):
    a = editor.adapter
    for model in a.models:
        if fused:
            model = tiny_transformer(5, in_channels=model.config.in_channels, out_channels=model.config.in_channels)
            model.fuse_qkv_projections()
            layers = {k.partition(".")[2] if len(a.models) > 1 else k: v for k, v in a.layers.items()}
            from fireflow.features import ProcessorInstaller

            installer = ProcessorInstaller({n: model.get_submodule(n) for n in layers}, layers, a.make_processor)
            assert model.blocks[0].attn1.fused_projections
        else:
            installer = a.processors
        kw = dict(
            hidden_states=inputs["latents"],
            encoder_hidden_states=inputs["source_prompt_embeds"],
            timestep=torch.tensor([500.0]),
            return_dict=False,
        )
        with torch.no_grad():
            stock = model(**kw)[0]
            reuse = FeatureReuse(1, 1, "replace_v add_k add_q", set(a.layers.values()))
            call = VelocityCall(0, "start", 0.5, 0.0, 1.0)
            with installer.installed(a.layers.values()), reuse.recording(call), bound(reuse):
                recorded = model(**kw)[0]
        assert torch.equal(stock, recorded)
        assert len(reuse._store) == 3 * 4  # Q, K, V of attn1 and attn2 in 2 blocks
        v1, v2 = (reuse._store[k] for k in reuse._store if k.target == "v" and k.block[1] == 0)
        tokens = inputs["latents"][0, 0].numel() // 4  # F_lat x h/2 x w/2
        assert {tuple(v1.shape), tuple(v2.shape)} == {(1, tokens, 2, 12), (1, 10, 2, 12)}


def test_defaults_counts_and_injection(editor, inputs):
    a = editor.adapter
    with Calls(a.models) as calls:
        out = editor.edit_latents(inputs["latents"], return_dict=True, **_strip(inputs))
    assert out.settings.to_dict()["guidance"] == 3.0 and out.settings.to_dict()["inversion_guidance"] == 1.0
    # V in attn1 of both blocks, at the first denoising midpoint: in both CFG forwards (prompt,
    # negative prompt), as the image families' batched CFG gives both halves the source's V.
    assert out.injections == 2 * [(0, "midpoint", ("attn1", 0)), (0, "midpoint", ("attn1", 1))]
    # FireFlow: 9 velocity evaluations a pass; the edit's CFG is two forwards each.
    assert out.nfe == 18 and out.transformer_calls == 9 + 2 * 9 and out.transformer_rows == 27
    assert len(calls.seen) == out.transformer_calls  # forwards counted on the experts themselves
    if len(a.models) == 2:
        per = [sum(1 for i, _ in calls.seen if i == e) for e in (0, 1)]
        assert per[0] > 0 and per[1] > 0 and sum(per) == 27


def test_inject_zero_equals_inversion_then_sampling(editor, inputs):
    edited = editor.edit_latents(inputs["latents"], inject=0, num_steps=4, **_strip(inputs))
    src = {k[7:]: v for k, v in inputs.items() if k.startswith("source_")}
    tgt = {k[7:]: v for k, v in inputs.items() if k.startswith("target_")}
    noise = editor.invert_latents(inputs["latents"], num_steps=4, inversion_guidance=1.0, **src)
    plain = editor.sample_latents(noise, num_steps=4, guidance=3.0, **tgt)
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


def test_injection_changes_the_edit_in_each_block_kind(editor, inputs):
    base = editor.edit_latents(inputs["latents"], inject=0, num_steps=4, **_strip(inputs))
    for spec in ("attn1:0", "attn1:all", "attn2:all"):
        out = editor.edit_latents(inputs["latents"], return_dict=True, num_steps=4, blocks=spec, **_strip(inputs))
        assert out.injections and {b[0] for *_, b in out.injections} == {spec.split(":")[0]}
        assert (out.latents - base).abs().max() > 1e-4, spec


def test_the_expert_switch_under_fireflow():
    """A FireFlow pass makes N + 1 evaluations, each on the expert for its own time; a start
    velocity reused from a midpoint above the boundary came from the high-noise expert."""
    editor = FireFlowEditor.from_pipe(tiny_wan_pipeline(0, "wan2.2"))  # the UniPC grid
    a = editor.adapter
    assert a.boundary == BOUNDARY_RATIO * 1000
    ts = a.timesteps(4, G).tolist()  # 1, .900, .750, .501, 0
    e = _embeds(4)
    noise = torch.randn(1, *a.latent_shape(G), generator=torch.Generator().manual_seed(3))
    with Calls(a.models) as calls:
        editor.sample_latents(noise, num_steps=4, guidance=1.0, **e)
    times = [ts[0]] + [(ts[i] + ts[i + 1]) / 2 for i in range(4)]  # start, then the 4 midpoints
    assert [t for _, t in calls.seen] == pytest.approx([1000 * t for t in times], abs=1e-3)
    assert [i for i, _ in calls.seen] == [0, 0, 1, 1, 1]  # 1000, 950, 825, ...: N + 1 = 5 calls
    # Step 1 starts at t = .900 (>= .875: the pipeline would ask transformer) and reuses the
    # midpoint velocity at .950, from transformer too; step 2 starts at .750 (transformer_2 in the
    # pipeline) with the velocity from the midpoint .825, made by transformer_2: both consistent here.
    assert a.expert(0.95) == 0 and a.expert(0.825) == 1 and a.expert(0.75) == 1
    # On 3 steps (1, .857, .556, 0 under UniPC's shift) the midpoint .929 (transformer) feeds the
    # start at .857 (transformer_2 in the pipeline): the other expert's velocity, reused once.
    ts3 = a.timesteps(3, G).tolist()
    mid = (ts3[0] + ts3[1]) / 2
    assert a.expert(mid) == 0 and a.expert(ts3[1]) == 1


def test_frames_and_masks(editor):
    a = editor.adapter
    assert a.prepare_frames(9) == 9 and a.prepare_frames(1) == 1
    with pytest.raises(ValueError, match="10 frames: Wan takes 4k \\+ 1 frames; give 9 or 13"):
        a.prepare_frames(10)
    with pytest.raises(ValueError, match="give 5 or 9"):
        a.check_geometry(Geometry(32, 32, 8))
    s = a.vae_scale_factor
    h = 32 // s
    still = a.latent_mask(np.ones((1, 32, 32), bool), G)
    assert still.shape == (1, 1, h, h) and still.all()
    m = np.zeros((9, 32, 32), bool)
    m[0, :s, :s] = True  # latent frame 0, cell (0, 0)
    m[6, -1, -1] = True  # frames 5..8 are latent frame 2, last cell
    lm = a.latent_mask(m, G)
    assert lm.shape == (1, 3, h, h) and lm.sum() == 2 and lm[0, 0, 0, 0] == 1 and lm[0, 2, -1, -1] == 1
    with pytest.raises(ValueError, match="give 1 or 9"):
        a.latent_mask(np.zeros((4, 32, 32), bool), G)


def test_missing_negatives_under_cfg_is_a_clear_error(editor, inputs):
    with pytest.raises(ValueError, match="guidance 4 > 1 is classifier-free guidance on Wan"):
        editor.sample_latents(inputs["latents"], guidance=4.0, prompt_embeds=inputs["target_prompt_embeds"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_edit_a_clip_from_a_tiny_folder(tmp_path, variant):
    from fireflow.testing import save_tiny

    folder = save_tiny(variant, tmp_path / variant)
    editor = FireFlowEditor.from_pretrained(folder, device="cpu", torch_dtype="fp32")
    assert editor.model_name == variant
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(9)]
    out = editor.edit(frames, "a cat", "a dog", num_steps=2)
    video = out.videos[0]
    assert len(video) == 9 and all(f.size == (32, 32) for f in video)
    with pytest.raises(ValueError, match="give 5 or 9"):
        editor.edit(frames[:7], "a cat", "a dog", num_steps=2)


def test_attn2_injection_pulls_the_edit_back_to_the_source(editor, inputs):
    """attn2's V comes from the text: replacing it brings back the source prompt's values, and the
    edit moves toward the source (why attn1 is the default). On these random tiny models attn1
    moves the edit little from plain target sampling; attn2 moves it back toward the source."""
    x = inputs["latents"]
    plain = editor.edit_latents(x, inject=0, **_strip(inputs))
    v1 = editor.edit_latents(x, inject=3, blocks="attn1:all", **_strip(inputs))
    v2 = editor.edit_latents(x, inject=3, blocks="attn2:all", **_strip(inputs))
    assert rel(v2, x) < rel(plain, x) - 1e-3
    assert rel(v2, plain) > rel(v1, plain)
