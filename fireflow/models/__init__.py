"""Model families, one folder each, chosen through one registry.

A new family is a new folder under ``fireflow/models/`` with :class:`ModelAdapter` subclasses that
declare the pipeline and transformer classes they serve, plus one line in :data:`FAMILY_MODULES`.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fireflow.models._pipeline import ModelLoadError, ModelNotFoundError, read_config, resolve_model_path
from fireflow.models.base import Conditioning, Embeds, Geometry, ModelAdapter

#: The names ``--model`` takes for the models bundled with the package (fireflow.models.demo).
BUNDLED_NAMES = ("demo", "scenes", "scenes-video")

__all__ = [
    "Conditioning",
    "Embeds",
    "Geometry",
    "ModelAdapter",
    "ModelLoadError",
    "ModelNotFoundError",
    "adapter_from_pipe",
    "adapter_from_transformer",
    "describe",
    "family",
    "family_parts",
    "registry",
    "require_pipeline",
    "load_adapter",
    "parse_device",
    "parse_dtype",
]

#: The family modules, one line each. Each holds :class:`ModelAdapter` subclasses that declare the
#: diffusers pipeline and transformer classes they serve (``pipelines``, ``transformers``); the
#: registry below is built from those declarations, so no second table can disagree with them.
FAMILY_MODULES: tuple[str, ...] = (
    "fireflow.models.flux",
    "fireflow.models.sd3",
    "fireflow.models.flux2",
    "fireflow.models.chroma",
    "fireflow.models.qwenimage",
    "fireflow.models.wan",
    "fireflow.models.zimage",
)


def family_parts(name: str) -> list:
    """Each family's ``<family>.<name>`` module, where the family has one (``tiny``: its test
    pipelines; ``released``: its checkpoints' shapes for the benchmark)."""
    out = []
    for package in FAMILY_MODULES:
        try:
            out.append(importlib.import_module(f"{package}.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
    return out


@dataclass(frozen=True)
class Registry:
    """Class name (a pipeline's, or a bare transformer's) -> the adapter class serving it, and the
    families this diffusers cannot load, with why (a family needing a newer diffusers says so)."""

    families: dict[str, type[ModelAdapter]]
    unavailable: dict[str, str]


@functools.cache
def registry() -> Registry:
    families: dict[str, type[ModelAdapter]] = {}
    unavailable: dict[str, str] = {}
    for module_name in FAMILY_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:  # e.g. a diffusers older than the family needs
            unavailable[module_name.rsplit(".", 1)[-1]] = _missing(e)
            continue
        for obj in vars(module).values():
            # A family's adapter declares what it serves in its own class body; its variants
            # (subclasses chosen by ``variant`` from the config) inherit the declaration.
            declared = isinstance(obj, type) and issubclass(obj, ModelAdapter) and "pipelines" in vars(obj)
            if declared:
                for class_name in obj.pipelines + obj.transformers:
                    if families.setdefault(class_name, obj) is not obj:
                        raise RuntimeError(f"{class_name} is served by both {families[class_name]} and {obj}")
    return Registry(families, unavailable)


def _missing(e: ImportError) -> str:
    import diffusers

    return f"needs a newer diffusers than the installed {diffusers.__version__} ({e})"


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


def family(class_name: str, where: str = "model") -> type[ModelAdapter]:
    """The adapter class that serves ``class_name``, or a one-line error naming what is supported."""
    reg = registry()
    found = reg.families.get(class_name)
    if found is not None:
        return found
    known = ", ".join(sorted(reg.families))
    extra = "".join(f"; {name} {why}" for name, why in reg.unavailable.items())
    raise ModelLoadError(f"{where}: {class_name} is not a supported model; supported: {known}{extra}")


def adapter_from_pipe(pipe) -> ModelAdapter:
    """The family adapter for a diffusers pipeline object (weights shared, nothing copied)."""
    return family(type(pipe).__name__, "from_pipe").from_pipe(pipe)


def adapter_from_transformer(transformer: torch.nn.Module) -> ModelAdapter:
    """The family adapter for a bare diffusers transformer: the latent-level API only, with the
    family's reference scheduler config (FLUX.1-dev's for FLUX, SD3's for SD3)."""
    return family(type(transformer).__name__, "transformer=").from_transformer(transformer)


def describe(model: str | os.PathLike) -> tuple[str, Path | None]:
    """What ``model`` names, without loading it: ``("bundled", None)`` for a bundled demo model
    (a name, or a folder carrying the demo marker), ``("pipeline" | "transformer", folder)``."""
    from fireflow.models.demo import is_demo_folder

    if str(model) in BUNDLED_NAMES:
        return "bundled", None
    if Path(model).expanduser().is_file():  # else "no such folder", which a file the user can see is not
        raise ModelNotFoundError(
            f"model {str(model)!r} is a file; accepted: a diffusers model folder, a Hub id in the HF cache, "
            f"or one of {'/'.join(BUNDLED_NAMES)}"
        )
    try:
        folder = resolve_model_path(model)
    except ModelNotFoundError as e:
        if str(model).lower() in BUNDLED_NAMES:  # "Scenes": the names are lower case
            raise ModelNotFoundError(f"{e}; did you mean {str(model).lower()!r}?") from None
        raise
    if is_demo_folder(folder):
        return "bundled", folder
    kind, _ = read_config(folder)
    return kind, folder


def require_pipeline(model: str | os.PathLike, what: str = "image editing") -> None:
    """Refuse, before loading, a bare transformer folder where a whole pipeline is needed."""
    kind, folder = describe(model)
    if kind == "transformer":
        _, config = read_config(folder)
        raise ModelLoadError(
            f"{folder} is a bare {config['_class_name']} folder: {what} also needs the pipeline's VAE and text "
            "encoders; give the pipeline folder (with model_index.json), or use its latent-level API "
            "(FireFlowEditor(transformer=...).sample_latents / invert_latents / edit_latents)"
        )


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
    kind, folder = describe(model)
    if kind == "bundled":  # the bundled models, by name or by their folder's marker
        from fireflow.models.demo import BUNDLED, DemoAdapter

        return DemoAdapter.from_pretrained(folder or BUNDLED[str(model)], device=dev, torch_dtype=dtype)
    _, config = read_config(folder)
    return family(config["_class_name"], str(folder)).from_pretrained(
        folder, device=dev, torch_dtype=dtype, offload=offload
    )
