"""The family contract with stub families: what video families need, without any diffusers model.

The stub transformer has no ``set_attn_processor`` and calls its attention modules without kwargs
(as Wan's and Z-Image's blocks do), so the edit's store reaches the processors through the context
route. Its adapter has two experts chosen per call by the time (Wan 2.2), per-token timesteps
(Wan 2.2 TI2V) and samples of several frames.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fireflow import FireFlowEditor
from fireflow.features import BlockId, current
from fireflow.models.base import Conditioning, Geometry, ModelAdapter, attention_modules, batch_to, grid_mask

C, SIDE, FRAMES, TEXT = 8, 4, 3, 5  # channels, cells per side (1 pixel per cell), frames, text tokens


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head attention over ``[B, S, 1, C]``."""
    w = torch.softmax(q[:, :, 0] @ k[:, :, 0].transpose(1, 2) / C**0.5, dim=-1)
    return w @ v[:, :, 0]


class StockProcessor:
    def __call__(self, attn, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x)[:, :, None] for p in (attn.to_q, attn.to_k, attn.to_v))
        return attend(q, k, v)


class ReuseProcessor:
    """The stub's feature processor: the stock computation, handing Q, K, V to the bound store."""

    def __init__(self, block: BlockId, barrier: threading.Barrier | None = None):
        self.block, self.barrier = block, barrier

    def __call__(self, attn, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x)[:, :, None] for p in (attn.to_q, attn.to_k, attn.to_v))
        store = current()
        if store is not None:
            if self.barrier is not None:  # both threads inside a feature call at once
                self.barrier.wait(timeout=30)
            q, k, v = store(self.block, q, k, v)
        return attend(q, k, v)


class StubAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(C, C) for _ in range(3))
        self.processor = StockProcessor()

    def set_processor(self, processor) -> None:
        self.processor = processor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.processor(self, x)  # no kwargs: as Wan's and Z-Image's blocks call attention


class StubTransformer(torch.nn.Module):
    """[text, video tokens] through two attention blocks, modulated by a per-token time."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"attn": StubAttention()}) for _ in range(2)])
        self.out = torch.nn.Linear(C, C)
        self.calls = 0

    def forward(self, x: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == x.shape[:2], "per-token timesteps"
        self.calls += 1
        h = torch.cat([text, x * (1 + t[..., None])], dim=1)
        for block in self.blocks:
            h = h + block["attn"](h)
        return self.out(h[:, text.shape[1] :])


@dataclass
class StubConditioning(Conditioning):
    text: torch.Tensor | None = None


class StubAdapter(ModelAdapter):
    """Two experts switched at t = 0.5, per-token timesteps, latents ``[B, F * SIDE * SIDE, C]``."""

    name = "stub"
    route = "context"
    video = True
    DEFAULTS = {"blocks": "attn:all"}

    def __init__(self, barrier: threading.Barrier | None = None):
        experts = [StubTransformer(0), StubTransformer(1)]
        layers = {
            f"{i}.{n}": ("attn", int(n.split(".")[1])) for i, m in enumerate(experts) for n in attention_modules(m)
        }
        self.barrier = barrier
        super().__init__(experts, layers)
        self.multiple = 1

    def make_processor(self, block, current):
        return ReuseProcessor(block, self.barrier)

    def check_geometry(self, geometry):
        pass

    def latent_shape(self, g):
        return (g.frames * g.height * g.width, C)

    def latent_mask(self, mask, g):
        m = np.broadcast_to(np.asarray(mask, dtype=bool), (g.frames, g.height, g.width))
        return torch.cat([grid_mask(f, g.height, g.width).reshape(-1, 1) for f in m])  # [F S, 1]

    def encode_prompt(self, prompts):
        raise NotImplementedError

    def encode_image(self, pixels):
        raise NotImplementedError

    def decode(self, latents, g):
        raise NotImplementedError

    def prepare_image(self, image, resize=None):
        raise NotImplementedError

    def timesteps(self, num_steps, g):
        return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)

    def conditioning(self, embeds, g, guidance):
        return StubConditioning(text=embeds["prompt_embeds"])

    def velocity(self, latents, t, cond, attention_kwargs=None):
        assert attention_kwargs is None  # the context route passes nothing through kwargs
        expert = self.models[0] if t >= 0.5 else self.models[1]
        per_token = torch.full(latents.shape[:2], t)
        return expert(latents, batch_to(cond.text, latents.shape[0]), per_token)


@pytest.fixture()
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        latents=torch.randn(1, FRAMES * SIDE * SIDE, C, generator=g),
        source_prompt_embeds=torch.randn(1, TEXT, C, generator=g),
        target_prompt_embeds=torch.randn(1, TEXT, C, generator=g),
    )


def _edit(editor, inputs, **kw):
    return editor.edit_latents(**inputs, height=SIDE, width=SIDE, num_frames=FRAMES, return_dict=True, **kw)


def test_context_route_records_and_injects(inputs):
    editor = FireFlowEditor(StubAdapter())
    out = _edit(editor, inputs, num_steps=4)
    # Defaults: inject 1 -> the first denoising midpoint, in both blocks, by the expert of that time.
    assert out.injections == [(0, "midpoint", ("attn", 0)), (0, "midpoint", ("attn", 1))]
    assert out.nfe == 10 and out.transformer_calls == 10  # N + 1 per pass
    plain = _edit(editor, inputs, num_steps=4, inject=0)
    assert plain.injections == [] and (out.latents - plain.latents).abs().max() > 1e-3
    noise = editor.invert_latents(inputs["latents"], SIDE, SIDE, num_frames=FRAMES, num_steps=4,
                                  prompt_embeds=inputs["source_prompt_embeds"])  # fmt: skip
    back = editor.sample_latents(noise, SIDE, SIDE, num_frames=FRAMES, num_steps=4,
                                 prompt_embeds=inputs["target_prompt_embeds"])  # fmt: skip
    torch.testing.assert_close(plain.latents, back, rtol=0, atol=0)


def test_processors_go_per_module_and_come_back(inputs):
    adapter = StubAdapter()
    seen = []
    FireFlowEditor(adapter).edit_latents(
        **inputs, height=SIDE, width=SIDE, num_frames=FRAMES, num_steps=2,
        callback=lambda *a: seen.append([type(m.blocks[0]["attn"].processor) for m in adapter.models]),
    )  # fmt: skip
    assert seen[0] == [ReuseProcessor, ReuseProcessor]  # both experts, no set_attn_processor needed
    assert all(isinstance(m.blocks[i]["attn"].processor, StockProcessor) for m in adapter.models for i in (0, 1))


def test_two_experts_are_chosen_by_time(inputs):
    adapter = StubAdapter()
    FireFlowEditor(adapter).edit_latents(**inputs, height=SIDE, width=SIDE, num_frames=FRAMES, num_steps=4)
    # Grid 1, .75, .5, .25, 0: each pass makes 5 calls; times >= 0.5 go to the first expert.
    # Inversion (0 -> 1): 0, .125, .375, .625, .875 -> 3 second, 2 first; denoising: 1, .875, .625, .375, .125.
    assert [m.calls for m in adapter.models] == [2 + 3, 3 + 2]


def test_a_still_mask_keeps_every_frame_outside_it(inputs):
    editor = FireFlowEditor(StubAdapter())
    mask = np.zeros((SIDE, SIDE), bool)
    mask[:2, :2] = True  # a 2-D mask broadcasts over the frames
    g = Geometry(SIDE, SIDE, FRAMES)
    latent_mask = editor.adapter.latent_mask(mask, g)
    assert latent_mask.shape == (FRAMES * SIDE * SIDE, 1) and latent_mask.sum() == 4 * FRAMES
    out = _edit(editor, inputs, num_steps=3, mask=latent_mask)
    keep = latent_mask[:, 0] == 0
    assert torch.equal(out.latents[0, keep], inputs["latents"][0, keep])
    assert (out.latents[0, ~keep] - inputs["latents"][0, ~keep]).abs().max() > 1e-3


def test_geometry_with_frames_checks_the_latents(inputs):
    editor = FireFlowEditor(StubAdapter())
    with pytest.raises(ValueError, match=r"do not fit a 4x4, 2 frames clip"):
        editor.edit_latents(**inputs, height=SIDE, width=SIDE, num_frames=2)


def test_two_threads_on_the_context_route_overlap_and_keep_their_features(inputs):
    """Two edits on one model in two threads, held together inside their feature calls by a
    barrier: each gets exactly its solo result (a context variable is per thread)."""
    g = torch.Generator().manual_seed(1)
    other = {k: torch.randn(v.shape, generator=g) for k, v in inputs.items()}
    solo = [_edit(FireFlowEditor(StubAdapter()), x, num_steps=3).latents for x in (inputs, other)]
    editor = FireFlowEditor(StubAdapter(threading.Barrier(2)))
    results: dict[int, torch.Tensor] = {}

    def run(i, x):
        results[i] = _edit(editor, x, num_steps=3).latents

    threads = [threading.Thread(target=run, args=(i, x)) for i, x in enumerate((inputs, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0, 1]
    for i in (0, 1):
        torch.testing.assert_close(results[i], solo[i], rtol=0, atol=0)


def test_compile_on_the_context_route_runs_feature_calls_eager(inputs):
    """``torch.compile(fullgraph=True)`` cannot trace ``ContextVar.get()``: with compile on, every
    call made while an edit's processors are installed runs eager, and the edit is unchanged."""
    plain = _edit(FireFlowEditor(StubAdapter()), inputs, num_steps=2).latents
    adapter = StubAdapter()
    adapter.optimize(compile=True, backend="eager")
    torch._dynamo.reset()
    compiled = _edit(FireFlowEditor(adapter), inputs, num_steps=2).latents
    torch.testing.assert_close(compiled, plain, rtol=1e-6, atol=1e-6)
    # Without the eager stance the processors' context variable breaks a fullgraph trace.
    adapter.processors.factory = lambda block, cur: ReuseProcessor(block)
    with adapter.processors.installed([("attn", 0)]), pytest.raises(Exception, match="ContextVar"):
        adapter.models[0](inputs["latents"], inputs["source_prompt_embeds"], torch.zeros(1, FRAMES * SIDE * SIDE))
