"""Chroma's released transformer (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

import torch

from fireflow.models._released import Released, text, with_negative
from fireflow.models.chroma.tiny import TINY_TRANSFORMER


def embeds(config: dict, batch: int, text_len: int, g: torch.Generator, device, dtype) -> dict[str, torch.Tensor]:
    """T5-XXL's hidden states padded to 512 with the text mask Chroma needs, and the negative's."""
    mask = torch.ones(batch, text_len, device=device, dtype=dtype)
    x = text(config, "joint_attention_dim", batch, text_len, g, device, dtype)
    return with_negative({"prompt_embeds": x, "prompt_attention_mask": mask})


RELEASED = {
    "chroma1-hd": Released(
        repo="lodestones/Chroma1-HD",
        transformer="ChromaTransformer2DModel",
        config=dict(
            patch_size=1,
            in_channels=64,
            out_channels=None,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            axes_dims_rope=(16, 56, 56),
            approximator_num_channels=64,
            approximator_hidden_dim=5120,
            approximator_layers=5,
        ),
        tiny=TINY_TRANSFORMER,
        embeds=embeds,
        text_len=512,
    ),
}
