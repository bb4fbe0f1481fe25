"""Model adapters: FLUX.1 through diffusers, and the bundled demo model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fireflow.models.base import Conditioning, ModelAdapter
from fireflow.models.flux import FluxAdapter, ModelNotFoundError

__all__ = ["Conditioning", "FluxAdapter", "ModelAdapter", "ModelNotFoundError", "load_adapter"]

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


def load_adapter(
    model: str | os.PathLike = "demo",
    *,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    offload: str | None = None,
) -> ModelAdapter:
    """``"demo"`` for the bundled model (or a folder of demo-model weights, from ``fireflow.demo.train``);
    anything else is a FLUX pipeline folder or Hub id.

    The dtype defaults to bf16 on an accelerator and fp32 on the CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(torch_dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    folder = Path(model).expanduser()
    is_transformer_folder = (folder / "config.json").is_file() and not (folder / "model_index.json").exists()
    if str(model) == "demo" or is_transformer_folder:  # the bundled weights, or a demo model trained anew
        from fireflow.models.demo import DemoAdapter

        return DemoAdapter.from_pretrained(None if str(model) == "demo" else folder, device=device, torch_dtype=dtype)
    return FluxAdapter.from_pretrained(model, device=device, torch_dtype=dtype, offload=offload)
