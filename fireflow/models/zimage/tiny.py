"""Tiny random Z-Image pipelines, built locally with no network, for tests and smoke runs.

Full ``ZImagePipeline`` folders that load through the same loader as the real weights: a random
``ZImageTransformer2DModel`` (2 joint layers, 1 refiner of each kind, width 32), an
``AutoencoderKL`` downsampling by 8 with Z-Image's scaling and shift factors, a tiny ``Qwen3Model``
(the real folders' text encoder class; width 16 = the transformer's ``cap_feat_dim``) with a
character tokenizer and a Qwen chat template written here, and the scheduler config that tells the
variant:

* ``zimage``: Z-Image (base), ``FlowMatchEulerDiscreteScheduler(shift=6)``;
* ``zimage-turbo``: Z-Image-Turbo, ``shift=3``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer, tiny_vae

TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=16,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 4, 4],  # sum = dim / n_heads
    axes_lens=[256, 32, 32],
)
TEXT_WIDTH = 16

#: A Qwen3 chat template of the real one's shape (``ZImagePipeline`` asks for the generation
#: prompt with thinking enabled).
QWEN_TEMPLATE = (
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking -%}<think>\n\n</think>\n\n{%- endif -%}"
    "{%- endif -%}"
)


def tiny_transformer(seed: int = 0, **overrides):
    """A random ``ZImageTransformer2DModel`` of :data:`TINY_TRANSFORMER`'s shape, pad tokens random
    too (they initialise to zeros)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}).eval()
    with torch.no_grad():
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return model


def tiny_qwen3(seed: int = 0):
    """A character tokenizer and a ``Qwen3Model`` at toy size."""
    from transformers import Qwen3Config, Qwen3Model

    tok, _ = char_tokenizer(None, "<|endoftext|>", "<pad>", "<unk>", 512)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = QWEN_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )
    return tok, Qwen3Model(config).eval()


def tiny_zimage_pipeline(seed: int = 0, variant: str = "zimage", text: bool = True):
    """Every component of a ``ZImagePipeline`` at toy size, random weights, fp32 (``text=False``:
    no text encoder or tokenizer, for the latent-level API)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from fireflow.models.zimage import ZIMAGE_SCHEDULER, ZIMAGE_TURBO_SCHEDULER

    if variant not in VARIANTS:
        raise ValueError(f"unknown Z-Image tiny variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    config = ZIMAGE_TURBO_SCHEDULER if variant == "zimage-turbo" else ZIMAGE_SCHEDULER
    torch.manual_seed(seed + 1)
    vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, latent_channels=16)
    tok, encoder = tiny_qwen3(seed + 2) if text else (None, None)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tok,
        transformer=tiny_transformer(seed),
    )


def save_tiny(path: str | os.PathLike, variant: str = "zimage", seed: int = 0) -> Path:
    """Write the tiny random Z-Image pipeline ``variant`` to ``path`` and return it."""
    path = Path(path)
    tiny_zimage_pipeline(seed, variant).save_pretrained(path)
    return path


#: What ``fireflow.testing`` offers from this family: variant -> writer.
VARIANTS = {"zimage": save_tiny, "zimage-turbo": save_tiny}
