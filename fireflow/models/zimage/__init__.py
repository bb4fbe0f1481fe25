"""Z-Image and Z-Image-Turbo through diffusers' ``ZImagePipeline`` (the "context" route).

Latents are the VAE's own ``[B, 16, H/8, W/8]``, normalised ``(z - shift_factor) * scaling_factor``
from the posterior mean, as ``ZImagePipeline(output_type="latent")`` returns them and its
``latents=`` takes them. The transformer takes lists (one ``[C, 1, h, w]`` latent and one
``[L_i, D]`` caption per row), the time as ``1 - sigma`` (0 = noise), and returns the NEGATED
velocity: ``v = -out``. Its joint blocks attend over ``[image, caption]``, each padded to a multiple
of 32 with a learned pad token.

**Conditioning.** ``prompt_embeds`` ``[B, L, D]`` (the text encoder's second-to-last hidden states)
and, where captions of one batch differ in length, ``prompt_embeds_mask`` ``[B, L]`` (True = a real
token; the pipeline drops the padding before the transformer, and so does this adapter); the same
for ``negative_prompt_embeds``. Equal-length captions need no mask.

**Guidance** is the pipeline's: ``pred = pos + g (pos - neg)`` (an effective weight of ``1 + g``),
on when ``g > 0``, in one batched forward over ``[negative, positive]`` rows (the pipeline batches
``[positive, negative]``; rows are independent, and the store's convention keeps the positive half
last). The pipeline's options are adapter attributes with its defaults: ``cfg_normalization``
(0: off; ``c > 0`` rescales ``pred`` to at most ``c x ||pos||`` per sample) and ``cfg_truncation``
(1: off; guidance 0 where ``1 - sigma > cfg_truncation``). Under truncation a pass's cost counts
two rows per call, also for the calls truncation made unguided.

**Variants**, from the pipeline's scheduler config, never a folder name: both ship a
``FlowMatchEulerDiscreteScheduler`` without dynamic shifting, Z-Image (base, undistilled) with
``shift`` 6, Z-Image-Turbo (distilled, 8 steps, guidance 0) with ``shift`` 3; ``model_index.json``
and the transformer config are the same for both. A shift below 4.5 is taken for Turbo, on which an
inversion warns once (as on FLUX.2 [klein] distilled). The shift is a convention, not a flag: a
fine-tune that changes it is misread; choose explicitly with
``FireFlowEditor(ZImageTurboAdapter.from_pipe(pipe))`` (or ``ZImageBaseAdapter``). A bare
transformer gets Z-Image's (base) scheduler config.

Defaults, and why (nothing measured on real weights):

* editing guidance 2 on Z-Image (effective CFG weight 3: below the pipeline's text-to-image 5 and
  the base model card's 3-5, to keep the source's structure, as SD3's 2 and FLUX.2 [klein]'s 2);
  0 on Turbo (distilled without CFG: its model card samples with guidance 0);
* V replaced over the joint ``[image, caption]`` sequence in every joint block (``joint:all``):
  Z-Image is single-stream, like FLUX.1's single blocks where the paper replaces V, in the first
  step (``inject`` 1). The image-only ``noise_refiner`` blocks are an option (``refiner:all``).
* inversion guidance 0: ``ZImagePipeline`` turns CFG on above 0 (``pos + g (pos - neg)``), so the
  unguided inversion FireFlow wants (one row a call) is guidance 0 here, where the other families'
  is 1; the family sets that default (guidance keeps the pipeline's meaning, not reinterpreted).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.features import BlockId, bound, current
from fireflow.models._pipeline import PipelineAdapter, scheduler_sigmas, shift_mu
from fireflow.models.base import (
    Conditioning,
    Embeds,
    Geometry,
    crop_to_multiple,
    grid_mask,
    one_frame,
    still_mask,
)
from fireflow.models.zimage.processors import JointFit, ZImageFeatureProcessor, zimage_layers

#: Z-Image's (base) scheduler config; Z-Image-Turbo's differs only in ``shift`` (3).
ZIMAGE_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False}
ZIMAGE_TURBO_SCHEDULER: dict[str, Any] = {**ZIMAGE_SCHEDULER, "shift": 3.0}
#: Shifts below this are read as Turbo's (3), at or above as the base model's (6).
TURBO_SHIFT_BELOW = 4.5
#: The transformer pads each part of its sequence to a multiple of this many tokens.
SEQ_MULTI_OF = 32

FEW_STEP_WARNING = (
    "Z-Image-Turbo is a few-step distilled model: inversion-based editing and reconstruction are "
    "not expected to work well on it. Use the Z-Image base model for editing."
)


@dataclass
class ZImageConditioning(Conditioning):
    prompt_embeds: list[torch.Tensor] = field(default_factory=list)  # one [L_i, D] per row
    negative_prompt_embeds: list[torch.Tensor] | None = None  # under CFG only
    guidance: float = 0.0
    image_tokens: int = 0  # padded image tokens: where the caption starts in the joint sequence


def _rows(embeds: list[torch.Tensor], b: int) -> list[torch.Tensor]:
    """A batch-1 caption list broadcast to ``b`` rows."""
    if len(embeds) == b:
        return embeds
    if len(embeds) == 1:
        return embeds * b
    raise ValueError(f"conditioning batch {len(embeds)} does not match latents batch {b}")


class ZImageAdapter(PipelineAdapter):
    """Z-Image (any variant; see the module docs) as the editor's model."""

    name: ClassVar[str] = "zimage"
    pipelines: ClassVar[tuple[str, ...]] = ("ZImagePipeline",)
    transformers: ClassVar[tuple[str, ...]] = ("ZImageTransformer2DModel",)
    route: ClassVar[str] = "context"
    embed_names: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
    )
    guidance_kind: ClassVar[str] = "cfg"
    DEFAULTS: ClassVar[dict[str, Any]] = {"guidance": 2.0, "inversion_guidance": 0.0, "blocks": "joint:all"}
    generate_guidance: ClassVar[float] = 5.0  # ZImagePipeline's default
    reference_scheduler: ClassVar[dict[str, Any]] = ZIMAGE_SCHEDULER
    #: A few-step model: an inversion on it warns once.
    few_step: ClassVar[bool] = False

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None):
        super().__init__(transformer, zimage_layers(transformer), pipe, scheduler)
        self.multiple = self.vae_scale_factor * transformer.config.all_patch_size[0]
        self.default_size = 1024  # ZImagePipeline's default
        #: The pipeline's ``cfg_normalization`` (0 or False: off) and ``cfg_truncation`` (1: off).
        self.cfg_normalization: float = 0.0
        self.cfg_truncation: float = 1.0
        self._warned = False

    @classmethod
    def variant(cls, transformer: torch.nn.Module, pipe=None) -> type[ZImageAdapter]:
        """Turbo where the pipeline's scheduler shift is Turbo's (see the module docs); a subclass
        asked for by name stays what it is."""
        if cls is not ZImageAdapter:
            return cls
        if pipe is None:
            return ZImageBaseAdapter
        cfg = pipe.scheduler.config
        turbo = not cfg.get("use_dynamic_shifting", False) and float(cfg.get("shift", 1.0)) < TURBO_SHIFT_BELOW
        return ZImageTurboAdapter if turbo else ZImageBaseAdapter

    def make_processor(self, block: BlockId, current: object) -> ZImageFeatureProcessor:
        proc = ZImageFeatureProcessor(block)
        proc._attention_backend = getattr(current, "_attention_backend", None)
        proc._parallel_config = getattr(current, "_parallel_config", None)
        return proc

    # ---- sizes and latents -------------------------------------------------------------------
    def latent_shape(self, geometry: Geometry) -> tuple[int, int, int]:
        s = self.vae_scale_factor
        return (self.transformer.config.in_channels, geometry.height // s, geometry.width // s)

    def geometry_of(self, latents: torch.Tensor) -> Geometry | None:
        if latents.dim() == 4 and latents.shape[1] == self.transformer.config.in_channels:
            s = self.vae_scale_factor
            return Geometry(latents.shape[-2] * s, latents.shape[-1] * s)
        return None

    def image_tokens(self, geometry: Geometry) -> int:
        """Image tokens in the joint sequence: 2 x 2 latent patches, padded to a multiple of 32."""
        n = (geometry.height // self.multiple) * (geometry.width // self.multiple)
        return n + (-n) % SEQ_MULTI_OF

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        s = self.vae_scale_factor
        return grid_mask(still_mask(mask), geometry.height // s, geometry.width // s)[None]  # [1, h, w]

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16 (VAE 8 x patch 2)."""
        return crop_to_multiple(image, self.multiple, resize)

    # ---- text and images -----------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's Qwen3 encoding of ``prompts`` and of the empty negative prompt (its
        default), each padded to the batch's longest caption, with masks."""
        pipe = self.need_pipe("text encoder", "text_encoder")
        pos, neg = pipe.encode_prompt(
            prompt=list(prompts),
            device=self.execution_device,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts),
        )
        pe, pm = _pad(pos)
        ne, nm = _pad(neg)
        return {
            "prompt_embeds": pe,
            "prompt_embeds_mask": pm,
            "negative_prompt_embeds": ne,
            "negative_prompt_embeds_mask": nm,
        }

    def _factors(self) -> tuple[float, float]:
        vae = self.need_pipe("VAE", "vae").vae
        return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 3, H, W]`` -> the posterior mean, ``(z - shift) * scaling``."""
        vae = self.need_pipe("VAE", "vae").vae
        scaling, shift = self._factors()
        z = vae.encode(one_frame(pixels).to(self.execution_device, vae.dtype)).latent_dist.mean.float()
        return (z - shift) * scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        scaling, shift = self._factors()
        z = latents.to(self.execution_device, torch.float32) / scaling + shift
        return vae.decode(z.to(vae.dtype), return_dict=False)[0].float()[:, None]

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """``ZImagePipeline``'s grid: ``sigmas = linspace(1, 1/N, N)`` through the scheduler the
        config describes (shifted by ``shift``; ``mu`` from the image tokens is used only where
        the config sets ``use_dynamic_shifting``), terminal 0 appended."""
        cfg = self.scheduler_config
        s = self.vae_scale_factor
        seq = (geometry.height // s // 2) * (geometry.width // s // 2)
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
        return scheduler_sigmas(cfg, sigmas=sigmas, mu=shift_mu(seq, cfg))

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> ZImageConditioning:
        device, dtype = self.execution_device, self.dtype
        pos = _captions(embeds["prompt_embeds"], embeds.get("prompt_embeds_mask"), device, dtype)
        cond = ZImageConditioning(prompt_embeds=pos, guidance=guidance, image_tokens=self.image_tokens(geometry))
        if guidance > 0:  # as the pipeline: CFG whenever the scale is above 0
            neg = embeds.get("negative_prompt_embeds")
            if neg is None:
                raise ValueError(
                    f"guidance {guidance:g} > 0 is classifier-free guidance on Z-Image: it needs "
                    "negative_prompt_embeds (the empty prompt's), or guidance 0"
                )
            cond.negative_prompt_embeds = _captions(neg, embeds.get("negative_prompt_embeds_mask"), device, dtype)
            cond.rows = 2
        return cond

    def velocity(
        self, latents: torch.Tensor, t: float, cond: ZImageConditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One transformer call over lists (CFG: ``[negative, positive]`` rows), time ``1 - t``,
        output negated; the pipeline's CFG, normalisation and truncation."""
        if self.few_step and t == 0.0 and not self._warned:  # only an inversion evaluates at t = 0
            self._warned = True
            warnings.warn(FEW_STEP_WARNING, UserWarning, stacklevel=2)
        b = latents.shape[0]
        x = latents.to(self.dtype)
        device = x.device
        # The pipeline's time: scheduler timestep sigma x 1000 (fp32), then (1000 - t) / 1000.
        timestep = torch.full((b,), t * 1000.0, device=device, dtype=torch.float32)
        timestep = (1000 - timestep) / 1000
        g = cond.guidance
        trunc = self.cfg_truncation
        if trunc is not None and float(trunc) <= 1 and (1000 - np.float32(t * 1000.0)) / 1000 > trunc:
            g = 0.0
        caps = _rows(cond.prompt_embeds, b)
        cfg = cond.negative_prompt_embeds is not None and g > 0
        if cfg:
            x, caps, timestep = x.repeat(2, 1, 1, 1), _rows(cond.negative_prompt_embeds, b) + caps, timestep.repeat(2)
        store = current()
        with bound(JointFit(store, cond.image_tokens) if store is not None else None):
            out = self.transformer(list(x.unsqueeze(2).unbind(0)), timestep, caps, return_dict=False)[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)
        if cfg:
            neg, pos = out.chunk(2)
            out = pos + g * (pos - neg)
            c = float(self.cfg_normalization or 0.0)
            if c > 0:
                pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
                new_norm = torch.linalg.vector_norm(out.flatten(1), dim=1)
                scale = torch.where(new_norm > c * pos_norm, c * pos_norm / new_norm, torch.ones_like(new_norm))
                out = out * scale.view(-1, 1, 1, 1)
        return -out


class ZImageBaseAdapter(ZImageAdapter):
    """Z-Image (base, undistilled): CFG, many steps."""

    name: ClassVar[str] = "zimage"


class ZImageTurboAdapter(ZImageAdapter):
    """Z-Image-Turbo: few-step distilled, guidance 0; an inversion warns once."""

    name: ClassVar[str] = "zimage-turbo"
    DEFAULTS: ClassVar[dict[str, Any]] = {"guidance": 0.0, "inversion_guidance": 0.0, "blocks": "joint:all"}
    generate_guidance: ClassVar[float] = 0.0  # the Turbo model card samples with guidance 0
    reference_scheduler: ClassVar[dict[str, Any]] = ZIMAGE_TURBO_SCHEDULER
    few_step: ClassVar[bool] = True


def _pad(captions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length ``[L_i, D]`` captions -> ``[B, L, D]`` (zeros after each) and a bool mask."""
    n = max(c.shape[0] for c in captions)
    out = captions[0].new_zeros(len(captions), n, captions[0].shape[-1])
    mask = torch.zeros(len(captions), n, dtype=torch.bool, device=captions[0].device)
    for i, c in enumerate(captions):
        out[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    return out, mask


def _captions(embeds: torch.Tensor, mask: torch.Tensor | None, device, dtype) -> list[torch.Tensor]:
    """``[B, L, D]`` (and an optional ``[B, L]`` mask) -> the pipeline's list of ``[L_i, D]``."""
    if embeds.dim() != 3:
        raise ValueError(f"Z-Image caption embeddings are [batch, tokens, width], got {tuple(embeds.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"a caption mask of shape {tuple(mask.shape)} does not fit embeddings {tuple(embeds.shape)}")
    e = embeds.to(device, dtype)
    if mask is None:
        return list(e.unbind(0))
    m = mask.to(device).bool()
    return [row[keep] for row, keep in zip(e.unbind(0), m.unbind(0), strict=True)]
