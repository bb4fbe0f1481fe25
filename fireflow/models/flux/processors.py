"""FLUX.1 attention with a hook on Q, K and V, for feature reuse."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from fireflow.features import BlockId, FeatureReuse
from fireflow.models.base import attention_modules


class FluxFeatureProcessor:
    """FLUX.1 attention (double and single blocks) that hands Q, K, V to the edit's store.

    Q and K are taken after their RMS-norm, V as projected, all before RoPE (which touches only
    Q and K), over the joint sequence [text, image]. Without a store in the call it computes
    what diffusers' ``FluxAttnProcessor`` computes, and it follows ``set_attention_backend``.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, block: BlockId):
        self.block = block

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        fireflow: FeatureReuse | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        q, k, v = _projections(attn, hidden_states, fused="to_qkv", names=("to_q", "to_k", "to_v"))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            eq, ek, ev = _projections(
                attn,
                encoder_hidden_states,
                fused="to_added_qkv",
                names=("add_q_proj", "add_k_proj", "add_v_proj"),
            )
            # Text tokens first, then image tokens: the joint sequence the single blocks also see.
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if fireflow is not None:
            q, k, v = fireflow(self.block, q, k, v)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            q,
            k,
            v,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(q.dtype)
        if not joint:
            return out
        text_len = encoder_hidden_states.shape[1]
        encoder_out, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


def _projections(
    attn: torch.nn.Module, x: torch.Tensor, fused: str, names: tuple[str, str, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V as ``[B, S, H, D]``, from fused or separate projections."""
    # Plain statements, no generators: this runs in every attention layer of every call, and on a
    # launch-bound GPU (FLUX at 512², eager) its Python time is the forward's time.
    if getattr(attn, "fused_projections", False):
        q, k, v = getattr(attn, fused)(x).chunk(3, dim=-1)
    else:
        q, k, v = getattr(attn, names[0])(x), getattr(attn, names[1])(x), getattr(attn, names[2])(x)
    shape = (-1, attn.head_dim)
    return q.unflatten(-1, shape), k.unflatten(-1, shape), v.unflatten(-1, shape)


def flux_layers(transformer: torch.nn.Module) -> dict[str, BlockId]:
    """Attention module path -> block id for every attention layer of a ``FluxTransformer2DModel``."""
    out: dict[str, BlockId] = {}
    kinds = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
    for name in attention_modules(transformer):
        parts = name.split(".")
        if parts[0] not in kinds:
            raise ValueError(f"not a FLUX.1 transformer: unexpected attention layer {name!r}")
        out[name] = (kinds[parts[0]], int(parts[1]))
    return out
