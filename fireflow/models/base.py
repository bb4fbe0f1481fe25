"""What the editor needs from a model family, and nothing about any family in particular.

A family lives in one folder, ``fireflow/models/<family>/``: its adapter (a :class:`ModelAdapter`
subclass), its attention processors and its latent layout. The adapter declares the pipeline and
transformer classes it serves (the registry is built from those), the attention layers (module
path -> block id), the processors to put there and how the edit's store reaches them (the
``route``), the default knobs, the time grid (read from its pipeline's scheduler config), and how
conditioning and guidance reach the transformer. A sample is described by one :class:`Geometry`
(height, width, frames). Latents are always in the family's own pipeline layout, in fp32.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.features import (
    ATTENTION_KWARG,
    BlockId,
    FeatureReuse,
    ProcessorInstaller,
    Route,
    bound,
    in_call,
    quiet_unused_kwarg_warning,
)

#: Conditioning tensors by diffusers' names (``prompt_embeds``, ``pooled_prompt_embeds``,
#: ``negative_prompt_embeds``, ...), batch first.
Embeds = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Geometry:
    """What one sample is: ``height`` x ``width`` pixels, ``frames`` frames (1 for an image)."""

    height: int
    width: int
    frames: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, PIL's order."""
        return self.width, self.height

    @property
    def kind(self) -> str:
        return "image" if self.frames == 1 else "clip"

    def __str__(self) -> str:
        return f"{self.width}x{self.height}" + (f", {self.frames} frames" if self.frames != 1 else "")


@dataclass
class Conditioning:
    """What the transformer takes besides the latents and the time, for one pass.

    Families subclass it with their own tensors. ``forwards`` and ``rows`` say what one velocity
    evaluation costs: transformer calls, and batch rows per latent row (2 under batched CFG).
    """

    forwards: int = 1
    rows: int = 1


class ModelAdapter(ABC):
    """A concrete model behind the editor.

    What is fixed for a family or a variant is a class constant; what comes from the loaded model
    (block counts, a default size, a variant flag in its config) is instance state read from its
    config. Pixels cross this interface as ``[B, F, 3, H, W]`` in [-1, 1] (``F = 1`` for images);
    latents are always in the family's own pipeline layout, in fp32.
    """

    #: Short family (or variant) name, shown by the front ends.
    name: ClassVar[str] = "model"
    #: The diffusers pipeline classes this family serves, by name (the registry reads these).
    pipelines: ClassVar[tuple[str, ...]] = ()
    #: The bare diffusers transformer classes whose latent-level API this family serves.
    transformers: ClassVar[tuple[str, ...]] = ()
    #: How the edit's store reaches the processors: "kwargs" (attention kwargs, where the blocks
    #: forward them) or "context" (a context variable bound around each call; fireflow.features).
    route: ClassVar[Route] = "kwargs"
    #: The conditioning names this family's latent API takes, diffusers' spelling.
    embed_names: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    #: "embedded" (a guidance input), "cfg" (true classifier-free guidance) or "none".
    guidance_kind: ClassVar[str] = "none"
    #: Edit knobs that differ from the settings table's defaults (see fireflow.settings).
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: Text-to-image guidance when none is given.
    generate_guidance: ClassVar[float] = 1.0
    #: Whether samples are videos (several frames) rather than images.
    video: ClassVar[bool] = False
    #: The diffusers logger that warns about attention kwargs a layer's processor does not take.
    attention_logger: ClassVar[str | None] = None

    def __init__(self, transformer: torch.nn.Module | Sequence[torch.nn.Module], layers: Mapping[str, BlockId]):
        """``transformer``: the model, or several (experts chosen per call by the family).
        ``layers``: layer name -> block id for every attention module features can be reused in;
        names are module paths, prefixed ``"<i>."`` by the transformer's index when there are several."""
        if self.attention_logger:
            quiet_unused_kwarg_warning(self.attention_logger)
        models = [transformer] if isinstance(transformer, torch.nn.Module) else list(transformer)
        #: Every transformer the family calls; ``transformer`` is the first (devices, dtype).
        self.models: list[torch.nn.Module] = models
        self.transformer = models[0]
        #: Layer name -> block id.
        self.layers = dict(layers)
        #: Installs the family's processors on the layers an edit selects (shared, no edit state).
        self.processors = ProcessorInstaller(self._modules(), self.layers, self.make_processor)
        #: Side of the square image ``generate`` makes when no size is given.
        self.default_size = 1024
        #: Image sides must be multiples of this many pixels.
        self.multiple = 16
        #: Set by :meth:`optimize`: feature-reuse calls then run with compilation switched off.
        self.compiled = False

    def _modules(self) -> dict[str, torch.nn.Module]:
        if len(self.models) == 1:
            return {name: self.transformer.get_submodule(name) for name in self.layers}
        out = {}
        for name in self.layers:
            index, _, path = name.partition(".")
            out[name] = self.models[int(index)].get_submodule(path)
        return out

    @property
    def defaults(self) -> dict[str, Any]:
        """This model's knob defaults (a family may derive them from the loaded config)."""
        return dict(self.DEFAULTS)

    @property
    def model_name(self) -> str:
        """What front ends call the loaded model (the family, or a bundled model's own name)."""
        return self.name

    @property
    def size_note(self) -> str | None:
        """A line front ends print about sizes (e.g. a fixed resolution), or None."""
        return None

    # ---- attention layers ------------------------------------------------------------------
    @abstractmethod
    def make_processor(self, block: BlockId, current: object) -> object:
        """The feature-reuse processor for one layer (``current``: the processor it replaces)."""

    @property
    def block_counts(self) -> dict[str, int]:
        """Blocks per kind, e.g. ``{"double": 19, "single": 38}``, in the family's order."""
        return dict(Counter(kind for kind, _ in dict.fromkeys(self.layers.values())))

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
        """Speed options, applied to the transformer(s) in place.

        attention_backend: one of diffusers' attention backends (``"native"``, ``"_native_cudnn"``,
            ``"flash"``, ...), for families whose processors dispatch through diffusers.
        compile: regional ``torch.compile`` of the repeated blocks (diffusers'
            ``compile_repeated_blocks``), or of the whole transformer where it declares none.
            On the "kwargs" route, calls that record or inject features run eager (2 of 18 per
            edit at the defaults). On the "context" route the processors read a context variable,
            which ``torch.compile(fullgraph=True)`` cannot trace: every call made while an edit's
            processors are installed runs eager; ``generate`` and the latent API without
            feature reuse stay compiled.
        """
        for model in self.models:
            if attention_backend is not None:
                model.set_attention_backend(attention_backend)
            if compile:
                kwargs = {"fullgraph": True, **compile_kwargs}
                if getattr(model, "_repeated_blocks", None):
                    model.compile_repeated_blocks(**kwargs)
                else:
                    model.compile(**kwargs)
        self.compiled = self.compiled or compile

    def feature_call(
        self, store: FeatureReuse | None, reusing: bool
    ) -> tuple[dict | None, contextlib.AbstractContextManager]:
        """How one transformer call hands ``store`` (None: inactive this call) to the processors:
        ``(attention_kwargs, context)``. ``reusing``: the edit's processors are installed.
        Runs on every model call: the common case (kwargs route, nothing to hand over) costs nothing."""
        if self.route == "kwargs":
            if store is None:
                return None, contextlib.nullcontext()
            stack = contextlib.ExitStack()
            # Unselected stock layers warn about the kwarg; the filter drops that inside this call only.
            stack.enter_context(in_call())
            kwargs: dict | None = {ATTENTION_KWARG: store}
        else:
            stack, kwargs = contextlib.ExitStack(), None
            stack.enter_context(bound(store))
        eager = store is not None if self.route == "kwargs" else reusing
        if eager and self.compiled:
            # Per-call Python state would make compiled blocks guard and recompile (kwargs), or
            # cannot be traced at all (a context variable): such calls run eager.
            set_stance = getattr(torch.compiler, "set_stance", None)  # PyTorch >= 2.6
            if set_stance is not None:
                stack.enter_context(set_stance("force_eager"))
        return kwargs, stack

    # ---- sizes and latents -----------------------------------------------------------------
    def check_geometry(self, geometry: Geometry) -> None:
        """Refuse a size (or frame count) this model cannot make, naming what it takes."""
        m = self.multiple
        for name, side in (("height", geometry.height), ("width", geometry.width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < m or side % m:
                raise ValueError(f"{name} {side!r} is not accepted; this model takes multiples of {m} (>= {m})")
        if geometry.frames != 1 and not self.video:
            raise ValueError(f"{geometry.frames} frames: {self.name} makes images (1 frame)")

    def default_geometry(self, height: int | None = None, width: int | None = None, frames: int | None = None):
        """The geometry ``generate`` uses for the sizes not given."""
        side = self.default_size
        return Geometry(side if height is None else height, side if width is None else width, frames or 1)

    @abstractmethod
    def latent_shape(self, geometry: Geometry) -> tuple[int, ...]:
        """One sample's latent shape in the pipeline's own layout (no batch dimension)."""

    def geometry_of(self, latents: torch.Tensor) -> Geometry | None:
        """The geometry ``latents`` stand for, where the layout says so (unpacked latents)."""
        return None

    def check_latents(self, latents: torch.Tensor, geometry: Geometry) -> None:
        want = self.latent_shape(geometry)
        if tuple(latents.shape[1:]) != want:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not fit a {geometry} {geometry.kind}; "
                f"this model expects [batch, {', '.join(map(str, want))}]"
            )

    @abstractmethod
    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        """A pixel mask ``[F, H, W]`` (True = edit; ``F`` may be 1 for a still mask over every
        frame) as a 0/1 float tensor shaped like (or broadcasting against) one sample's latents:
        binary per latent cell (a VAE latent pixel; a pixel for pixel-space models), a cell
        counting as edited if any of its pixels is. Finer than a token: the blend needs no token
        granularity, and pixels outside the mask stay untouched."""

    # ---- text and images -------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The family's conditioning for ``prompts`` under :attr:`embed_names`, batch first."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, F, 3, H, W]`` in [-1, 1] to fp32 latents (deterministic)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Latents to ``[B, F, 3, H, W]`` in [-1, 1]."""

    @abstractmethod
    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """The model's size policy for one image or frame: crop or resize to a size it accepts."""

    def prepare_frames(self, frames: int) -> int:
        """How many of ``frames`` input frames this model edits: all of them, or fewer where a video
        family trims (the editor keeps the first ones); a count it cannot use is a ValueError."""
        if frames != 1 and not self.video:
            raise ValueError(f"{frames} frames given: {self.name} edits images, not videos")
        return frames

    # ---- time and the velocity -------------------------------------------------------------
    @abstractmethod
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """The sampling grid from 1 to 0 (float64, ``num_steps + 1`` points), as the family's
        pipeline computes it from its scheduler config."""

    @abstractmethod
    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> Conditioning:
        """Everything one pass needs besides latents and time, on the execution device."""

    @abstractmethod
    def velocity(
        self, latents: torch.Tensor, t: float, cond: Conditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """``v(latents, t)`` for ``t`` in [0, 1]; ``attention_kwargs`` are for the family's
        transformer calls ("kwargs" route; None otherwise and when no feature is reused)."""

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

    # ---- the latent layout the pipeline's ``latents=`` takes ---------------------------------
    def from_pipeline_latents(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Any layout the pipeline uses (its ``latents=`` input, its ``output_type="latent"``
        output) -> this adapter's layout (default: they are all the same)."""
        return latents

    def to_pipeline_latents(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """This adapter's layout -> what the pipeline's ``output_type="latent"`` returns."""
        return latents

    def to_pipeline_noise(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """This adapter's layout -> what the pipeline's ``latents=`` input takes (inverted noise)."""
        return latents


def attention_modules(model: torch.nn.Module) -> list[str]:
    """Module paths of every attention module in ``model`` that takes a processor (diffusers'
    per-module ``set_processor``; models without ``set_attn_processor`` have these too)."""
    return [n for n, m in model.named_modules() if n and hasattr(m, "set_processor") and hasattr(m, "processor")]


def one_frame(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 3, H, W]`` -> ``[B, 3, H, W]`` for image families."""
    if pixels.dim() != 5 or pixels.shape[1] != 1:
        raise ValueError(f"expected one frame [B, 1, 3, H, W], got {tuple(pixels.shape)}")
    return pixels[:, 0]


def still_mask(mask: np.ndarray) -> np.ndarray:
    """A ``[F, H, W]`` mask as one ``[H, W]`` mask for image families (a cell edited in any frame)."""
    m = np.asarray(mask, dtype=bool)
    return m if m.ndim == 2 else m.any(axis=0)


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


def pack(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]`` tokens, row-major, channels then patch offsets:
    the packing of FLUX.1, Chroma and Qwen-Image (their pipelines' ``_pack_latents``)."""
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"a {w}x{h} grid is not a multiple of the {patch}-cell patch")
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``height`` x ``width`` latent (or pixel) grid."""
    b, n, d = tokens.shape
    hp, wp, c = height // patch, width // patch, d // (patch * patch)
    if n != hp * wp:
        raise ValueError(f"{n} tokens do not make a {width}x{height} grid of {patch}-cell patches")
    x = tokens.reshape(b, hp, wp, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


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
