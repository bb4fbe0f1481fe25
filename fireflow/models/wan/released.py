"""Wan 2.1's released transformers (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

from fireflow.models._released import Released, prompt_and_negative
from fireflow.models.wan.tiny import TINY_TRANSFORMER

#: UMT5-XXL's hidden states zero-padded to 512 tokens, and the negative prompt's.
embeds = prompt_and_negative("text_dim")


_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096)
_COMMON |= dict(freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
#: The pipelines' default video: 480 x 832, 81 frames (21 latent frames, 32,760 tokens).
_VIDEO = dict(height=480, width=832, num_frames=81)

RELEASED = {
    "wan2.1-1.3b": Released(
        repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        transformer="WanTransformer3DModel",
        config=dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        tiny=TINY_TRANSFORMER,
        embeds=embeds,
        text_len=512,
        **_VIDEO,
    ),
    "wan2.1-14b": Released(
        repo="Wan-AI/Wan2.1-T2V-14B-Diffusers",
        transformer="WanTransformer3DModel",
        config=dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        tiny=TINY_TRANSFORMER,
        embeds=embeds,
        text_len=512,
        # Wan 2.2 A14B is two experts of this shape, one per step: the same time, twice the weights.
        note="Wan 2.2 A14B: two experts of this shape, one running per call (same time, twice the weights)",
        **_VIDEO,
    ),
}
