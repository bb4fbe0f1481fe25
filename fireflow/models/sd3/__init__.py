"""Stable Diffusion 3 / 3.5 (medium and large) through diffusers' ``StableDiffusion3Pipeline``.

Latents are unpacked ``[B, 16, H/8, W/8]``, as ``StableDiffusion3Pipeline(latents=...)`` takes them
(the transformer patchifies itself, with a cropped absolute position embedding). Guidance is true
classifier-free guidance over a [negative, positive] batch, as the pipeline does it.

Defaults, and why (the paper has no SD3 setting):

* inversion guidance 1: one batch row per call, and SD3 editors (FTEdit, DNAEdit) and the trackers
  of FireFlow and RF-Solver agree that inverting under CFG breaks reconstruction;
* editing guidance 2: FTEdit's value on SD3.5-large, whose V replacement over the joint sequence is
  the mechanism FireFlow uses; DNAEdit uses 3.5. Higher follows the prompt more, keeps less;
* V replaced over the joint [image, text] sequence in every joint block but the last
  (``context_pre_only``, whose text branch ends there), in the first step (inject 1 of 8, 12.5% of
  the steps; FTEdit's 10-15%). SD3.5's ``attn2`` (image-only) is not touched by default
  (``--blocks joint:all,attn2:all`` adds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.features import BlockId
from fireflow.models._pipeline import PipelineAdapter, scheduler_sigmas, shift_mu
from fireflow.models.base import (
    Conditioning,
    Embeds,
    Geometry,
    batch_to,
    crop_to_multiple,
    grid_mask,
    one_frame,
    still_mask,
)
from fireflow.models.sd3.processors import SD3FeatureProcessor, sd3_layers


@dataclass
class SD3Conditioning(Conditioning):
    prompt_embeds: torch.Tensor | None = None  # [B, 77 + T5 tokens, 4096]
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, 2048]
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    guidance: float = 1.0  # CFG scale; CFG runs when it is > 1, as in the pipeline


class SD3Adapter(PipelineAdapter):
    """SD3 / SD3.5 as the editor's model."""

    name: ClassVar[str] = "sd3"
    pipelines: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    transformers: ClassVar[tuple[str, ...]] = ("SD3Transformer2DModel",)
    embed_names: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    guidance_kind: ClassVar[str] = "cfg"
    generate_guidance: ClassVar[float] = 7.0  # StableDiffusion3Pipeline's default
    attention_logger: ClassVar[str | None] = "diffusers.models.attention_processor"
    reference_scheduler: ClassVar[dict[str, Any]] = {"shift": 3.0}  # SD3's and SD3.5's

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None):
        super().__init__(transformer, sd3_layers(transformer), pipe, scheduler)
        self.patch = transformer.config.patch_size
        self.multiple = self.vae_scale_factor * self.patch
        if getattr(pipe, "vae", None) is not None:
            self.default_size = transformer.config.sample_size * self.vae_scale_factor

    @property
    def defaults(self) -> dict[str, Any]:
        """Editing guidance 2; V in every joint block but the last (``context_pre_only``)."""
        n = self.transformer.config.num_layers
        return {"guidance": 2.0, "blocks": f"joint:0-{n - 2}" if n > 1 else "joint:all"}

    def make_processor(self, block: BlockId, current: object) -> SD3FeatureProcessor:
        return SD3FeatureProcessor(block)

    # ---- sizes -------------------------------------------------------------------------------
    def latent_shape(self, geometry: Geometry) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, geometry.height // f, geometry.width // f)

    def geometry_of(self, latents: torch.Tensor) -> Geometry | None:
        f = self.vae_scale_factor
        return Geometry(latents.shape[-2] * f, latents.shape[-1] * f)

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        f = self.vae_scale_factor
        # [1, H/8, W/8] against [16, H/8, W/8]
        return grid_mask(still_mask(mask), geometry.height // f, geometry.width // f)[None]

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16 (VAE factor x patch)."""
        image = crop_to_multiple(image, self.multiple, resize)
        max_side = self.transformer.config.pos_embed_max_size * self.multiple
        if max(image.size) > max_side:
            w, h = image.size
            raise ValueError(f"image {w}x{h} is larger than this model's position embedding allows ({max_side} px)")
        return image

    def check_geometry(self, geometry: Geometry) -> None:
        super().check_geometry(geometry)
        max_side = self.transformer.config.pos_embed_max_size * self.multiple
        if max(geometry.height, geometry.width) > max_side:
            raise ValueError(f"size {geometry} is larger than this model's position embedding ({max_side} px)")

    # ---- text and images -----------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's own encoding (CLIP-L + CLIP-G + T5), with the empty negative prompt."""
        pipe = self.need_pipe("text encoders")
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.execution_device,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts),
        )
        return {
            "prompt_embeds": pe,
            "pooled_prompt_embeds": ppe,
            "negative_prompt_embeds": npe,
            "negative_pooled_prompt_embeds": nppe,
        }

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        latents = vae.encode(one_frame(pixels).to(self.execution_device, vae.dtype)).latent_dist.mean
        return (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z.to(vae.dtype)).sample.float()[:, None]

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """``StableDiffusion3Pipeline``'s grid: ``set_timesteps(N)`` with the config's static shift
        (3.0 for SD3/SD3.5), or dynamic shifting where the config asks for it."""
        cfg = self.scheduler_config
        kwargs: dict[str, Any] = {"num_inference_steps": num_steps}
        if cfg.get("use_dynamic_shifting"):
            seq_len = (geometry.height // self.multiple) * (geometry.width // self.multiple)
            kwargs["mu"] = shift_mu(seq_len, cfg)
        return scheduler_sigmas(cfg, **kwargs)

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> SD3Conditioning:
        device, dtype = self.execution_device, self.dtype
        if embeds.get("pooled_prompt_embeds") is None:
            raise ValueError("SD3 needs pooled_prompt_embeds (the CLIP-L and CLIP-G pooled vectors)")
        cfg = guidance > 1
        negatives = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
        if cfg and any(embeds.get(n) is None for n in negatives):
            raise ValueError(
                f"guidance {guidance:g} > 1 is classifier-free guidance on SD3: it needs negative_prompt_embeds and "
                "negative_pooled_prompt_embeds (or guidance 1)"
            )

        def put(name: str) -> torch.Tensor | None:
            x = embeds.get(name)
            return None if x is None else x.to(device, dtype)

        return SD3Conditioning(
            rows=2 if cfg else 1,
            prompt_embeds=put("prompt_embeds"),
            pooled_prompt_embeds=put("pooled_prompt_embeds"),
            negative_prompt_embeds=put("negative_prompt_embeds") if cfg else None,
            negative_pooled_prompt_embeds=put("negative_pooled_prompt_embeds") if cfg else None,
            guidance=guidance,
        )

    def velocity(
        self, latents: torch.Tensor, t: float, cond: SD3Conditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One transformer call over [negative, positive] rows under CFG. SD3 takes the timestep
        unscaled (sigma x 1000)."""
        b = latents.shape[0]
        x = latents.to(cond.prompt_embeds.dtype)
        text, pooled = batch_to(cond.prompt_embeds, b), batch_to(cond.pooled_prompt_embeds, b)
        cfg = cond.negative_prompt_embeds is not None
        if cfg:
            x = torch.cat([x, x])
            text = torch.cat([batch_to(cond.negative_prompt_embeds, b), text])
            pooled = torch.cat([batch_to(cond.negative_pooled_prompt_embeds, b), pooled])
        timestep = torch.full((x.shape[0],), t * 1000.0, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        if cfg:
            uncond, positive = out.chunk(2)
            out = uncond + cond.guidance * (positive - uncond)
        return out
