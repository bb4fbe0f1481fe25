"""Qwen-Image joint attention with a hook on Q, K and V, for feature reuse."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from fireflow.features import BlockId, FeatureReuse
from fireflow.models.base import attention_modules


class QwenImageFeatureProcessor:
    """Qwen-Image's double-stream attention that hands Q, K, V to the edit's store.

    Q and K are taken after their per-stream RMS-norm, V as projected, all before RoPE (which
    touches only Q and K), as ``[B, S, heads, head_dim]`` over the joint sequence **[text, image]**.
    Without a store in the call it computes exactly what diffusers' ``QwenDoubleStreamAttnProcessor2_0``
    computes (RoPE per stream, the text padding mask), and it follows ``set_attention_backend``.

    ``Attention.forward`` passes only the kwargs this signature names: every kwarg of the stock
    processor is declared, plus ``fireflow``.
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
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        fireflow: FeatureReuse | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("Qwen-Image attention takes encoder_hidden_states_mask, not an attention_mask")
        head_dim = attn.inner_dim // attn.heads
        shape = (-1, head_dim)
        x, c = hidden_states, encoder_hidden_states
        q, k, v = attn.to_q(x).unflatten(-1, shape), attn.to_k(x).unflatten(-1, shape), attn.to_v(x)
        v = v.unflatten(-1, shape)
        tq, tk = attn.add_q_proj(c).unflatten(-1, shape), attn.add_k_proj(c).unflatten(-1, shape)
        tv = attn.add_v_proj(c).unflatten(-1, shape)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        text_len = c.shape[1]
        if fireflow is not None:
            # Text tokens first, then image tokens: the order the attention runs in.
            image_len = x.shape[1]
            cur = (torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1))
            try:
                got = fireflow(self.block, *cur)
            except RuntimeError as e:  # adding features recorded under a text of another length
                raise ValueError(
                    f"{self.block}: the recorded features do not fit this call's {text_len} text tokens ({e}); "
                    "encode the source and target prompts in one batch so that they are padded alike"
                ) from None
            (tq, q), (tk, k), (tv, v) = (_split(g, c, image_len) for g, c in zip(got, cur, strict=True))
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        jq, jk, jv = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
        out = dispatch_attention_fn(
            jq,
            jk,
            jv,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(jq.dtype)
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())


def _split(got: torch.Tensor, cur: torch.Tensor, image_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text, image)`` of a joint tensor the store handed back. Replaced features recorded under
    a prompt of another length (latent API, prompts encoded apart: the pipeline pads to the
    longest prompt of a batch) are fitted to this call's text: the recorded tokens position by
    position, cut at this call's length, or completed with this call's own."""
    text_len = cur.shape[1] - image_len
    text, image = got[:, : got.shape[1] - image_len], got[:, got.shape[1] - image_len :]
    if text.shape[1] > text_len:
        text = text[:, :text_len]
    elif text.shape[1] < text_len:
        text = torch.cat([text, cur[:, text.shape[1] : text_len]], 1)
    return text, image


def qwenimage_layers(transformer: torch.nn.Module) -> dict[str, BlockId]:
    """Attention module path -> ``("joint", i)`` for every block of a ``QwenImageTransformer2DModel``."""
    out: dict[str, BlockId] = {}
    for name in attention_modules(transformer):
        parts = name.split(".")
        if parts[0] != "transformer_blocks" or parts[2:] != ["attn"]:
            raise ValueError(f"not a Qwen-Image transformer: unexpected attention layer {name!r}")
        out[name] = ("joint", int(parts[1]))
    return out
