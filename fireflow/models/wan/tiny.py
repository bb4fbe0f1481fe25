"""Tiny random Wan pipelines, built locally with no network, for tests and smoke runs.

Full ``WanPipeline`` folders (transformer(s), ``AutoencoderKLWan``, a UMT5 encoder with a
character tokenizer, the Wan folders' UniPC flow-sigma scheduler config) that load through the
same loader as the real weights:

* "wan2.1": one transformer, the 16-channel 8x VAE;
* "wan2.2": two experts (``transformer``, ``transformer_2``) with ``boundary_ratio`` 0.875;
* "wan-ti2v": Wan 2.2 TI2V-5B's layout: 48 channels, 16x spatial VAE, ``expand_timesteps``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
#: A boundary every tiny grid of a few steps crosses (Wan 2.2 A14B's T2V value).
BOUNDARY_RATIO = 0.875


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


def tiny_wan_vae(ti2v: bool = False, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    common = dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if ti2v:
        return AutoencoderKLWan(
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            **common,
        ).eval()
    g = torch.Generator().manual_seed(seed)
    mean = (torch.randn(16, generator=g) * 0.3).tolist()
    std = (torch.rand(16, generator=g) * 1.5 + 0.5).tolist()
    return AutoencoderKLWan(z_dim=16, latents_mean=mean, latents_std=std, **common).eval()


def tiny_umt5(seed: int = 0):
    """A tiny UMT5 encoder (d_model 32 = the transformer's text_dim) and its tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    tok, vocab = char_tokenizer(None, "</s>", "<pad>", "<unk>", 512)
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return UMT5EncoderModel(config).eval(), tok


def tiny_wan_pipeline(seed: int = 0, variant: str = "wan2.1", scheduler=None):
    """Every component of a Wan pipeline at toy size, random weights, fp32. ``scheduler``: a
    scheduler object instead of the Wan folders' UniPC."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from fireflow.models.wan import WAN_SCHEDULER

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny Wan variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    ti2v = variant == "wan-ti2v"
    channels = dict(in_channels=48, out_channels=48) if ti2v else {}
    transformer = tiny_transformer(seed, **channels)
    transformer_2 = tiny_transformer(seed + 10, **channels) if variant == "wan2.2" else None
    vae = tiny_wan_vae(ti2v, seed + 1)
    text_encoder, tokenizer = tiny_umt5(seed + 2)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler if scheduler is not None else UniPCMultistepScheduler(**WAN_SCHEDULER),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=BOUNDARY_RATIO if transformer_2 is not None else None,
        expand_timesteps=ti2v,
    )


def save_tiny(path: str | os.PathLike, variant: str = "wan2.1", seed: int = 0) -> Path:
    path = Path(path)
    tiny_wan_pipeline(seed, variant).save_pretrained(path)
    return path


VARIANTS = {"wan2.1": save_tiny, "wan2.2": save_tiny, "wan-ti2v": save_tiny}
