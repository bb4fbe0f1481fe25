"""Memory options for the speed benchmark: offloading, fp8 weight storage, torchao quantization.

Each option is one diffusers or torchao call on an already-built transformer, exactly what a user
would add to a loaded FLUX pipeline; ``docs/speed.md`` gives the recipes for 24 GB and 16 GB cards.
"""

from __future__ import annotations

import torch

OFFLOADS = ("none", "group", "group-leaf", "model")  # model: whole components (end-to-end runs only)
WEIGHTS = ("native", "fp8")  # native: stored in the compute dtype
#: torchao-fp8dq: float8 weights and float8 activations quantized per row on the fly, so the linear
#: layers' matmuls run in fp8 (Hopper and newer); the others store weights only and compute in bf16.
QUANTIZE = ("none", "torchao-int8wo", "torchao-fp8wo", "torchao-fp8dq", "bnb-nf4")


class Unavailable(RuntimeError):
    """An option whose package is not installed, or that this device cannot run."""


def apply_weights(transformer: torch.nn.Module, weights: str, compute_dtype: torch.dtype) -> None:
    """``"fp8"``: store weights as float8 e4m3 and upcast each layer for its forward (diffusers'
    layerwise casting). Halves the transformer's 22.2 GiB; needs no extra package."""
    if weights == "native":
        return
    if weights != "fp8":
        raise ValueError(f"unknown weights {weights!r}; accepted: {', '.join(WEIGHTS)}")
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def apply_quantization(transformer: torch.nn.Module, method: str) -> None:
    """Quantize the transformer's linear layers in place (weights only, or fp8 weights)."""
    if method == "none":
        return
    if method.startswith("torchao-"):
        try:
            import torchao.quantization as q
        except ImportError as e:
            raise Unavailable(f"{method}: torchao is not installed ({e})") from None
        if method == "torchao-int8wo":
            config = q.Int8WeightOnlyConfig() if hasattr(q, "Int8WeightOnlyConfig") else q.int8_weight_only()
        elif method == "torchao-fp8wo":
            config = q.Float8WeightOnlyConfig() if hasattr(q, "Float8WeightOnlyConfig") else q.float8_weight_only()
        elif method == "torchao-fp8dq":
            # Per-row scales: the granularity torchao recommends for fp8 matmuls on Hopper.
            config = q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())
        else:
            raise ValueError(f"unknown quantization {method!r}; accepted: {', '.join(QUANTIZE)}")
        q.quantize_(transformer, config)
        return
    if method == "bnb-nf4":
        # bitsandbytes quantizes while loading (``from_pretrained(quantization_config=...)``); the
        # benchmark's weights are built in memory, so this path cannot be timed here.
        raise Unavailable("bnb-nf4: bitsandbytes quantizes at load time only; not measurable with random weights")
    raise ValueError(f"unknown quantization {method!r}; accepted: {', '.join(QUANTIZE)}")


def apply_offload(transformer: torch.nn.Module, offload: str, device: torch.device) -> None:
    """Keep the transformer's weights in CPU memory and bring them to ``device`` as they are used.

    ``"group"``: diffusers' group offloading, one block at a time, prefetched on a side CUDA stream
    so that the copy of block i + 1 overlaps the compute of block i. ``"group-leaf"``: the same per
    leaf module (finer, less memory). The weights are pinned for fast asynchronous copies.
    """
    if offload == "none":
        return
    if offload == "model":
        raise ValueError("offload 'model' moves whole pipeline components: use it with --parts e2e")
    if offload not in OFFLOADS:
        raise ValueError(f"unknown offload {offload!r}; accepted: {', '.join(OFFLOADS)}")
    cuda = device.type == "cuda"
    transformer.to("cpu")
    kwargs = dict(onload_device=device, offload_device=torch.device("cpu"), use_stream=cuda)
    if offload == "group":
        transformer.enable_group_offload(offload_type="block_level", num_blocks_per_group=1, **kwargs)
    else:
        transformer.enable_group_offload(offload_type="leaf_level", **kwargs)


def limit_memory(device: torch.device, gib: float | None) -> float | None:
    """Emulate a smaller card: cap this process's CUDA allocations at ``gib`` GiB.

    Returns the fraction of the card set, or None where there is nothing to cap (no limit, or a
    CPU); ``gib=None`` on a GPU lifts a cap set before.
    """
    if device.type != "cuda":
        return None
    if gib is None:  # lift a cap set before
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
