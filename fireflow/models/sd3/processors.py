"""SD3 / SD3.5 joint attention with a hook on Q, K and V, for feature reuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fireflow.features import BlockId, FeatureReuse
from fireflow.models.base import attention_modules


class SD3FeatureProcessor:
    """SD3's joint attention (``attn``, image + text) or SD3.5's image-only ``attn2``, handing
    Q, K, V to the edit's store after the Q/K norms, over the joint sequence **[image, text]**
    (``[B, heads, S, head_dim]``). Without a store it computes exactly what diffusers'
    ``JointAttnProcessor2_0`` computes, the ``context_pre_only`` last block included.
    """

    def __init__(self, block: BlockId):
        self.block = block

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        fireflow: FeatureReuse | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, image_len = hidden_states.shape[0], hidden_states.shape[1]
        q, k, v = _heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states), b)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            x = encoder_hidden_states
            eq, ek, ev = _heads(attn, attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x), b)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            # Image tokens first, then text: SD3's order (FLUX puts text first).
            q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
        if fireflow is not None:
            q, k, v = fireflow(self.block, q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :image_len], out[:, image_len:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, context
        return out


def _heads(attn, q, k, v, b):
    head_dim = k.shape[-1] // attn.heads
    return tuple(x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))


def sd3_layers(transformer: torch.nn.Module) -> dict[str, BlockId]:
    """Attention module path -> block id: ``("joint", i)`` for ``attn``, ``("attn2", i)`` for SD3.5's
    image-only second attention."""
    out: dict[str, BlockId] = {}
    for name in attention_modules(transformer):
        parts = name.split(".")
        if parts[0] != "transformer_blocks" or parts[2] not in ("attn", "attn2"):
            raise ValueError(f"not an SD3 transformer: unexpected attention layer {name!r}")
        out[name] = ("joint" if parts[2] == "attn" else "attn2", int(parts[1]))
    return out
