"""A tiny random Chroma pipeline, built locally with no network, for tests and smoke runs.

``save_tiny(path)`` writes a diffusers ``ChromaPipeline`` folder (transformer, VAE, T5 encoder
with a character tokenizer, and a FLUX.1-dev-style dynamic-shift scheduler config) that loads
through the same loader as the real weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models._tiny import char_tokenizer, tiny_vae

#: The tiny transformer's shape: 1 double-stream block, 1 single-stream block, 2 heads of 16.
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=[4, 4, 8],
    approximator_hidden_dim=32,
    approximator_layers=1,
    approximator_num_channels=16,
)


def tiny_chroma_transformer(seed: int = 0, **overrides):
    """A random ``ChromaTransformer2DModel`` with :data:`TINY_TRANSFORMER`'s shape (overridable)."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


def tiny_chroma_pipeline(seed: int = 0, **overrides):
    """All the components of a Chroma pipeline at toy size, random weights, in fp32."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    from fireflow.models.chroma import MAX_SEQUENCE_LENGTH
    from fireflow.models.flux import FLUX_DEV_SCHEDULER

    transformer = tiny_chroma_transformer(seed, **overrides)
    torch.manual_seed(seed + 1)
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
    t5_tok, t5_vocab = char_tokenizer(None, "</s>", "<pad>", "<unk>", MAX_SEQUENCE_LENGTH)
    torch.manual_seed(seed + 2)
    t5_config = T5Config(vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    t5 = T5EncoderModel(t5_config).eval()
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=t5,
        tokenizer=t5_tok,
        transformer=transformer,
    )


def save_tiny(path: str | os.PathLike, variant: str = "chroma", seed: int = 0) -> Path:
    """Write a tiny random Chroma pipeline folder to ``path`` and return it."""
    path = Path(path)
    tiny_chroma_pipeline(seed).save_pretrained(path)
    return path


#: What ``fireflow.testing`` offers from this family: variant -> writer.
VARIANTS = {"chroma": save_tiny}
