"""FLUX.1-dev-shaped models with random weights, built straight on the target device.

Speed does not depend on the weights' values, so the benchmark never downloads anything: each
model is created on the meta device (no memory, no init kernels), materialised with
``to_empty`` on the device and filled with small random values that keep every activation finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fireflow.models.flux.released import RELEASED

#: FLUX.1-dev's transformer (its released ``transformer/config.json``), 11.9 B parameters.
FLUX_DEV_TRANSFORMER = RELEASED["flux.1-dev"].config
#: FLUX.1's VAE (16 latent channels, downsampling by 8).
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)
#: T5 v1.1 XXL's encoder (FLUX's ``text_encoder_2``), 4.7 B parameters.
FLUX_DEV_T5 = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
#: CLIP ViT-L/14's text tower (FLUX's ``text_encoder``: the pooled embedding).
FLUX_DEV_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)

#: The same code path at toy size, for ``--tiny`` on a CPU (a few ms per forward at 128 px).
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)
TINY_VAE = dict(
    FLUX_DEV_VAE,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)
TINY_T5 = dict(FLUX_DEV_T5, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
TINY_CLIP = dict(
    FLUX_DEV_CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of one benchmark configuration."""

    name: str
    transformer: dict
    vae: dict
    t5: dict
    clip: dict
    text_len: int  # T5 tokens per prompt (FLUX.1-dev: 512)
    sizes: tuple[int, ...] = field(default=(512, 1024))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def tokens(self, size: int) -> int:
        """Packed image tokens of a ``size`` x ``size`` image."""
        return (size // (2 * self.vae_scale_factor)) ** 2


FLUX_DEV = ModelSpec("flux-dev", FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE, FLUX_DEV_T5, FLUX_DEV_CLIP, 512, (512, 1024))
TINY = ModelSpec("tiny", TINY_TRANSFORMER, TINY_VAE, TINY_T5, TINY_CLIP, 64, (128, 256))


@torch.no_grad()
def fill_random_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a harmless value: normal(0, std) matrices, zero biases, unit norm scales.

    Norm scales and biases are 1-D, so the rule needs no knowledge of the layer types: a 1-D
    ``weight`` is a norm scale (ones keep the normalised activations at unit size), any other
    1-D tensor a bias.
    """
    devices = {p.device for p in module.parameters()}
    gen = {d: torch.Generator(d).manual_seed(seed) for d in devices}
    for name, p in module.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, std, generator=gen[p.device])
    return module


def keep_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Put back in fp32 the modules a model asks to keep there (``_keep_in_fp32_modules``: Wan's
    norms, time embedder, modulation tables), as ``from_pretrained(torch_dtype=...)`` does: a
    parameter is kept when one of the listed names is a component of its path."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not keep or dtype not in (torch.float16, torch.bfloat16):
        return
    for name, p in model.named_parameters():
        if keep & set(name.split(".")):
            p.data = p.data.to(torch.float32)


def materialize(factory, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Build ``factory()`` on the meta device, then allocate it on ``device`` and fill it.

    Buffers (e.g. CLIP's position ids) are real values, not weights: they are built on the CPU and
    copied back after ``to_empty``, which would otherwise leave them uninitialised.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = factory()
    # Cast while still on meta: allocating fp32 first would need twice the memory at the peak.
    # ``to(dtype)`` leaves integer buffers integral.
    model.to(dtype)
    keep_fp32(model, dtype)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    return fill_random_(model, seed=seed).eval().requires_grad_(False)


def build_transformer(spec: ModelSpec, device, dtype, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    return materialize(lambda: FluxTransformer2DModel(**spec.transformer), device, dtype, seed)


def build_vae(spec: ModelSpec, device, dtype, seed: int = 1):
    from diffusers import AutoencoderKL

    return materialize(lambda: AutoencoderKL(**spec.vae), device, dtype, seed)


def build_text_encoders(spec: ModelSpec, device, dtype, seed: int = 2):
    """``(clip, t5)``: FLUX's two text encoders, random weights; tokenizers are not needed to time them."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = materialize(lambda: CLIPTextModel(CLIPTextConfig(**spec.clip)), device, dtype, seed)
    t5 = materialize(lambda: T5EncoderModel(T5Config(**spec.t5)), device, dtype, seed + 1)
    return clip, t5
