"""What the editor needs from a model family, and nothing about any family in particular.

A family lives in one folder, ``fireflow/models/<family>/``: its adapter (a :class:`ModelAdapter`
subclass), its attention processors and its latent layout. The adapter declares the attention
layers (processor name -> block id), the processors to put there, the default knobs, the time
grid (read from its pipeline's scheduler config), and how conditioning and guidance reach the
transformer. Latents are always in the family's own pipeline layout, in fp32.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.features import BlockId, ProcessorInstaller, quiet_unused_kwarg_warning

#: Conditioning tensors by diffusers' names (``prompt_embeds``, ``pooled_prompt_embeds``,
#: ``negative_prompt_embeds``, ...), batch first.
Embeds = dict[str, torch.Tensor]


@dataclass
class Conditioning:
    """What the transformer takes besides the latents and the time, for one pass.

    Families subclass it with their own tensors. ``forwards`` and ``rows`` say what one velocity
    evaluation costs: transformer calls, and batch rows per latent row (2 under batched CFG).
    """

    height: int
    width: int
    forwards: int = 1
    rows: int = 1


class ModelAdapter(ABC):
    """A concrete model behind the editor."""

    #: Short family name, shown by the front ends.
    name: ClassVar[str] = "model"
    #: The conditioning names this family's latent API takes, diffusers' spelling.
    embed_names: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    #: "embedded" (a guidance input), "cfg" (true classifier-free guidance) or "none".
    guidance_kind: ClassVar[str] = "none"
    #: Edit knobs that differ from the paper's FLUX.1-dev defaults (see fireflow.settings), with why.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Text-to-image guidance when none is given.
    generate_guidance: ClassVar[float] = 1.0
    #: Side of the square image ``generate`` makes when no size is given.
    default_size: ClassVar[int] = 1024
    #: Image sides must be multiples of this many pixels.
    multiple: int = 16
    #: A line front ends print about sizes (e.g. a fixed resolution), or None.
    size_note: str | None = None
    #: Set by :meth:`optimize`: feature-reuse calls then run with compilation switched off.
    compiled: bool = False
    #: The diffusers logger that warns about attention kwargs a layer's processor does not take.
    attention_logger: ClassVar[str | None] = None

    def __init__(self, transformer: torch.nn.Module, layers: Mapping[str, BlockId]):
        if self.attention_logger:
            quiet_unused_kwarg_warning(self.attention_logger)
        self.transformer = transformer
        #: Attention processor name -> block id, for every layer features can be reused in.
        self.layers = dict(layers)
        #: Installs the family's processors on the layers an edit selects (shared, no edit state).
        self.processors = ProcessorInstaller(transformer, self.layers, self.make_processor)

    # ---- attention layers ------------------------------------------------------------------
    @abstractmethod
    def make_processor(self, block: BlockId, current: object) -> object:
        """The feature-reuse processor for one layer (``current``: the processor it replaces)."""

    @property
    def block_counts(self) -> dict[str, int]:
        """Blocks per kind, e.g. ``{"double": 19, "single": 38}``, in the family's order."""
        return dict(Counter(kind for kind, _ in self.layers.values()))

    # ---- devices and speed -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: diffusers' answer first, which knows about fp8 weight storage
        (layerwise casting), where the first parameter's dtype is not what inputs must be cast to."""
        dtype = getattr(self.transformer, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.transformer.parameters()).dtype

    @property
    def execution_device(self) -> torch.device:
        """Where inputs go: the accelerator even when CPU offload parks the weights elsewhere."""
        hook = getattr(self.transformer, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is None:
            device = _group_onload_device(self.transformer)
        return torch.device(device) if device is not None else self.device

    def optimize(self, *, compile: bool = False, attention_backend: str | None = None, **compile_kwargs) -> None:
        """Speed options, applied to the transformer in place.

        attention_backend: one of diffusers' attention backends (``"native"``, ``"_native_cudnn"``,
            ``"flash"``, ...), for families whose processors dispatch through diffusers.
        compile: regional ``torch.compile`` of the repeated blocks (diffusers'
            ``compile_repeated_blocks``), or of the whole transformer where it declares none.
            Calls that record or inject features run eager (2 of 18 per edit at the defaults).
        """
        if attention_backend is not None:
            self.transformer.set_attention_backend(attention_backend)
        if compile:
            kwargs = {"fullgraph": True, **compile_kwargs}
            if getattr(self.transformer, "_repeated_blocks", None):
                self.transformer.compile_repeated_blocks(**kwargs)
            else:
                self.transformer.compile(**kwargs)
            self.compiled = True

    def eager_if(self, attention_kwargs: dict | None) -> contextlib.AbstractContextManager:
        """A call whose processors record or inject features hands them per-call Python state:
        compiled blocks would guard on it and recompile, so such calls run eager."""
        if attention_kwargs is None or not self.compiled:
            return contextlib.nullcontext()
        set_stance = getattr(torch.compiler, "set_stance", None)  # PyTorch >= 2.6
        return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()

    # ---- sizes and latents -----------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        """Refuse a size this model cannot make, naming what it takes."""
        m = self.multiple
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < m or side % m:
                raise ValueError(f"{name} {side!r} is not accepted; this model takes multiples of {m} (>= {m})")

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """One sample's latent shape in the pipeline's own layout (no batch dimension)."""

    def size_of(self, latents: torch.Tensor) -> tuple[int, int] | None:
        """``(height, width)`` in pixels that ``latents`` stand for, where the layout says so."""
        return None

    def running(self) -> contextlib.AbstractContextManager:
        """Entered around every pass; a family may set up what its calls need (default: nothing)."""
        return contextlib.nullcontext()

    def check_latents(self, latents: torch.Tensor, height: int, width: int) -> None:
        want = self.latent_shape(height, width)
        if tuple(latents.shape[1:]) != want:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not fit a {width}x{height} image; "
                f"this model expects [batch, {', '.join(map(str, want))}]"
            )

    @abstractmethod
    def latent_mask(self, mask: np.ndarray, height: int, width: int) -> torch.Tensor:
        """A pixel mask ``[H, W]`` (True = edit) as a 0/1 float tensor shaped like (or broadcasting
        against) one sample's latents: binary per latent cell (a VAE latent pixel; a pixel for
        pixel-space models), a cell counting as edited if any of its pixels is. Finer than a
        token: the blend needs no token granularity, and pixels outside the mask stay untouched."""

    # ---- text and images -------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The family's conditioning for ``prompts`` under :attr:`embed_names`, batch first."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] to fp32 latents (deterministic)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents to ``[B, 3, H, W]`` in [-1, 1]."""

    @abstractmethod
    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """The model's size policy: crop or resize an RGB image to a size it accepts."""

    # ---- time and the velocity -------------------------------------------------------------
    @abstractmethod
    def timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampling grid from 1 to 0 (float64, ``num_steps + 1`` points), as the family's
        pipeline computes it from its scheduler config."""

    @abstractmethod
    def conditioning(self, embeds: Embeds, height: int, width: int, guidance: float) -> Conditioning:
        """Everything one pass needs besides latents and time, on the execution device."""

    @abstractmethod
    def velocity(
        self, latents: torch.Tensor, t: float, cond: Conditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """``v(latents, t)`` for ``t`` in [0, 1]; ``attention_kwargs`` reach the processors."""

    def check_embeds(self, embeds: Mapping[str, torch.Tensor | None], what: str = "") -> Embeds:
        """The conditioning this family needs, by name; unknown or missing names are errors."""
        unknown = sorted(set(embeds) - set(self.embed_names))
        if unknown:
            raise ValueError(
                f"{self.name} takes no {what}{unknown[0]}; its conditioning: "
                + ", ".join(what + n for n in self.embed_names)
            )
        out = {k: v for k, v in embeds.items() if v is not None}
        if "prompt_embeds" not in out:
            raise ValueError(f"{what}prompt_embeds is required")
        return out


def crop_to_multiple(image: Image.Image, multiple: int, resize: tuple[int, int] | None = None) -> Image.Image:
    """Resize if asked, then crop top-left to a multiple of ``multiple``, as the reference code does."""
    if resize is not None:
        image = image.resize(resize, Image.Resampling.LANCZOS)
    w, h = image.size
    m = multiple
    if w < m or h < m:
        raise ValueError(f"image {w}x{h} is smaller than the model's minimum {m}x{m}")
    return image.crop((0, 0, w - w % m, h - h % m))


def _group_onload_device(module: torch.nn.Module) -> torch.device | None:
    """The device diffusers' group offloading runs ``module`` on, or None without it."""
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device, _is_group_offload_enabled
    except ImportError:
        return None
    return _get_group_onload_device(module) if _is_group_offload_enabled(module) else None


def batch_to(x: torch.Tensor, b: int) -> torch.Tensor:
    """Broadcast a batch-1 conditioning tensor to ``b`` rows (an inversion shared by many edits)."""
    if x.shape[0] == b:
        return x
    if x.shape[0] == 1:
        return x.expand(b, *x.shape[1:])
    raise ValueError(f"conditioning batch {x.shape[0]} does not match latents batch {b}")


def grid_mask(mask: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """``[H, W]`` bool -> ``[rows, cols]`` 0/1: a cell is 1 if any pixel under it is set.

    The mask is first resized to ``rows * k x cols * k`` (nearest) for the smallest k covering it.
    """
    m = np.asarray(mask).astype(bool)
    h, w = m.shape
    # Nearest-neighbour index maps from a fine grid of whole cells onto the mask's pixels.
    k = max(1, -(-h // rows), -(-w // cols))
    ys = (np.arange(rows * k) * h) // (rows * k)
    xs = (np.arange(cols * k) * w) // (cols * k)
    fine = m[ys][:, xs].reshape(rows, k, cols, k)
    return torch.from_numpy(fine.any(axis=(1, 3)).astype(np.float32))
