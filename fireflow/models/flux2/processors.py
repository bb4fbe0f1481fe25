"""FLUX.2 attention with a hook on Q, K and V, for feature reuse, in both block kinds.

FLUX.2's two block kinds run different attention modules, so each gets its own processor:

* double blocks (``Flux2Attention``): image Q/K/V from ``to_q/k/v`` (or the fused ``to_qkv``), text
  from ``add_q/k/v_proj`` (or ``to_added_qkv``), joined **[text, image]**;
* single blocks (``Flux2ParallelSelfAttention``): one fused projection ``to_qkv_mlp_proj`` yields
  Q, K, V and the MLP input; the processor itself runs the SwiGLU and the fused output
  ``to_out(cat[attention, mlp])``. The sequence is already [text, image].

Both hand Q, K, V to the edit's store after the Q/K RMS-norm and before RoPE (which touches only
Q and K), as ``[B, S, heads, head_dim]``, and without a store compute exactly what diffusers'
``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor`` compute. Reference-image tokens that
follow the [text, image] part (FLUX.2's multi-reference input) are never handed over: see
:class:`Bounded`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from fireflow.features import BlockId
from fireflow.models.base import attention_modules

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Bounded:
    """The edit's store, bounded to the first ``tokens`` tokens of the joint sequence: the text
    and noisy image tokens. Anything after them (reference-image tokens) is neither recorded nor
    injected into. The adapter passes it under the one ``fireflow`` attention kwarg."""

    reuse: Callable[[BlockId, torch.Tensor, torch.Tensor, torch.Tensor], QKV]
    tokens: int

    def __call__(self, block: BlockId, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV:
        n = self.tokens
        if q.shape[1] <= n:
            return self.reuse(block, q, k, v)
        head = self.reuse(block, q[:, :n], k[:, :n], v[:, :n])
        return tuple(torch.cat([h, x[:, n:]], dim=1) for h, x in zip(head, (q, k, v), strict=True))  # type: ignore[return-value]


class _Processor:
    _attention_backend = None
    _parallel_config = None

    def __init__(self, block: BlockId):
        self.block = block

    def _attend(self, q, k, v, fireflow, attention_mask, image_rotary_emb) -> torch.Tensor:
        if fireflow is not None:
            q, k, v = fireflow(self.block, q, k, v)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            q, k, v, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return out.flatten(2, 3).to(q.dtype)


class Flux2DoubleProcessor(_Processor):
    """A double block's joint attention (``Flux2Attention``), text and image streams."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        fireflow: Callable | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        fused = getattr(attn, "fused_projections", False)
        if fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        shape = (-1, attn.head_dim)
        q, k, v = q.unflatten(-1, shape), k.unflatten(-1, shape), v.unflatten(-1, shape)
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            x = encoder_hidden_states
            if fused and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(x).chunk(3, dim=-1)
            else:
                eq, ek, ev = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
            eq, ek, ev = eq.unflatten(-1, shape), ek.unflatten(-1, shape), ev.unflatten(-1, shape)
            # Text first, then image (and any reference tokens): the order the single blocks see.
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        out = self._attend(q, k, v, fireflow, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        text_len = encoder_hidden_states.shape[1]
        text_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(text_out)


class Flux2SingleProcessor(_Processor):
    """A single block's parallel attention + MLP (``Flux2ParallelSelfAttention``) over [text, image]."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        fireflow: Callable | None = None,
    ) -> torch.Tensor:
        h = attn.to_qkv_mlp_proj(hidden_states)
        # The fused output splits by the global QKV : MLP ratio, as diffusers splits it (so a
        # column-sharded projection splits the same way).
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = h.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(h, [local_qkv, h.shape[-1] - local_qkv], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        shape = (-1, attn.head_dim)
        q, k, v = q.unflatten(-1, shape), k.unflatten(-1, shape), v.unflatten(-1, shape)
        q, k = attn.norm_q(q), attn.norm_k(k)
        out = self._attend(q, k, v, fireflow, attention_mask, image_rotary_emb)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


KINDS = {"transformer_blocks": "double", "single_transformer_blocks": "single"}
PROCESSORS = {"double": Flux2DoubleProcessor, "single": Flux2SingleProcessor}


def flux2_layers(transformer: torch.nn.Module) -> dict[str, BlockId]:
    """Attention module path -> block id for every attention layer of a ``Flux2Transformer2DModel``."""
    out: dict[str, BlockId] = {}
    for name in attention_modules(transformer):
        parts = name.split(".")
        if parts[0] not in KINDS or len(parts) != 3 or parts[2] != "attn":
            raise ValueError(f"not a FLUX.2 transformer: unexpected attention layer {name!r}")
        out[name] = (KINDS[parts[0]], int(parts[1]))
    return out
