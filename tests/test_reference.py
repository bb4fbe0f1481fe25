"""``FireFlowEditor.edit_latents`` against an independent re-statement of the reference FireFlow edit.

The re-statement (``fireflow.bench._reference``, written from docs/method.md in the style of the
reference code) shares nothing with fireflow's solvers or processors but the diffusers transformer;
the speed benchmark times the same loop.
"""

import torch

from fireflow import FireFlowEditor
from fireflow.bench._reference import reference_edit
from fireflow.models.flux.tiny import tiny_transformer


def test_edit_latents_reproduces_the_reference_algorithm():
    torch.manual_seed(0)
    rows, cols = 6, 5  # 96 x 80 pixels
    latents = torch.randn(1, rows * cols, 16)
    src, tgt = torch.randn(1, 9, 32), torch.randn(1, 9, 32)
    src_pooled, tgt_pooled = torch.randn(1, 32), torch.randn(1, 32)

    def reference(num_steps, inject):  # a fresh transformer: the reference installs its own processors
        model = tiny_transformer(seed=3, num_single_layers=4)
        return reference_edit(model, latents, src, src_pooled, tgt, tgt_pooled, rows, cols, num_steps, inject)

    for num_steps, inject in [(8, 1), (15, 2), (4, 0)]:
        ours = FireFlowEditor(transformer=tiny_transformer(seed=3, num_single_layers=4)).edit_latents(
            latents=latents,
            height=rows * 16,
            width=cols * 16,
            source_prompt_embeds=src,
            source_pooled_prompt_embeds=src_pooled,
            target_prompt_embeds=tgt,
            target_pooled_prompt_embeds=tgt_pooled,
            num_steps=num_steps,
            inject=inject,
            guidance=2.0,
        )
        ref = reference(num_steps, inject)
        rel = ((ours - ref).norm() / ref.norm()).item()
        print(f"steps {num_steps} inject {inject}: relative error {rel:.2e}")
        assert rel <= 1e-5, (num_steps, inject, rel)
        if inject:  # the check has teeth: dropping the injection moves the result far more
            plain = reference(num_steps, 0)
            assert ((plain - ref).norm() / ref.norm()).item() > 100 * max(rel, 1e-6)
