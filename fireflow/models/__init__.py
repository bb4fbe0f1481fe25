"""Model families, one folder each, chosen through one registry.

A new family is a new folder under ``fireflow/models/`` with a :class:`ModelAdapter` subclass
that has ``from_pipe`` and ``from_pretrained``, plus one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from fireflow.models._pipeline import ModelLoadError, ModelNotFoundError, read_config, resolve_model_path
from fireflow.models.base import Conditioning, Embeds, ModelAdapter

__all__ = [
    "Conditioning",
    "Embeds",
    "ModelAdapter",
    "ModelLoadError",
    "ModelNotFoundError",
    "adapter_from_pipe",
    "adapter_from_transformer",
    "load_adapter",
    "parse_device",
    "parse_dtype",
]

#: diffusers ``_class_name`` (of a pipeline, or of a bare transformer folder) -> "module:Adapter".
FAMILIES: dict[str, str] = {
    "FluxPipeline": "fireflow.models.flux:FluxAdapter",
    "FluxTransformer2DModel": "fireflow.models.demo:DemoAdapter",  # a folder of demo-model weights
    "Flux2Pipeline": "fireflow.models.flux2:Flux2Adapter",
    "Flux2KleinPipeline": "fireflow.models.flux2:Flux2Adapter",
    "StableDiffusion3Pipeline": "fireflow.models.sd3:SD3Adapter",
}

#: A bare transformer (no VAE, no text encoders) -> the family that serves its latent-level API.
TRANSFORMERS: dict[str, str] = {
    "FluxTransformer2DModel": "fireflow.models.flux:FluxAdapter",
    "Flux2Transformer2DModel": "fireflow.models.flux2:Flux2Adapter",
    "SD3Transformer2DModel": "fireflow.models.sd3:SD3Adapter",
}

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """A torch device that exists on this machine, or a one-line error saying what does."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown {what} {str(device)!r}; accepted: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {str(device)!r} asked for, but this machine has no CUDA GPU; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{what} {str(device)!r} asked for, but MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{what} {str(device)!r} is not supported; accepted: cpu, cuda, cuda:N, mps")
    return dev


def _family(class_name: str, where: str, table: dict[str, str] = FAMILIES) -> type[ModelAdapter]:
    target = table.get(class_name)
    if target is None:
        known = ", ".join(sorted(table))
        raise ModelLoadError(f"{where}: {class_name} is not a supported model; supported: {known}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def adapter_from_pipe(pipe) -> ModelAdapter:
    """The family adapter for a diffusers pipeline object (weights shared, nothing copied)."""
    return _family(type(pipe).__name__, "from_pipe").from_pipe(pipe)


def adapter_from_transformer(transformer: torch.nn.Module) -> ModelAdapter:
    """The family adapter for a bare diffusers transformer: the latent-level API only, with the
    family's reference scheduler config (FLUX.1-dev's for FLUX, SD3's for SD3)."""
    return _family(type(transformer).__name__, "transformer=", TRANSFORMERS)(transformer)


def load_adapter(
    model: str | os.PathLike = "demo",
    *,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    offload: str | None = None,
) -> ModelAdapter:
    """``"demo"`` or ``"scenes"`` for a bundled model, a local diffusers folder, or a Hub id in the HF cache.

    The family comes from the folder's ``model_index.json`` ``_class_name`` (or a transformer
    folder's ``config.json``). The dtype defaults to bf16 on an accelerator and fp32 on the CPU.
    """
    dev = parse_device(device)
    dtype = parse_dtype(torch_dtype) or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    if str(model) in ("demo", "scenes"):  # the bundled models (fireflow.models.demo.BUNDLED)
        from fireflow.models.demo import BUNDLED, DemoAdapter

        return DemoAdapter.from_pretrained(BUNDLED[str(model)], device=dev, torch_dtype=dtype)
    folder = resolve_model_path(model)
    _, config = read_config(Path(folder))
    family = _family(config["_class_name"], str(folder))
    return family.from_pretrained(folder, device=dev, torch_dtype=dtype, offload=offload)
