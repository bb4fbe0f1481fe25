"""Tiny random SD3 and SD3.5 pipelines, built locally with no network, for tests and smoke runs.

Full ``StableDiffusion3Pipeline`` folders (transformer, 16-channel-style VAE, CLIP-L, CLIP-G and
T5 encoders with character tokenizers, SD3's scheduler config with shift 3) that load through the
same loader as the real weights. "sd3.5" adds SD3.5-medium's ``attn2`` in block 0 and RMS Q/K norms.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer, tiny_vae

TINY_SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    caption_projection_dim=16,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=32,
)
TINY_SD35 = dict(TINY_SD3, dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_sd3_transformer(seed: int = 0, sd35: bool = False, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**(TINY_SD35 if sd35 else TINY_SD3), **overrides}).eval()


def _clip(seed: int, hidden: int, projection: int, vocab: dict):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,  # SD3 reads the penultimate hidden state
        vocab_size=len(vocab),
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<pad>"],
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_pipeline(seed: int = 0, sd35: bool = False):
    """Every component of an SD3 (or SD3.5) pipeline at toy size, random weights, fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    transformer = tiny_sd3_transformer(seed, sd35)
    torch.manual_seed(seed + 1)
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5305)
    clip_tok, clip_vocab = char_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>", 77)
    clip_tok_2, _ = char_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>", 77)
    t5_tok, t5_vocab = char_tokenizer(None, "</s>", "<pad>", "<unk>", 256)
    # CLIP-L and CLIP-G hidden states (8 + 8) are padded to T5's width (24); pooled 10 + 10 = 20.
    clip_l, clip_g = _clip(seed + 2, 8, 10, clip_vocab), _clip(seed + 3, 8, 10, clip_vocab)
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=24, d_kv=8, d_ff=37, num_layers=2, num_heads=3))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5.eval(),
        tokenizer_3=t5_tok,
    )


def save_tiny(path: str | os.PathLike, variant: str = "sd3", seed: int = 0) -> Path:
    path = Path(path)
    tiny_sd3_pipeline(seed, sd35=variant == "sd3.5").save_pretrained(path)
    return path


VARIANTS = {"sd3": save_tiny, "sd3.5": save_tiny}
