"""The reference FireFlow edit, re-stated in the reference code's style on diffusers' FLUX blocks.

Written from docs/method.md the way the authors' code is written (BFL's sampling loop, an ``info``
dict, values stored under string keys built from float timesteps), sharing nothing with fireflow's
solvers, schedules or processors but the diffusers transformer. Two uses: ``tests/test_reference.py``
checks that :meth:`FireFlowEditor.edit_latents` reproduces it, and the speed benchmark times it
beside fireflow's edit on the same card (the ``reference`` part), since the reference
implementation's own timing exists for an H200 only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb


def reference_timesteps(num_steps: int, image_seq_len: int) -> list[float]:
    """BFL's schedule: a uniform grid shifted by ``mu``, interpolated in the image's token count."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)
    ts = torch.linspace(1, 0, num_steps + 1).tolist()
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in ts]


class ReferenceSingleBlockProcessor:
    """Single-stream attention that stores (inversion) or loads (editing) V under
    ``'{t}_{second_order}_{block}_V'``."""

    def __init__(self, block_id: int, info: dict):
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
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device)
    next_v = None
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        info["t"] = t_prev if inverse else t_curr  # the interval's upper end keys the features
        info["inverse"], info["inject"] = inverse, inject_list[i]

        def call(x, t):
            return model(
                hidden_states=x,
                encoder_hidden_states=txt,
                pooled_projections=vec,
                timestep=torch.full((x.shape[0],), t, device=x.device),
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


@torch.no_grad()
def reference_edit(
    transformer, latents, src, src_pooled, tgt, tgt_pooled, rows, cols, num_steps, inject, guidance=2.0
) -> torch.Tensor:
    """Invert ``latents`` (packed, ``rows x cols`` tokens) with the source prompt, then sample with the
    target. The transformer's processors are the reference's for the call and restored after it."""
    info = {"feature": {}, "inject_step": inject}
    before = transformer.attn_processors
    transformer.set_attn_processor(
        {
            name: ReferenceSingleBlockProcessor(int(name.split(".")[1]), info) if name.startswith("single") else proc
            for name, proc in before.items()
        }
    )
    try:
        device = latents.device
        img_ids = torch.zeros(rows, cols, 3, device=device)
        img_ids[..., 1] = torch.arange(rows, device=device)[:, None]
        img_ids[..., 2] = torch.arange(cols, device=device)[None]
        img_ids = img_ids.reshape(-1, 3)
        txt_ids = torch.zeros(src.shape[1], 3, device=device)
        ts = reference_timesteps(num_steps, rows * cols)
        z = reference_denoise_fireflow(transformer, latents, img_ids, src, txt_ids, src_pooled, ts, True, info, 1.0)
        return reference_denoise_fireflow(transformer, z, img_ids, tgt, txt_ids, tgt_pooled, ts, False, info, guidance)
    finally:
        transformer.set_attn_processor(before)
