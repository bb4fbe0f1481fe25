"""A tiny random Qwen-Image pipeline, built locally with no network, for tests and smoke runs.

A full ``QwenImagePipeline`` folder that loads through the same loader as the real weights: the
transformer (2 double-stream blocks, 3 heads of 16), an ``AutoencoderKLQwenImage`` with 4 latent
channels and non-trivial ``latents_mean``/``latents_std`` (downsampling by 4, not 8: the pipeline
reads its ``vae_scale_factor`` from the VAE), a ``Qwen2_5_VLForConditionalGeneration`` of width 16
(a 2-layer language model and a 1-layer vision tower it never uses for text) with a
character-level tokenizer and the chat special tokens of the pipeline's prompt template, and
Qwen-Image's scheduler config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer

TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=16,
    guidance_embeds=False,
    axes_dims_rope=(8, 4, 4),
)
TINY_VAE = dict(
    base_dim=24,
    z_dim=4,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.1, -0.2, 0.3, -0.4],
    latents_std=[1.5, 0.5, 2.0, 1.2],
)
TEXT_WIDTH = 16  # = the transformer's joint_attention_dim


def tiny_transformer(seed: int = 0, **overrides):
    """A random ``QwenImageTransformer2DModel`` of :data:`TINY_TRANSFORMER`'s shape."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**TINY_VAE).eval()


def tiny_qwen25vl(seed: int = 0):
    """A character tokenizer and a ``Qwen2_5_VLForConditionalGeneration`` at toy size."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok, _ = char_tokenizer(None, "<|endoftext|>", "<pad>", "<unk>", 2048)
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=TEXT_WIDTH,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},  # head_dim 8: 4 frequencies
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return tok, Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_pipeline(seed: int = 0):
    """Every component of a Qwen-Image pipeline at toy size, random weights, fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from fireflow.models.qwenimage import QWEN_IMAGE_SCHEDULER

    tok, encoder = tiny_qwen25vl(seed + 2)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=tiny_vae(seed + 1),
        text_encoder=encoder,
        tokenizer=tok,
        transformer=tiny_transformer(seed),
    )


def save_tiny(path: str | os.PathLike, variant: str = "qwenimage", seed: int = 0) -> Path:
    """Write the tiny random Qwen-Image pipeline to ``path`` and return it."""
    path = Path(path)
    tiny_qwenimage_pipeline(seed).save_pretrained(path)
    return path


#: What ``fireflow.testing`` offers from this family: variant -> writer.
VARIANTS = {"qwenimage": save_tiny}
