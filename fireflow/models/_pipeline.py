"""What every diffusers-pipeline family shares: finding the folder, loading it with one-line
errors, offloading, and the time grid read from the pipeline's own scheduler config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from fireflow.features import BlockId, in_call, quiet_in_calls
from fireflow.models.base import ModelAdapter


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local folder nor in the Hugging Face cache (and may not be fetched)."""


class ModelLoadError(ValueError):
    """A model folder that exists but cannot be loaded (corrupt config, missing weights, ...)."""


class PipelineAdapter(ModelAdapter):
    """A family served by a diffusers pipeline: the pipeline, its scheduler config, its VAE's
    downsampling (the pipeline's own ``vae_scale_factor``), loading and the execution device."""

    #: The scheduler config a bare transformer (no pipeline) is given.
    reference_scheduler: ClassVar[dict[str, Any]] = {}

    def __init__(self, transformer, layers: dict[str, BlockId], pipe=None, scheduler=None):
        super().__init__(transformer, layers)
        self.pipe = pipe
        own = scheduler_config(pipe) if pipe is not None else self.reference_scheduler
        self.scheduler_config = dict(scheduler or own)
        #: Pixels per VAE latent cell, as the pipeline computes it (8 without a pipeline).
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", None) or 8)
        if pipe is not None:
            quiet_in_calls(type(pipe).__module__, "truncation", _is_truncation_notice)
            quiet_tokenizers()

    @classmethod
    def variant(cls, transformer: torch.nn.Module, pipe=None) -> type[PipelineAdapter]:
        """The adapter class for this model: a family with variants picks one from the configs."""
        return cls

    @classmethod
    def from_pipe(cls, pipe) -> PipelineAdapter:
        return cls.variant(pipe.transformer, pipe)(pipe.transformer, pipe)

    @classmethod
    def from_transformer(cls, transformer: torch.nn.Module) -> PipelineAdapter:
        """The latent-level API over a bare transformer, with the family's reference scheduler."""
        return cls.variant(transformer)(transformer)

    def need_pipe(self, what: str, component: str | None = None):
        """The pipeline, or a one-line error naming what this editor lacks (a bare transformer)."""
        if self.pipe is None or (component is not None and getattr(self.pipe, component, None) is None):
            raise ValueError(f"this editor has no {what}: use the *_latents methods with embeddings")
        return self.pipe

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, device: torch.device, torch_dtype: torch.dtype, offload: str | None = None
    ) -> PipelineAdapter:
        """Load one of :attr:`pipelines` (or a bare one of :attr:`transformers`) from a local folder
        (see ``fireflow.models.load_adapter``)."""
        import diffusers

        kind, config = read_config(Path(folder))
        name = config["_class_name"]
        if name not in cls.pipelines + cls.transformers:
            raise ModelLoadError(f"{folder}: {name} is not served by {cls.name} ({', '.join(cls.pipelines)})")
        if getattr(diffusers, name, None) is None:  # e.g. Flux2KleinPipeline before diffusers 0.37
            raise ModelLoadError(f"{folder}: {name} needs a newer diffusers than the installed {diffusers.__version__}")
        if kind == "transformer":
            model = load_pipeline(getattr(diffusers, name), Path(folder), torch_dtype)
            model = model.to(device).eval().requires_grad_(False)
            return cls.from_transformer(model)
        pipe = load_pipeline(getattr(diffusers, name), Path(folder), torch_dtype)
        place(pipe, device, offload)
        return cls.from_pipe(pipe)

    @property
    def execution_device(self) -> torch.device:
        return self.pipe._execution_device if self.pipe is not None else super().execution_device


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local model folder for ``model``: the folder itself, or a snapshot in the HF cache.

    Only when ``HF_HUB_OFFLINE`` is unset and the cache misses is the Hub asked, so an offline
    machine fails at once with a message naming where it looked instead of hanging.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but not a diffusers model (no model_index.json or config.json)"
            )
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise ModelNotFoundError(f"model {str(model)!r} not found: no such folder, and not a Hub repo id")
    looked = f"not a local folder, not in the Hugging Face cache at {constants.HF_HUB_CACHE}"
    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (OSError, HFValidationError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"model {str(model)!r} not found: {looked}, and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network, auth (gated repo) or missing repo: one clear line
        raise ModelNotFoundError(f"model {str(model)!r} not found: {looked}; download failed: {e}") from None


def read_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """``("pipeline" | "transformer", config)`` of a model folder, with one-line errors."""
    for kind, name in (("pipeline", "model_index.json"), ("transformer", "config.json")):
        file = folder / name
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{file} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
            if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
                raise ModelLoadError(f"{file} has no '_class_name': not a diffusers {kind} config")
            return kind, config
    raise ModelNotFoundError(f"{folder} has no model_index.json or config.json")


def load_pipeline(pipeline_cls: type, folder: Path, torch_dtype: torch.dtype):
    """``pipeline_cls.from_pretrained(folder)`` (a pipeline or a model) from local files only,
    errors in one line."""
    if (folder / "model_index.json").is_file():
        _check_components(folder)
    # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns): pass the name it takes.
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (0, 36) else "torch_dtype"
    try:
        return pipeline_cls.from_pretrained(folder, **{dtype_kw: torch_dtype}, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the model in {folder}: {first}") from None


def _check_components(folder: Path) -> None:
    """Each component folder named in model_index.json exists and holds weights or a config."""
    index = json.loads((folder / "model_index.json").read_text())
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise ModelLoadError(f"{folder} lacks its {name!r} folder, which model_index.json lists")
        if name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            weights = list(sub.glob("*.safetensors")) + list(sub.glob("*.bin")) + list(sub.glob("*.gguf"))
            if not weights:
                raise ModelLoadError(f"{sub} has no weights (*.safetensors or *.bin)")


def place(pipe, device: torch.device, offload: str | None) -> None:
    """Put a pipeline on ``device``, or offload it.

    ``offload``: None (all on ``device``), ``"model"`` (one component on the GPU at a time),
    ``"group"`` (each component streamed block by block, prefetched on a side CUDA stream) or
    ``"sequential"`` (leaf by leaf: least memory, slowest).
    """
    if offload is None:
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        kwargs = {"num_blocks_per_group": 1, "use_stream": device.type == "cuda"}
        pipe.enable_group_offload(onload_device=device, offload_type="block_level", **kwargs)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown offload {offload!r}; accepted: model, group, sequential")


def scheduler_sigmas(config: dict[str, Any], **set_timesteps_kwargs) -> torch.Tensor:
    """The sigmas (1 -> 0, terminal 0 included) a flow-matching scheduler with ``config`` makes
    for ``set_timesteps(**set_timesteps_kwargs)``: exactly the pipeline's grid, as float64."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    # from_config warns about keys of other scheduler classes (a UniPC config's, say): expected here.
    quiet_in_calls("diffusers.configuration_utils", "config-keys", lambda r: "are not expected" in r.getMessage())
    with in_call():
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    scheduler.set_timesteps(**set_timesteps_kwargs)
    return scheduler.sigmas.to(torch.float64)


def shift_mu(image_seq_len: int, config: dict[str, Any]) -> float:
    """diffusers' ``calculate_shift``: the dynamic-shift ``mu``, linear in the image-token count
    (extrapolated), with the constants of the pipeline's scheduler config."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


def scheduler_config(pipe) -> dict[str, Any]:
    """The pipeline's scheduler config as a plain dict (a FireFlowScheduler's, too)."""
    return dict(pipe.scheduler.config)


def _is_truncation_notice(record: logging.LogRecord) -> bool:
    """A pipeline's "part of your input was truncated" warning: a long prompt is truncated as
    documented, and one warning line per 77-token chunk helps nobody."""
    return "truncated" in record.getMessage()


def quiet_tokenizers() -> None:
    """The tokenizers' "sequence length is longer than the specified maximum" notice, which the
    pipelines trigger on purpose (they tokenize once untruncated to report the truncation)."""
    for name in ("transformers.tokenization_utils_base", "transformers.tokenization_python"):
        quiet_in_calls(name, "token-length", lambda r: "sequence length is longer" in r.getMessage())
