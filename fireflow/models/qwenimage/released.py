"""Qwen-Image's released transformer (``transformer/config.json``), for the random-weight benchmark."""

from __future__ import annotations

from fireflow.models._released import Released, prompt_and_negative
from fireflow.models.qwenimage.tiny import TINY_TRANSFORMER

#: Qwen2.5-VL's last hidden states, unpadded (one prompt needs no mask), and the negative prompt's.
embeds = prompt_and_negative("joint_attention_dim")


RELEASED = {
    "qwen-image": Released(
        repo="Qwen/Qwen-Image",
        transformer="QwenImageTransformer2DModel",
        config=dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
        tiny=TINY_TRANSFORMER,
        embeds=embeds,
        # The pipeline does not pad: a prompt's tokens plus the template's 5. 128 is a long prompt's.
        text_len=128,
        note="text length 128 (the pipeline passes a prompt's own length, at most 512)",
    ),
}
