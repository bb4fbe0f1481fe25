"""FLUX.2's released transformers (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

import torch

from fireflow.models._released import Released, text, with_negative
from fireflow.models.flux2.tiny import TINY_TRANSFORMER


def embeds(config: dict, batch: int, text_len: int, g: torch.Generator, device, dtype) -> dict[str, torch.Tensor]:
    """Three stacked hidden states of the text encoder, padded to 512 tokens. [dev] embeds its
    guidance; [klein] from a bare transformer gets the base checkpoints' CFG, so the empty prompt's too."""
    x = {"prompt_embeds": text(config, "joint_attention_dim", batch, text_len, g, device, dtype)}
    return x if config.get("guidance_embeds", True) else with_negative(x)


_COMMON = dict(patch_size=1, in_channels=128, out_channels=None, attention_head_dim=128, timestep_guidance_channels=256)
_COMMON |= dict(mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6)
_KLEIN = "timed as [klein] base (CFG, its two branches batched); the distilled checkpoint runs without CFG: batch 1"

RELEASED = {
    "flux2-klein-4b": Released(
        repo="black-forest-labs/FLUX.2-klein-4B",
        transformer="Flux2Transformer2DModel",
        # Qwen3-4B: 3 x 2560 stacked hidden states.
        config=dict(
            _COMMON,
            num_layers=5,
            num_single_layers=20,
            num_attention_heads=24,
            joint_attention_dim=7680,
            guidance_embeds=False,
        ),
        tiny=dict(TINY_TRANSFORMER, guidance_embeds=False),
        embeds=embeds,
        text_len=512,
        note=_KLEIN,
    ),
    "flux2-klein-9b": Released(
        repo="black-forest-labs/FLUX.2-klein-9B",
        transformer="Flux2Transformer2DModel",
        # Qwen3-8B: 3 x 4096.
        config=dict(
            _COMMON,
            num_layers=8,
            num_single_layers=24,
            num_attention_heads=32,
            joint_attention_dim=12288,
            guidance_embeds=False,
        ),
        tiny=dict(TINY_TRANSFORMER, guidance_embeds=False),
        embeds=embeds,
        text_len=512,
        note=_KLEIN,
    ),
    "flux2-dev": Released(
        repo="black-forest-labs/FLUX.2-dev",
        transformer="Flux2Transformer2DModel",
        # Mistral Small (24B): 3 x 5120; guidance-distilled, so one call per velocity.
        config=dict(
            _COMMON,
            num_layers=8,
            num_single_layers=48,
            num_attention_heads=48,
            joint_attention_dim=15360,
            guidance_embeds=True,
        ),
        tiny=dict(TINY_TRANSFORMER, guidance_embeds=True),
        embeds=embeds,
        text_len=512,
    ),
}
