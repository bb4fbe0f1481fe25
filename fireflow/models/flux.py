"""FLUX.1 through diffusers: VAE with the posterior mean, 2x2 packing, CLIP pooled + T5 text."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image

from fireflow.models.base import ModelAdapter

DEFAULT_FLUX = "black-forest-labs/FLUX.1-dev"


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local folder nor in the Hugging Face cache (and may not be fetched)."""


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local pipeline folder for ``model``: the folder itself, or a snapshot in the HF cache.

    Only when ``HF_HUB_OFFLINE`` is unset and the cache misses is the Hub asked, so an offline
    machine fails at once with a message naming where it looked instead of hanging.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
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


class FluxAdapter(ModelAdapter):
    """FLUX.1-dev (or any diffusers ``FluxPipeline`` folder) as the editor's model."""

    name = "flux"

    def __init__(self, pipe, shift: bool = True):
        super().__init__(pipe.transformer)
        self.pipe = pipe
        self.shift = shift
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_FLUX,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        offload: str | None = None,
        shift: bool | None = None,
    ) -> FluxAdapter:
        """Load a FLUX pipeline from a local folder or the HF cache.

        ``offload``: None (all on ``device``), ``"model"`` (diffusers' model CPU offload: one
        component on the GPU at a time), ``"group"`` (diffusers' group offloading: each component
        streamed block by block, prefetched on a side CUDA stream; a 1024² edit fits in a few GiB)
        or ``"sequential"`` (leaf by leaf: least memory, slowest).
        ``shift`` defaults to on, except for FLUX.1-schnell whose grid is unshifted.
        """
        from diffusers import FluxPipeline

        path = resolve_model_path(model)
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype; older ones know only it
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        if shift is None:
            shift = "schnell" not in str(model).lower()
        return cls(pipe, shift=shift)

    @property
    def execution_device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the 2x2 packing."""
        return self.vae_scale_factor * 2

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16 as the reference code does."""
        if resize is not None:
            image = image.resize(resize, Image.Resampling.LANCZOS)
        w, h = image.size
        m = self.multiple
        if w < m or h < m:
            raise ValueError(f"image {w}x{h} is smaller than the model's minimum {m}x{m}")
        return image.crop((0, 0, w - w % m, h - h % m))

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, prompt_2=None, device=self.execution_device, max_sequence_length=512
        )
        return prompt_embeds, pooled

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = pixels.to(self.execution_device, vae.dtype)
        latents = vae.encode(x).latent_dist.mean  # the posterior mean: deterministic
        latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
        return pack(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipe.vae
        f = self.vae_scale_factor
        z = unpack(latents, height // f, width // f)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z.to(vae.dtype)).sample.float()

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        return grid_ids(height // self.multiple, width // self.multiple)


def pack(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]`` tokens, row-major, channels then patch offsets."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``height`` x ``width`` latent (or pixel) grid."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def grid_ids(rows: int, cols: int) -> torch.Tensor:
    """FLUX image position ids ``[rows * cols, 3]``: (0, row, col) per token."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)
