"""An independent re-statement of the reference FireFlow edit, checked against ``edit_latents``.

Written from docs/method.md in the style of the reference code (BFL's sampling loop, an ``info`` dict,
features keyed by float timesteps as strings), sharing nothing with fireflow's solvers or
processors but the diffusers transformer itself.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from fireflow import FireFlowEditor
from fireflow.models.flux.tiny import tiny_transformer


def reference_timesteps(num_steps, image_seq_len):
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)
    ts = torch.linspace(1, 0, num_steps + 1).tolist()
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in ts]


class ReferenceSingleBlockProcessor:
    """Single-stream attention that stores/loads V by '{t}_{second_order}_{block}_V'."""

    def __init__(self, block_id, info):
        self.block_id, self.info = block_id, info

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b, s, _ = hidden_states.shape
        q = attn.norm_q(attn.to_q(hidden_states).view(b, s, attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states).view(b, s, attn.heads, -1))
        v = attn.to_v(hidden_states).view(b, s, attn.heads, -1)
        info = self.info
        if info["inject"]:
            name = f"{info['t']}_{info['second_order']}_{self.block_id}_V"
            if info["inverse"]:
                info["feature"][name] = v.clone()
            elif name in info["feature"]:
                v = info["feature"][name]
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, s, -1)


def reference_denoise_fireflow(model, img, img_ids, txt, txt_ids, vec, timesteps, inverse, info, guidance):
    """BFL-style loop: the midpoint rule reusing the previous midpoint velocity."""
    inject_list = [True] * info["inject_step"] + [False] * (len(timesteps) - 1 - info["inject_step"])
    if inverse:
        timesteps, inject_list = timesteps[::-1], inject_list[::-1]
    guidance_vec = torch.full((img.shape[0],), guidance)
    next_v = None
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        info["t"] = t_prev if inverse else t_curr  # the interval's upper end keys the features
        info["inverse"], info["inject"] = inverse, inject_list[i]

        def call(x, t):
            return model(
                hidden_states=x,
                encoder_hidden_states=txt,
                pooled_projections=vec,
                timestep=torch.full((x.shape[0],), t),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance_vec,
                return_dict=False,
            )[0]

        info["second_order"] = False
        pred = call(img, t_curr) if next_v is None else next_v
        img_mid = img + (t_prev - t_curr) / 2 * pred
        info["second_order"] = True
        pred_mid = call(img_mid, t_curr + (t_prev - t_curr) / 2)
        next_v = pred_mid
        img = img + (t_prev - t_curr) * pred_mid
    return img


def reference_edit(transformer, latents, src, src_pooled, tgt, tgt_pooled, rows, cols, num_steps, inject):
    info = {"feature": {}, "inject_step": inject}
    transformer.set_attn_processor(
        {
            name: ReferenceSingleBlockProcessor(int(name.split(".")[1]), info) if name.startswith("single") else proc
            for name, proc in transformer.attn_processors.items()
        }
    )
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(src.shape[1], 3)
    ts = reference_timesteps(num_steps, rows * cols)
    with torch.no_grad():
        z = reference_denoise_fireflow(transformer, latents, img_ids, src, txt_ids, src_pooled, ts, True, info, 1.0)
        return reference_denoise_fireflow(transformer, z, img_ids, tgt, txt_ids, tgt_pooled, ts, False, info, 2.0)


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
