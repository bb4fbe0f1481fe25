"""Wan's attention with a hook on Q, K and V, for feature reuse (the "context" route).

Wan's blocks call their attention modules without keyword arguments, so the edit's store cannot
arrive as an attention kwarg: the processor reads it from :func:`fireflow.features.current`, which
the adapter binds around each transformer call (``ModelAdapter.feature_call``).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from fireflow.features import BlockId, current
from fireflow.models.base import attention_modules


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding, as ``WanAttnProcessor`` applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanFeatureProcessor:
    """diffusers' ``WanAttnProcessor``, computed the same way (fused or unfused projections,
    RMS Q/K norms across heads before the head split, 3-D RoPE on attn1, the I2V image branch),
    handing Q, K, V (``[B, S, heads, head_dim]``, Q and K after the norms and RoPE: what attention
    uses) to the store bound for this call. ``attn1``: S is the video tokens (``F_lat * h/2 * w/2``);
    ``attn2``: Q over video tokens, K and V over the text tokens. Without a store it is the stock
    processor, bit for bit.
    """

    def __init__(self, block: BlockId, backend=None, parallel_config=None):
        self.block = block
        self._attention_backend = backend
        self._parallel_config = parallel_config

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # 512: the text encoder's context length, as diffusers hardcodes it (I2V models)
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rope(query, *rotary_emb)
            key = _rope(key, *rotary_emb)

        store = current()
        if store is not None:
            query, key, value = store(self.block, query, key, value)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=(self._parallel_config if encoder_hidden_states is None else None),
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def wan_layers(transformer: torch.nn.Module, prefix: str = "") -> dict[str, BlockId]:
    """Attention module path (with ``prefix``) -> block id: ``("attn1", i)`` for the self-attention
    over video tokens, ``("attn2", i)`` for the cross-attention to the text."""
    out: dict[str, BlockId] = {}
    for name in attention_modules(transformer):
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in ("attn1", "attn2"):
            raise ValueError(f"not a Wan transformer: unexpected attention layer {name!r}")
        out[prefix + name] = (parts[2], int(parts[1]))
    return out
