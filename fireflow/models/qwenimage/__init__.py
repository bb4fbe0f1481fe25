"""Qwen-Image through diffusers' ``QwenImagePipeline``.

Latents are packed tokens ``[B, (H/16)(W/16), 64]`` (2 x 2 cells of the 16-channel VAE latent),
as ``QwenImagePipeline(latents=...)`` takes them and ``output_type="latent"`` returns them,
normalised by the VAE's per-channel ``latents_mean``/``latents_std``. The transformer takes
``t`` in [0, 1] (``timestep / 1000`` in the pipeline) and returns the velocity as is. Guidance is
the pipeline's true classifier-free guidance: two forwards (negative, then positive; the
pipeline runs positive first, which changes nothing), ``comb = neg + g (pos - neg)`` rescaled
per token to the positive prediction's norm.

Defaults, and why (the paper has no Qwen-Image setting; none of this was measured on real weights):

* inversion guidance 1: one forward per velocity evaluation, and inverting under CFG breaks
  reconstruction (as on SD3 and FLUX.1);
* editing guidance 4: ``QwenImagePipeline``'s own ``true_cfg_scale`` and the value every
  published Qwen-Image example uses; below it the model follows the prompt weakly. The norm
  rescale keeps each token's velocity at the positive prediction's magnitude, so 4 drifts from
  the inversion's trajectory less than plain CFG 4 would (SD3's 2 is for plain CFG);
* V replaced over the joint [text, image] sequence in every block (``joint:all``): Qwen-Image has
  only double-stream blocks (60), none ``context_pre_only``, so there is no single-stream half to
  pick as FLUX.1's setting does; in the first step (``inject`` 1), as the paper does.
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
    pack,
    still_mask,
    unpack,
)
from fireflow.models.qwenimage.processors import QwenImageFeatureProcessor, qwenimage_layers

#: Qwen-Image's scheduler config: what a bare transformer is given when no pipeline comes with it.
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


@dataclass
class QwenImageConditioning(Conditioning):
    prompt_embeds: torch.Tensor | None = None  # [B, S, D] Qwen2.5-VL hidden states
    prompt_embeds_mask: torch.Tensor | None = None  # [B, S] bool, True = token; None: no padding
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds_mask: torch.Tensor | None = None
    guidance: float = 1.0  # true CFG scale; CFG runs when it is > 1, as in the pipeline
    img_shape: tuple[int, int, int] = (1, 1, 1)  # (frames, token rows, token cols) for RoPE


class QwenImageAdapter(PipelineAdapter):
    """Qwen-Image as the editor's model."""

    name: ClassVar[str] = "qwenimage"
    pipelines: ClassVar[tuple[str, ...]] = ("QwenImagePipeline",)
    transformers: ClassVar[tuple[str, ...]] = ("QwenImageTransformer2DModel",)
    embed_names: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
    )
    guidance_kind: ClassVar[str] = "cfg"
    DEFAULTS: ClassVar[dict[str, Any]] = {"guidance": 4.0, "blocks": "joint:all"}
    generate_guidance: ClassVar[float] = 4.0  # QwenImagePipeline's true_cfg_scale
    attention_logger: ClassVar[str | None] = "diffusers.models.attention_processor"
    reference_scheduler: ClassVar[dict[str, Any]] = QWEN_IMAGE_SCHEDULER
    #: Latent cells per token side (the 2x2 packing).
    patch: ClassVar[int] = 2
    #: The negative prompt under CFG: the one Qwen-Image's published examples use.
    negative_prompt: ClassVar[str] = " "

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None):
        super().__init__(transformer, qwenimage_layers(transformer), pipe, scheduler)
        #: Pixels per token side.
        self.multiple = self.vae_scale_factor * self.patch
        self.default_size = 128 * self.vae_scale_factor  # the pipeline's default_sample_size

    def make_processor(self, block: BlockId, current: object) -> QwenImageFeatureProcessor:
        proc = QwenImageFeatureProcessor(block)
        proc._attention_backend = getattr(current, "_attention_backend", None)
        proc._parallel_config = getattr(current, "_parallel_config", None)
        return proc

    # ---- sizes -------------------------------------------------------------------------------
    def token_grid(self, geometry: Geometry) -> tuple[int, int]:
        return geometry.height // self.multiple, geometry.width // self.multiple

    def tokens(self, geometry: Geometry) -> int:
        rows, cols = self.token_grid(geometry)
        return rows * cols

    def latent_shape(self, geometry: Geometry) -> tuple[int, int]:
        return (self.tokens(geometry), self.transformer.config.in_channels)

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        f = self.vae_scale_factor  # pixels per latent cell
        cells = grid_mask(still_mask(mask), geometry.height // f, geometry.width // f)
        c = self.transformer.config.in_channels // (self.patch * self.patch)
        return pack(cells[None, None].expand(1, c, *cells.shape), self.patch)[0]  # [L, C] like the tokens

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16 (VAE factor x patch)."""
        return crop_to_multiple(image, self.multiple, resize)

    # ---- text and images -----------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's own encoding (Qwen2.5-VL with its template), and the negative prompt
        :attr:`negative_prompt` for CFG. Masks are long 0/1 (1 = token), always given."""
        pipe = self.need_pipe("text encoder", "text_encoder")
        device = self.execution_device
        out: Embeds = {}
        for prefix, texts in (("", prompts), ("negative_", [self.negative_prompt] * len(prompts))):
            embeds, mask = pipe.encode_prompt(texts, device=device)
            if mask is None:  # the pipeline drops an all-ones mask
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out[prefix + "prompt_embeds"], out[prefix + "prompt_embeds_mask"] = embeds, mask
        return out

    def _latent_stats(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape).to(like.device)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """As the Qwen-Image img2img pipeline does, with the posterior mean (deterministic)."""
        vae = self.need_pipe("VAE", "vae").vae
        x = one_frame(pixels).to(self.execution_device, vae.dtype)[:, :, None]  # [B, 3, 1, H, W]
        z = vae.encode(x).latent_dist.mean.float()
        mean, std = self._latent_stats(vae, z)
        return pack(((z - mean) / std)[:, :, 0], self.patch)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        f = self.vae_scale_factor
        z = unpack(latents.float(), geometry.height // f, geometry.width // f, self.patch)[:, :, None]
        mean, std = self._latent_stats(vae, z)
        image = vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return image.float().clamp(-1, 1)[:, None]

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """``QwenImagePipeline``'s grid: ``sigmas = linspace(1, 1/N, N)`` shifted by ``mu(L)``
        (exponential shift, then the scheduler's terminal stretch to ``shift_terminal``)."""
        cfg = self.scheduler_config
        mu = shift_mu(self.tokens(geometry), cfg)
        return scheduler_sigmas(cfg, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> QwenImageConditioning:
        device, dtype = self.execution_device, self.dtype
        cfg = guidance > 1
        if cfg and embeds.get("negative_prompt_embeds") is None:
            raise ValueError(
                f"guidance {guidance:g} > 1 is classifier-free guidance on Qwen-Image: it needs "
                "negative_prompt_embeds (or guidance 1)"
            )

        def put(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            x = embeds[name].to(device, dtype)
            mask = embeds.get(name.replace("embeds", "embeds_mask"))
            if mask is not None:
                if tuple(mask.shape) != tuple(x.shape[:2]):
                    raise ValueError(f"{name}_mask of shape {tuple(mask.shape)} does not fit {name} {tuple(x.shape)}")
                mask = mask.to(device).bool()
                if mask.all():  # as the pipeline does: no padding, no mask
                    mask = None
            return x, mask

        pe, pm = put("prompt_embeds")
        ne, nm = put("negative_prompt_embeds") if cfg else (None, None)
        rows, cols = self.token_grid(geometry)
        return QwenImageConditioning(
            forwards=2 if cfg else 1,
            rows=1,
            prompt_embeds=pe,
            prompt_embeds_mask=pm,
            negative_prompt_embeds=ne,
            negative_prompt_embeds_mask=nm,
            guidance=guidance,
            img_shape=(1, rows, cols),
        )

    def velocity(
        self, latents: torch.Tensor, t: float, cond: QwenImageConditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One transformer call, or two under CFG (negative first, so that a guided inversion
        leaves the positive prediction's features recorded, as SD3's [negative, positive] batch does)."""
        b = latents.shape[0]
        x = latents.to(cond.prompt_embeds.dtype)
        # The pipeline's rounding: timestep = fp32(sigma x 1000) / 1000.
        timestep = torch.full((b,), t * 1000.0, device=x.device, dtype=torch.float32).to(x.dtype) / 1000
        img_shapes = [[cond.img_shape]] * b

        def forward(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return self.transformer(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=batch_to(embeds, b),
                encoder_hidden_states_mask=None if mask is None else batch_to(mask, b),
                img_shapes=img_shapes,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

        if cond.negative_prompt_embeds is None:
            return forward(cond.prompt_embeds, cond.prompt_embeds_mask)
        negative = forward(cond.negative_prompt_embeds, cond.negative_prompt_embeds_mask)
        positive = forward(cond.prompt_embeds, cond.prompt_embeds_mask)
        comb = negative + cond.guidance * (positive - negative)
        return comb * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
