"""An end-to-end FLUX pipeline with random weights: image in, edited image out, as a user runs it.

The latent-level benchmark times the parts; this one times what ``FireFlowEditor.edit`` does with
a whole ``FluxPipeline`` (text encoders, VAE, transformer) and so is the only place where diffusers'
model CPU offload means anything: it moves whole components, and the edit's peak is then the largest
component rather than their sum. Tokenizers are character-level stand-ins (no vocabulary download);
T5 still sees its full 512 padded tokens, so the encoders' cost is FLUX.1-dev's.
"""

from __future__ import annotations

import torch
from PIL import Image

from fireflow.bench._speed_models import ModelSpec, build_text_encoders, build_transformer, build_vae


def build_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """A ``FluxPipeline`` of FLUX.1-dev's shapes (or ``--tiny``'s), random weights, on ``device``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fireflow.models._tiny import char_tokenizer as _char_tokenizer

    clip, t5 = build_text_encoders(spec, device, dtype)
    clip_tok, _ = _char_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>", 77)
    t5_tok, _ = _char_tokenizer(None, "</s>", "<pad>", "<unk>", spec.text_len)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=build_vae(spec, device, dtype),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=build_transformer(spec, device, dtype),
    )


def offload_pipeline(pipe, offload: str, device: torch.device) -> None:
    """``"model"``: diffusers' model CPU offload, one whole component on the GPU at a time.
    ``"group"`` / ``"group-leaf"``: diffusers' group offloading of every component, block by block
    (or leaf by leaf), prefetched on a side CUDA stream."""
    if offload == "none":
        return
    if device.type != "cuda":
        # The offload hooks need an accelerator to move weights to; on a CPU the dry run checks
        # the option and runs the pipeline as it is.
        return
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        return
    pipe.to("cpu")
    level = "block_level" if offload == "group" else "leaf_level"
    kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
    pipe.enable_group_offload(onload_device=device, offload_type=level, use_stream=True, **kwargs)


def edit_inputs(size: int, seed: int = 0) -> tuple[Image.Image, str, str]:
    """A random ``size`` x ``size`` photo and a source and target prompt."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy()), "a photo of a cat on a sofa", "a photo of a dog on a sofa"
