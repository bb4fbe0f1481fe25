"""FLUX.1 through diffusers' ``FluxPipeline``: VAE posterior mean, 2x2 packing into 64-channel
tokens, CLIP pooled + T5 text, embedded guidance, V reuse in the single-stream blocks."""

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
    pack,
    still_mask,
    unpack,
)
from fireflow.models.flux.processors import FluxFeatureProcessor, flux_layers

#: FLUX.1-dev's scheduler config: what a bare transformer is given when no pipeline comes with it.
FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


@dataclass
class FluxConditioning(Conditioning):
    prompt_embeds: torch.Tensor | None = None  # [B, S, D] T5 tokens
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, P] CLIP pooled
    txt_ids: torch.Tensor | None = None  # [S, 3]
    img_ids: torch.Tensor | None = None  # [L, 3]
    guidance: float | None = None  # the distilled guidance input; None for models without one


class FluxAdapter(PipelineAdapter):
    """FLUX.1 (or any diffusers ``FluxPipeline``) as the editor's model. Latents are packed
    tokens ``[B, L, 64]``, as ``FluxPipeline(latents=...)`` takes them."""

    name: ClassVar[str] = "flux"
    pipelines: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    transformers: ClassVar[tuple[str, ...]] = ("FluxTransformer2DModel",)
    embed_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")
    guidance_kind: ClassVar[str] = "embedded"
    #: The paper's PIE-Bench setting (its reference README): V replaced in all single blocks.
    DEFAULTS: ClassVar[dict[str, Any]] = {"blocks": "single:all"}
    generate_guidance: ClassVar[float] = 3.5
    attention_logger: ClassVar[str | None] = "diffusers.models.transformers.transformer_flux"
    reference_scheduler: ClassVar[dict[str, Any]] = FLUX_DEV_SCHEDULER
    #: Latent cells per token side (the 2x2 packing).
    patch: ClassVar[int] = 2

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None):
        super().__init__(transformer, flux_layers(transformer), pipe, scheduler)
        #: Pixels per token side.
        self.multiple = self.vae_scale_factor * self.patch

    @classmethod
    def variant(cls, transformer: torch.nn.Module, pipe=None) -> type[FluxAdapter]:
        """FLUX.1 without a guidance input (schnell, or a model trained so) is its own variant."""
        return cls if transformer.config.guidance_embeds else FluxUnguidedAdapter

    # ---- attention -------------------------------------------------------------------------
    def make_processor(self, block: BlockId, current: object) -> FluxFeatureProcessor:
        proc = FluxFeatureProcessor(block)
        proc._attention_backend = getattr(current, "_attention_backend", None)
        return proc

    # ---- sizes -------------------------------------------------------------------------------
    def tokens(self, geometry: Geometry) -> int:
        """Packed image tokens of one sample."""
        return (geometry.height // self.multiple) * (geometry.width // self.multiple)

    def latent_shape(self, geometry: Geometry) -> tuple[int, int]:
        return (self.tokens(geometry), self.transformer.config.in_channels)

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        f = self.multiple // self.patch  # pixels per latent cell
        cells = grid_mask(still_mask(mask), geometry.height // f, geometry.width // f)  # [h, w] latent cells
        c = self.transformer.config.in_channels // (self.patch * self.patch)
        return pack(cells[None, None].expand(1, c, *cells.shape), self.patch)[0]  # [L, C] like the tokens

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16 as the reference code does."""
        return crop_to_multiple(image, self.multiple, resize)

    # ---- text and images -----------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        pipe = self.need_pipe("text encoders")
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompts, prompt_2=None, device=self.execution_device, max_sequence_length=512
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        x = one_frame(pixels).to(self.execution_device, vae.dtype)
        latents = vae.encode(x).latent_dist.mean  # the posterior mean: deterministic
        latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
        return pack(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        f = self.vae_scale_factor
        z = unpack(latents, geometry.height // f, geometry.width // f)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z.to(vae.dtype)).sample.float()[:, None]

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """``FluxPipeline``'s grid: ``sigmas = linspace(1, 1/N, N)`` shifted by ``mu(L)`` (or the
        static ``shift`` where the config turns dynamic shifting off, as FLUX.1-schnell's does)."""
        cfg = self.scheduler_config
        mu = shift_mu(self.tokens(geometry), cfg)
        if cfg.get("use_flow_sigmas"):  # FluxPipeline leaves the sigmas to such a scheduler
            return scheduler_sigmas(cfg, num_inference_steps=num_steps, mu=mu)
        return scheduler_sigmas(cfg, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> FluxConditioning:
        device, dtype = self.execution_device, self.dtype  # each walks the model's modules: once
        prompt_embeds = embeds["prompt_embeds"].to(device, dtype)
        pooled = embeds.get("pooled_prompt_embeds")
        if pooled is None:
            raise ValueError("FLUX.1 needs pooled_prompt_embeds (the CLIP pooled vector)")
        return FluxConditioning(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled.to(device, dtype),
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=self.image_ids(geometry).to(device, dtype),
            guidance=guidance if self.guidance_kind == "embedded" else None,
        )

    def image_ids(self, geometry: Geometry) -> torch.Tensor:
        """Position ids of one sample's image tokens."""
        return grid_ids(geometry.height // self.multiple, geometry.width // self.multiple)

    def velocity(
        self, latents: torch.Tensor, t: float, cond: FluxConditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One transformer call. Casts the fp32 state to the model dtype at the boundary; the
        solver casts the result back. The transformer scales ``t`` and the guidance by 1000 itself."""
        b = latents.shape[0]
        device = latents.device
        # Built on the device from Python floats: a fill kernel, no host-to-device copy or sync.
        timestep = torch.full((b,), t, device=device, dtype=torch.float32)
        guidance = None
        if cond.guidance is not None:
            guidance = torch.full((b,), cond.guidance, device=device, dtype=torch.float32)
        return self.transformer(
            hidden_states=latents.to(cond.prompt_embeds.dtype),
            encoder_hidden_states=batch_to(cond.prompt_embeds, b),
            pooled_projections=batch_to(cond.pooled_prompt_embeds, b),
            timestep=timestep,
            img_ids=cond.img_ids,
            txt_ids=cond.txt_ids,
            guidance=guidance,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]


class FluxUnguidedAdapter(FluxAdapter):
    """FLUX.1 without a guidance input (FLUX.1-schnell, or a model trained without one)."""

    guidance_kind: ClassVar[str] = "none"


def grid_ids(rows: int, cols: int) -> torch.Tensor:
    """FLUX image position ids ``[rows * cols, 3]``: (0, row, col) per token."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)
