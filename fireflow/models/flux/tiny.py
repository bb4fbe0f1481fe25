"""A tiny random FLUX.1 pipeline, built locally with no network, for tests and smoke runs.

``save_tiny(path)`` writes a diffusers ``FluxPipeline`` folder (transformer, VAE, CLIP and T5
encoders, both tokenizers, and FLUX.1-dev's scheduler config, or FLUX.1-schnell's for the
"flux-schnell" variant) that loads through the same loader as FLUX.1-dev.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer, tiny_vae

#: The tiny transformer's shape: 1 double-stream block, 2 single-stream blocks, 2 heads of 16.
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def tiny_transformer(seed: int = 0, **overrides):
    """A random ``FluxTransformer2DModel`` with :data:`TINY_TRANSFORMER`'s shape (overridable)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


#: FLUX.1-schnell's scheduler config: no dynamic shifting, static shift 1 (an unshifted grid).
SCHNELL_SCHEDULER = {"use_dynamic_shifting": False, "shift": 1.0}


def tiny_flux_pipeline(seed: int = 0, schnell: bool = False):
    """All the components of a FLUX pipeline at toy size, random weights, in fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fireflow.models.flux import FLUX_DEV_SCHEDULER

    transformer = tiny_transformer(seed)
    torch.manual_seed(seed + 1)
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
    clip_tok, clip_vocab = char_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>", 77)
    t5_tok, t5_vocab = char_tokenizer(None, "</s>", "<pad>", "<unk>", 512)
    torch.manual_seed(seed + 2)
    clip_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(clip_vocab),
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=clip_vocab["<|startoftext|>"],
        eos_token_id=clip_vocab["<|endoftext|>"],  # the pooled output is read at the EOS token
        pad_token_id=clip_vocab["<pad>"],
    )
    clip = CLIPTextModel(clip_config).eval()
    torch.manual_seed(seed + 3)
    t5_config = T5Config(vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    t5 = T5EncoderModel(t5_config).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if schnell else FLUX_DEV_SCHEDULER)),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_tiny(path: str | os.PathLike, variant: str = "flux", seed: int = 0) -> Path:
    """Write a tiny random FLUX.1 pipeline folder to ``path`` and return it."""
    path = Path(path)
    tiny_flux_pipeline(seed, schnell=variant == "flux-schnell").save_pretrained(path)
    return path


#: What ``fireflow.testing`` offers from this family: variant -> writer.
VARIANTS = {"flux": save_tiny, "flux-schnell": save_tiny}
