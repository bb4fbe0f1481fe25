"""Z-Image's single-stream attention with a hook on Q, K and V, for feature reuse (the "context" route).

``ZImageTransformer2DModel`` never hands attention kwargs to its processors (its
``joint_attention_kwargs`` only scale LoRA layers), so the edit's store cannot arrive as a kwarg:
the processor reads it from :func:`fireflow.features.current`, which the adapter binds around
each transformer call. The model has no ``set_attn_processor``: processors are set per module.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from fireflow.features import BlockId, current
from fireflow.models.base import attention_modules


def _rope(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """diffusers' Z-Image complex rotary embedding, as ``ZSingleStreamAttnProcessor`` applies it."""
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
        return x_out.type_as(x_in)


class ZImageFeatureProcessor:
    """diffusers' ``ZSingleStreamAttnProcessor``, computed the same way (separate Q/K/V
    projections, per-head RMS norms, complex RoPE on Q and K, the pad-length mask), handing Q, K, V
    (``[B, S, heads, head_dim]``, Q and K after the norms and RoPE: what attention uses) to the
    store bound for this call. In the joint ``layers.*`` S is ``[image, caption]``, each padded to
    a multiple of 32 with the model's pad token; in ``noise_refiner.*`` the image tokens only.
    Without a store it is the stock processor, bit for bit.

    ``Attention.forward`` passes only the kwargs this signature names: those of the stock processor.
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
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query = _rope(query, freqs_cis)
            key = _rope(key, freqs_cis)
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)

        store = current()
        if store is not None:
            query, key, value = store(self.block, query, key, value)

        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


class JointFit:
    """The edit's store as the joint blocks need it: ``[image, caption]`` features recorded under
    a caption of another padded length (source and target prompts differ in length; Z-Image does
    not pad captions to a fixed length) are fitted to this call's, position by position. The image
    part (``image_tokens``, the same in every call of an edit) is taken as recorded; the caption
    part is cut at this call's length, or completed with this call's own tokens (as Qwen-Image's)."""

    def __init__(self, store, image_tokens: int):
        self.store, self.image_tokens = store, image_tokens

    def __call__(self, block: BlockId, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cur = (q, k, v)
        try:
            got = self.store(block, q, k, v)
        except RuntimeError as e:  # adding features recorded under a caption of another length
            raise ValueError(
                f"{block}: the recorded features do not fit this call's {q.shape[1] - self.image_tokens} caption "
                f"tokens ({e}); use replace_* strategies, or captions of the same padded length"
            ) from None
        return tuple(_fit_caption(g, c, self.image_tokens) for g, c in zip(got, cur, strict=True))


def _fit_caption(got: torch.Tensor, cur: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """``got`` with the sequence length of ``cur``: the image part as it is, the caption part cut,
    or completed with ``cur``'s own tokens."""
    n = cur.shape[1]
    if got.shape[1] == n:
        return got
    if got.shape[1] > n:
        return got[:, :n]
    return torch.cat([got, cur[:, got.shape[1] :]], 1)


def zimage_layers(transformer: torch.nn.Module) -> dict[str, BlockId]:
    """Attention module path -> block id: ``("joint", i)`` for ``layers.i`` (the joint [image,
    caption] blocks), then ``("refiner", i)`` for ``noise_refiner.i`` (image tokens only). The
    ``context_refiner`` (caption only, time-independent: the same V at every step) and an Omni
    model's ``siglip_refiner`` offer nothing to reuse and are left out."""
    joint: dict[str, BlockId] = {}
    refiner: dict[str, BlockId] = {}
    for name in attention_modules(transformer):
        parts = name.split(".")
        if len(parts) != 3 or parts[2] != "attention":
            raise ValueError(f"not a Z-Image transformer: unexpected attention layer {name!r}")
        if parts[0] == "layers":
            joint[name] = ("joint", int(parts[1]))
        elif parts[0] == "noise_refiner":
            refiner[name] = ("refiner", int(parts[1]))
        elif parts[0] not in ("context_refiner", "siglip_refiner"):
            raise ValueError(f"not a Z-Image transformer: unexpected attention layer {name!r}")
    return {**joint, **refiner}
