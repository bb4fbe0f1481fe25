"""Editing semantics on a tiny random FLUX transformer, at the latent level."""

import re

import pytest
import torch

from fireflow import EditSettings, FireFlowEditor
from fireflow.features import parse_strategy
from fireflow.models.base import Geometry
from fireflow.models.flux.processors import FluxFeatureProcessor
from fireflow.models.flux.tiny import tiny_transformer

H = W = 64  # 4 x 4 packed tokens with FLUX's 16-pixel tokens


@pytest.fixture(scope="module")
def editor():
    # 3 single blocks so block selection means something.
    return FireFlowEditor(transformer=tiny_transformer(seed=0, num_single_layers=3))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        latents=torch.randn(1, 16, 16, generator=g),
        height=H,
        width=W,
        source_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        source_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        target_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        target_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
    )


def _embeds(inputs, which):
    return {name: inputs[f"{which}_{name}"] for name in ("prompt_embeds", "pooled_prompt_embeds")}


def _edit(editor, inputs, **kw):
    return editor._edit(
        inputs["latents"],
        Geometry(H, W),
        _embeds(inputs, "source"),
        _embeds(inputs, "target"),
        editor.resolve(EditSettings(**kw)),
    )


class CallCounter:
    """Counts transformer forward calls through a forward pre-hook."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.n += 1


def test_defaults_inject_once_per_block_at_first_midpoint(editor, inputs):
    counter = CallCounter(editor.transformer)
    try:
        out = _edit(editor, inputs)
    finally:
        counter.handle.remove()
    assert out.nfe == counter.n == 18
    assert out.injections == [(0, "midpoint", ("single", i)) for i in range(3)]
    assert out.settings.blocks == tuple(("single", i) for i in range(3)) and out.settings.strategy == "replace_v"


@pytest.mark.parametrize(
    "solver,inject,expected",
    [
        ("fireflow", 2, [(0, "midpoint"), (1, "midpoint")]),
        ("midpoint", 1, [(0, "start"), (0, "midpoint")]),
        ("euler", 2, [(0, "start"), (1, "start")]),
    ],
)
def test_injection_points_follow_the_matching_rule(editor, inputs, solver, inject, expected):
    out = _edit(editor, inputs, num_steps=4, inject=inject, solver=solver, blocks=[1])
    assert [(s, k) for s, k, _ in out.injections] == expected
    assert {b for *_, b in out.injections} == {("single", 1)}


def test_injection_changes_the_output(editor, inputs):
    a = editor.edit_latents(**inputs, inject=0)
    b = editor.edit_latents(**inputs, inject=1)
    assert (a - b).abs().max() > 1e-3


def test_inject_zero_equals_plain_inversion_then_sampling(editor, inputs):
    edited = editor.edit_latents(**inputs, inject=0)
    # Plain path: the model's own diffusers processors, no feature reuse anywhere.
    noise = editor.invert_latents(
        inputs["latents"],
        H,
        W,
        prompt_embeds=inputs["source_prompt_embeds"],
        pooled_prompt_embeds=inputs["source_pooled_prompt_embeds"],
        inversion_guidance=1.0,
    )
    plain = editor.sample_latents(
        noise,
        H,
        W,
        prompt_embeds=inputs["target_prompt_embeds"],
        pooled_prompt_embeds=inputs["target_pooled_prompt_embeds"],
        guidance=2.0,
    )
    torch.testing.assert_close(edited, plain, rtol=1e-6, atol=1e-6)


def test_deterministic(editor, inputs):
    assert torch.equal(editor.edit_latents(**inputs), editor.edit_latents(**inputs))


def test_edit_many_equals_separate_edits(editor, inputs):
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(3, 7, 32, generator=g)
    pooled = torch.randn(3, 32, generator=g)
    many = _edit(editor, {**inputs, "target_prompt_embeds": targets, "target_pooled_prompt_embeds": pooled})
    assert many.transformer_calls == 18 and many.transformer_rows == 9 + 9 * 3
    assert many.nfe == 9 + 9 * 3
    assert many.latents.shape == (3, 16, 16)
    for i in range(3):
        one = editor.edit_latents(
            **{**inputs, "target_prompt_embeds": targets[i : i + 1], "target_pooled_prompt_embeds": pooled[i : i + 1]}
        )
        torch.testing.assert_close(many.latents[i : i + 1], one, rtol=1e-5, atol=1e-5)


def test_processors_restored_after_edit_and_after_error(editor, inputs):
    before = dict(editor.transformer.attn_processors)
    editor.edit_latents(**inputs)
    assert editor.transformer.attn_processors == before
    bad = {**inputs, "target_prompt_embeds": torch.randn(1, 7, 5)}  # wrong width: fails mid-edit
    with pytest.raises(RuntimeError):
        editor.edit_latents(**bad)
    after = editor.transformer.attn_processors
    assert after == before and not any(isinstance(p, FluxFeatureProcessor) for p in after.values())


def test_processors_installed_during_edit(editor, inputs):
    seen = []
    editor.edit_latents(
        **inputs,
        num_steps=2,
        callback=lambda i, t, x: seen.append(
            type(editor.transformer.attn_processors["single_transformer_blocks.0.attn.processor"])
        ),
    )
    assert seen == [FluxFeatureProcessor] * 2


def test_strategies_and_ratios(editor, inputs):
    base = editor.edit_latents(**inputs)
    add_v = editor.edit_latents(**inputs, strategy="add_v")
    # replace_v with V scaled by 1 equals replace_v; scaled by 0 replaces V with zeros: different.
    zero_v = editor.edit_latents(**inputs, ratios=(1.0, 1.0, 0.0))
    combo = editor.edit_latents(**inputs, strategy="replace_v add_k")
    assert (base - add_v).abs().max() > 1e-4
    assert (base - zero_v).abs().max() > 1e-4
    assert (base - combo).abs().max() > 1e-4
    assert parse_strategy("replace_v add_k add_q") == {"v": "replace", "k": "add", "q": "add"}


def test_double_blocks_option(editor, inputs):
    out = _edit(editor, inputs, blocks="double:0")
    assert out.injections == [(0, "midpoint", ("double", 0))]
    both = _edit(editor, inputs, blocks="single:all,double:all")
    assert {b for *_, b in both.injections} == {("single", 0), ("single", 1), ("single", 2), ("double", 0)}
    assert _edit(editor, inputs, blocks="none").injections == []
    assert (out.latents - editor.edit_latents(**inputs, inject=0)).abs().max() > 1e-4


def test_feature_storage_on_cpu_gives_same_result(editor, inputs):
    torch.testing.assert_close(editor.edit_latents(**inputs), editor.edit_latents(**inputs, feature_device="cpu"))


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(inject=9), "inject must be between 0 and the step count 8"),
        (dict(strategy="swap_v"), "unknown strategy 'swap_v'"),
        (dict(strategy="add_v replace_v"), "both adds and replaces V"),
        (dict(strategy="replace_v replace_v"), "repeats V"),
        (dict(blocks=[3]), "single block 3 out of range; this model has single blocks 0..2"),
        (dict(blocks="double:1"), "double block 1 out of range; this model has double blocks 0..0"),
        (dict(blocks="0-100000000"), "single block 0-100000000 out of range"),
        (dict(blocks="2-1"), "range '2-1' is reversed"),
        (dict(blocks=""), "blocks is empty"),
        (dict(blocks="joint:0"), "this model has no 'joint' blocks; its blocks: double (0..0), single (0..2)"),
        (dict(solver="rk4"), "unknown solver 'rk4'"),
        (dict(num_steps=0), "num_steps must be between 1 and 1000"),
        (dict(num_steps=2.5), "num_steps must be a whole number"),
        (dict(guidance=float("nan")), "guidance must be a finite number between 0 and 100"),
        (dict(guidance=1e308), "guidance must be a finite number"),
        (dict(inversion_guidance=-1e6), "inversion_guidance must be a finite number"),
        (dict(ratios=(1, 1)), "ratios must be three numbers"),
        (dict(feature_device="cdua"), "unknown feature_device 'cdua'"),
        (dict(blocks="a-b"), "bad item 'a-b'"),
    ],
)
def test_bad_settings(editor, inputs, kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        editor.edit_latents(**inputs, **kw)


def test_token_count_checked(editor, inputs):
    message = "latents of shape (1, 16, 16) do not fit a 32x32 image; this model expects [batch, 4, 16]"
    with pytest.raises(ValueError, match=re.escape(message)):
        editor.edit_latents(**{**inputs, "height": 32, "width": 32})


def test_concurrent_edits_do_not_share_features(editor, inputs):
    """Two threads editing at once on one transformer get what they get alone."""
    import threading

    g = torch.Generator().manual_seed(2)
    other = {**inputs, "target_prompt_embeds": torch.randn(1, 7, 32, generator=g)}
    alone = [editor.edit_latents(**inputs), editor.edit_latents(**other)]
    results = [None, None]

    def run(i, kw):
        results[i] = editor.edit_latents(**kw)

    threads = [threading.Thread(target=run, args=(i, kw)) for i, kw in enumerate([inputs, other])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, alone):
        torch.testing.assert_close(got, want)
    assert editor.transformer.attn_processors == dict(editor.transformer.attn_processors)
    assert not any(isinstance(p, FluxFeatureProcessor) for p in editor.transformer.attn_processors.values())


def test_only_selected_layers_get_processors_and_others_keep_theirs(editor, inputs):
    """A foreign processor (an IP-adapter's, say) on an unselected layer stays, and still runs."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    calls = []

    class Foreign(FluxAttnProcessor):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    name = "transformer_blocks.0.attn.processor"
    before = dict(editor.transformer.attn_processors)
    foreign = Foreign()
    editor.transformer.set_attn_processor({**before, name: foreign})
    seen = []
    try:
        editor.edit_latents(
            **inputs,
            num_steps=2,
            callback=lambda *a: seen.append(dict(editor.transformer.attn_processors)),
        )
        during = seen[0]
        assert during[name] is foreign and len(calls) == 2 * 3  # every call of both passes
        assert all(
            isinstance(during[f"single_transformer_blocks.{i}.attn.processor"], FluxFeatureProcessor) for i in range(3)
        )
        assert editor.transformer.attn_processors[name] is foreign
    finally:
        editor.transformer.set_attn_processor(before)


def test_bare_transformers_get_their_family(inputs):
    from fireflow.models.sd3.tiny import tiny_sd3_transformer

    assert FireFlowEditor(transformer=tiny_transformer()).model_name == "flux"
    assert FireFlowEditor(transformer=tiny_sd3_transformer()).model_name == "sd3"
    with pytest.raises(ValueError, match="Linear is not a supported model"):
        FireFlowEditor(transformer=torch.nn.Linear(2, 2))


def test_generate_refuses_a_size_over_max_pixels_before_any_work(tiny_editor):
    with pytest.raises(ValueError, match=r"size 100000x100000 is 10000000000 pixels, more than max_pixels=16777216"):
        tiny_editor.generate("a cat", height=100000, width=100000)
    with pytest.raises(ValueError, match="more than max_pixels=1024"):
        tiny_editor.generate("a cat", height=64, width=32, max_pixels=1024)
    assert tiny_editor.generate("a cat", height=32, width=32, max_pixels=1024, num_steps=1).images[0].size == (32, 32)
