"""SD3.5's released transformers (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

import torch

from fireflow.models._released import Released, text, with_negative
from fireflow.models.sd3.tiny import TINY_SD35


def embeds(config: dict, batch: int, text_len: int, g: torch.Generator, device, dtype) -> dict[str, torch.Tensor]:
    """CLIP-L/G (77 tokens, padded to T5's width) then T5 (256), and the pooled CLIP pair; with the
    empty prompt's as the negatives (true CFG)."""
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g, device=device).to(dtype)
    return with_negative(
        {
            "prompt_embeds": text(config, "joint_attention_dim", batch, text_len, g, device, dtype),
            "pooled_prompt_embeds": pooled,
        }
    )


_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64)
_COMMON |= dict(joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")

RELEASED = {
    "sd3.5-medium": Released(
        repo="stabilityai/stable-diffusion-3.5-medium",
        transformer="SD3Transformer2DModel",
        # MMDiT-X: a second attention (attn2) in blocks 0-12.
        config=dict(
            _COMMON,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
        ),
        tiny=TINY_SD35,
        embeds=embeds,
        text_len=77 + 256,
    ),
    "sd3.5-large": Released(
        repo="stabilityai/stable-diffusion-3.5-large",
        transformer="SD3Transformer2DModel",
        config=dict(
            _COMMON,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            dual_attention_layers=(),
        ),
        tiny=TINY_SD35,
        embeds=embeds,
        text_len=77 + 256,
    ),
}
