"""FLUX.1's released transformer (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

import torch

from fireflow.models._released import Released, text
from fireflow.models.flux.tiny import TINY_TRANSFORMER


def embeds(config: dict, batch: int, text_len: int, g: torch.Generator, device, dtype) -> dict[str, torch.Tensor]:
    """T5-XXL's hidden states padded to 512, and CLIP's pooled embedding (guidance is embedded)."""
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g, device=device).to(dtype)
    return {
        "prompt_embeds": text(config, "joint_attention_dim", batch, text_len, g, device, dtype),
        "pooled_prompt_embeds": pooled,
    }


RELEASED = {
    "flux.1-dev": Released(
        repo="black-forest-labs/FLUX.1-dev",
        transformer="FluxTransformer2DModel",
        config=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        tiny=TINY_TRANSFORMER,
        embeds=embeds,
        text_len=512,
    ),
}
