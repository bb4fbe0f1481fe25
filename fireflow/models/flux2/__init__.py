"""FLUX.2 [dev] and [klein] through diffusers' ``Flux2Pipeline`` and ``Flux2KleinPipeline``.

Latents are packed tokens ``[B, L, 128]`` (``L = H/16 * W/16``), the layout of the pipelines'
``output_type="latent"`` for [dev]: the VAE's 32-channel latent, patchified 2 x 2 to 128 channels,
normalised by the VAE's BatchNorm running statistics (FLUX.2 has no scaling or shift factor) and
packed row-major. Images encode to the posterior's mode (deterministic).

Three variants, told apart by the pipeline and its config, never by a folder name:

* ``flux2-dev`` (``Flux2Pipeline``): Mistral-3 text, guidance embedded (guidance-distilled, as
  FLUX.1-dev);
* ``flux2-klein`` (``Flux2KleinPipeline``, base): Qwen3 text, no guidance input, true CFG with the
  empty negative prompt, as the pipeline does it;
* ``flux2-klein-distilled`` (``is_distilled=True``): a few-step model without guidance. Inversion
  is not expected to work there (as on FLUX.1-schnell); it runs, with one warning.

Defaults, and why (nothing is measured on real FLUX.2 weights yet; see docs/flux2.md):

* steps 8, inject 1, inversion guidance 1 (the paper's FLUX.1-dev setting, kept for every variant):
  the inversion runs unguided, one batch row per call, and CFG inversion is known to break
  reconstruction on CFG models (the SD3 reports);
* editing guidance 2 on [dev] (the paper's value for the guidance-distilled FLUX.1-dev, whose
  text-to-image default 3.5 is close to [dev]'s 4) and on [klein] base (CFG 2: low enough to keep
  structure, as FTEdit's 2 on SD3.5); unused on [klein] distilled;
* V replaced in all single blocks (``single:all``), the paper's choice on FLUX.1. FLUX.2's single
  blocks are the same fused blocks over [text, image] and hold most of the depth (48 of 56 blocks
  in [dev], 20 of 25 in klein-4B, 24 of 32 in klein-9B). The double blocks are an option.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.features import ATTENTION_KWARG, BlockId
from fireflow.models._pipeline import PipelineAdapter, scheduler_sigmas
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
from fireflow.models.flux import FLUX_DEV_SCHEDULER
from fireflow.models.flux2.processors import PROCESSORS, Bounded, flux2_layers

#: Text tokens per prompt: both pipelines pad and truncate to 512.
MAX_SEQUENCE_LENGTH = 512

FEW_STEP_WARNING = (
    "FLUX.2 [klein] distilled is a few-step model: inversion-based editing and reconstruction are "
    "not expected to work on it (as on FLUX.1-schnell). Use the [klein] base model for editing."
)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The FLUX.2 pipelines' time shift ``mu`` for ``image_seq_len`` noisy image tokens and
    ``num_steps`` steps: linear in the token count, and, up to 4300 tokens, interpolated in the
    step count between fits at 10 and 200 steps. So the grid of ``N`` steps depends on ``N``."""
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    return float(at_10 + (num_steps - 10) * (at_200 - at_10) / 190.0)


@dataclass
class Flux2Conditioning(Conditioning):
    prompt_embeds: torch.Tensor | None = None  # [B, S, D]: three stacked encoder layers
    txt_ids: torch.Tensor | None = None  # [S, 4]: (0, 0, 0, l)
    img_ids: torch.Tensor | None = None  # [L, 4]: (0, row, col, 0)
    negative_prompt_embeds: torch.Tensor | None = None  # [B, S', D], under CFG only
    negative_txt_ids: torch.Tensor | None = None
    guidance: float | None = None  # [dev]'s embedded guidance; None without a guidance input
    cfg: float = 1.0  # the CFG scale, where negative_prompt_embeds are set


class Flux2Adapter(PipelineAdapter):
    """FLUX.2 [dev] or [klein] as the editor's model (see the module docs)."""

    name: ClassVar[str] = "flux2"
    pipelines: ClassVar[tuple[str, ...]] = ("Flux2Pipeline", "Flux2KleinPipeline")
    transformers: ClassVar[tuple[str, ...]] = ("Flux2Transformer2DModel",)
    attention_logger: ClassVar[str | None] = "diffusers.models.transformers.transformer_flux2"
    #: FLUX.2's scheduler config (the same constants as FLUX.1-dev's), for a bare transformer.
    reference_scheduler: ClassVar[dict] = FLUX_DEV_SCHEDULER
    guidance_kind: ClassVar[str] = "none"
    DEFAULTS: ClassVar[dict] = {"guidance": 1.0, "blocks": "single:all"}
    #: A few-step model: an inversion on it warns once.
    few_step: ClassVar[bool] = False
    #: Whether ``output_type="latent"`` returns the VAE's own latents (Flux2KleinPipeline) rather
    #: than the packed tokens (Flux2Pipeline).
    vae_latent_output: ClassVar[bool] = False

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None):
        super().__init__(transformer, flux2_layers(transformer), pipe, scheduler)
        #: Pixels per token side: the VAE's downsampling times the 2 x 2 patchify.
        self.multiple = self.vae_scale_factor * 2
        self.default_size = getattr(pipe, "default_sample_size", 128) * self.vae_scale_factor
        self._warned = False

    @classmethod
    def variant(cls, transformer: torch.nn.Module, pipe=None) -> type[Flux2Adapter]:
        """From the configs, never a folder name: a guidance input means [dev]; a
        ``Flux2KleinPipeline`` is [klein], distilled where its config says ``is_distilled``; a bare
        transformer without guidance input gets [klein] base's CFG (which runs only with guidance
        > 1 and negative_prompt_embeds)."""
        if transformer.config.guidance_embeds:
            return Flux2DevAdapter
        klein = type(pipe).__name__ == "Flux2KleinPipeline"
        if klein and bool(pipe.config.get("is_distilled", False)):
            return Flux2KleinDistilledAdapter
        return Flux2KleinAdapter if klein or pipe is None else Flux2Adapter

    # ---- attention -------------------------------------------------------------------------
    def make_processor(self, block: BlockId, current: object) -> object:
        proc = PROCESSORS[block[0]](block)
        proc._attention_backend = getattr(current, "_attention_backend", None)
        proc._parallel_config = getattr(current, "_parallel_config", None)
        return proc

    # ---- sizes and latents -------------------------------------------------------------------
    def grid(self, geometry: Geometry) -> tuple[int, int]:
        """Token rows and columns of one sample."""
        return geometry.height // self.multiple, geometry.width // self.multiple

    def latent_shape(self, geometry: Geometry) -> tuple[int, int]:
        rows, cols = self.grid(geometry)
        return (rows * cols, self.transformer.config.in_channels)

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        f = self.multiple // 2  # pixels per VAE latent cell; a token is 2 x 2 cells
        cells = grid_mask(still_mask(mask), geometry.height // f, geometry.width // f)
        c = self.transformer.config.in_channels // 4
        return pack(patchify(cells[None, None].expand(1, c, *cells.shape)))[0]  # [L, 4C] like the tokens

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16, as for FLUX.1."""
        return crop_to_multiple(image, self.multiple, resize)

    # ---- the pipelines' own latent layouts ---------------------------------------------------------
    def geometry_of(self, latents: torch.Tensor) -> Geometry | None:
        """Unpacked layouts carry their size: ``latents=``'s ``[B, 128, H/16, W/16]`` and
        ``[klein]``'s ``output_type="latent"`` ``[B, 32, H/8, W/8]``."""
        c = self.transformer.config.in_channels
        if latents.dim() == 4 and latents.shape[1] in (c, c // 4):
            f = self.multiple if latents.shape[1] == c else self.vae_scale_factor
            return Geometry(latents.shape[-2] * f, latents.shape[-1] * f)
        return None

    def from_pipeline_latents(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Packed tokens as they are; ``latents=``'s ``[B, 128, h, w]`` noise packed; the VAE's own
        latents ``[B, 32, H/8, W/8]`` ([klein]'s output) patchified, normalised, packed."""
        if latents.dim() != 4:
            return latents
        if latents.shape[1] == self.transformer.config.in_channels:
            return pack(latents)
        tokens = pack(patchify(latents.float()))
        mean, std = self._bn(tokens.device)
        return (tokens - mean) / std

    def to_pipeline_latents(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """What the pipeline's ``output_type="latent"`` returns: packed tokens for [dev], the
        VAE's own latents for [klein]. A bare [klein] transformer has no VAE, so none of its
        BatchNorm statistics: its latents stay packed tokens, the layout they came in."""
        has_vae = self.pipe is not None and getattr(self.pipe, "vae", None) is not None
        return self.vae_latents(latents, geometry) if self.vae_latent_output and has_vae else latents

    def to_pipeline_noise(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Both pipelines' ``latents=`` take ``[B, 128, H/16, W/16]``."""
        return unpack(latents, *self.grid(geometry))

    def _bn(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's BatchNorm running mean and std over the 128 patchified channels, fp32."""
        vae = self.need_pipe("VAE", "vae").vae
        mean = vae.bn.running_mean.float().to(device)
        std = torch.sqrt(vae.bn.running_var.float().to(device) + vae.config.batch_norm_eps)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        z = vae.encode(one_frame(pixels).to(self.execution_device, vae.dtype)).latent_dist.mode()  # deterministic
        tokens = pack(patchify(z.float()))
        mean, std = self._bn(tokens.device)
        return (tokens - mean) / std

    def vae_latents(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Packed, normalised tokens -> the VAE's own latents ``[B, 32, H/8, W/8]``: what
        ``Flux2KleinPipeline(output_type="latent")`` returns."""
        mean, std = self._bn(latents.device)
        tokens = latents.float() * std + mean
        return unpatchify(unpack(tokens, *self.grid(geometry)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        z = self.vae_latents(latents, geometry)
        return vae.decode(z.to(vae.dtype)).sample.float()[:, None]

    # ---- text ----------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's own encoding (Mistral-3 for [dev], Qwen3 for [klein]); [klein] base adds
        the empty negative prompt, the only one its pipeline uses."""
        pipe = self.need_pipe("text encoder")
        device = self.execution_device
        embeds, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        out = {"prompt_embeds": embeds}
        if self.guidance_kind == "cfg":
            negative, _ = pipe.encode_prompt([""], device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
            out["negative_prompt_embeds"] = negative.expand(len(prompts), *negative.shape[1:])
        return out

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """The FLUX.2 pipelines' grid: ``sigmas = linspace(1, 1/N, N)`` shifted with
        ``mu = empirical_mu(L, N)`` by the scheduler the config describes (which may ignore mu,
        or make its own sigmas where it has ``use_flow_sigmas``)."""
        cfg = self.scheduler_config
        rows, cols = self.grid(geometry)
        mu = empirical_mu(rows * cols, num_steps)
        if cfg.get("use_flow_sigmas"):
            return scheduler_sigmas(cfg, num_inference_steps=num_steps, mu=mu)
        return scheduler_sigmas(cfg, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> Flux2Conditioning:
        device, dtype = self.execution_device, self.dtype
        prompt_embeds = embeds["prompt_embeds"].to(device, dtype)
        img_ids = image_ids(*self.grid(geometry)).to(device)
        cond = Flux2Conditioning(
            prompt_embeds=prompt_embeds,
            txt_ids=text_ids(prompt_embeds.shape[1]).to(device),
            img_ids=img_ids,
        )
        if self.guidance_kind == "embedded":
            cond.guidance = guidance
        elif self.guidance_kind == "cfg" and guidance > 1:  # as the pipeline: CFG only above 1
            negative = embeds.get("negative_prompt_embeds")
            if negative is None:
                raise ValueError(
                    f"guidance {guidance:g} > 1 is classifier-free guidance on {self.name}: it needs "
                    "negative_prompt_embeds (the empty prompt's), or guidance 1"
                )
            cond.negative_prompt_embeds = negative.to(device, dtype)
            cond.negative_txt_ids = text_ids(negative.shape[1]).to(device)
            cond.cfg = guidance
            # [negative, positive] in one batch when the texts are as long (the pipelines pad both
            # to 512 tokens); two forwards otherwise.
            same = negative.shape[1] == prompt_embeds.shape[1]
            cond.rows, cond.forwards = 2, 1 if same else 2
        return cond

    def velocity(
        self, latents: torch.Tensor, t: float, cond: Flux2Conditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One transformer call (CFG: over [negative, positive] rows). The transformer scales the
        timestep and the guidance by 1000 itself."""
        if self.few_step and t == 0.0 and not self._warned:  # only an inversion evaluates at t = 0
            self._warned = True
            warnings.warn(FEW_STEP_WARNING, UserWarning, stacklevel=2)
        b = latents.shape[0]
        x = latents.to(cond.prompt_embeds.dtype)
        text = batch_to(cond.prompt_embeds, b)
        if cond.negative_prompt_embeds is None:
            return self._forward(x, text, cond.txt_ids, t, cond, attention_kwargs)
        negative = batch_to(cond.negative_prompt_embeds, b)
        if cond.forwards == 1:
            x2, text2 = torch.cat([x, x]), torch.cat([negative, text])
            uncond, positive = self._forward(x2, text2, cond.txt_ids, t, cond, attention_kwargs).chunk(2)
        else:
            if attention_kwargs is not None:  # the store's text part has the positive prompt's length
                raise ValueError(
                    f"negative_prompt_embeds of {negative.shape[1]} tokens and prompt_embeds of {text.shape[1]} "
                    "cannot share the inversion's features; give both the same length (the pipelines pad to 512)"
                )
            positive = self._forward(x, text, cond.txt_ids, t, cond, attention_kwargs)
            uncond = self._forward(x, negative, cond.negative_txt_ids, t, cond, attention_kwargs)
        return uncond + cond.cfg * (positive - uncond)

    def _forward(self, x, text, txt_ids, t: float, cond: Flux2Conditioning, attention_kwargs) -> torch.Tensor:
        n, device = x.shape[0], x.device
        store = None if attention_kwargs is None else attention_kwargs.get(ATTENTION_KWARG)
        if store is not None:
            # The store covers [text, image]: reference tokens after them are never touched.
            attention_kwargs = {**attention_kwargs, ATTENTION_KWARG: Bounded(store, text.shape[1] + x.shape[1])}
        # Built on the device from Python floats: a fill kernel, no host-to-device copy or sync.
        timestep = torch.full((n,), t, device=device, dtype=torch.float32)
        guidance = None
        if cond.guidance is not None:
            guidance = torch.full((n,), cond.guidance, device=device, dtype=torch.float32)
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=text,
            timestep=timestep,
            img_ids=cond.img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]


class Flux2DevAdapter(Flux2Adapter):
    """FLUX.2 [dev]: Mistral-3 text, guidance embedded (guidance-distilled)."""

    name: ClassVar[str] = "flux2-dev"
    guidance_kind: ClassVar[str] = "embedded"
    generate_guidance: ClassVar[float] = 4.0  # Flux2Pipeline's default
    DEFAULTS: ClassVar[dict] = {"guidance": 2.0, "blocks": "single:all"}


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 [klein] base: Qwen3 text, true CFG with the empty negative prompt."""

    name: ClassVar[str] = "flux2-klein"
    guidance_kind: ClassVar[str] = "cfg"
    embed_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_prompt_embeds")
    generate_guidance: ClassVar[float] = 4.0  # Flux2KleinPipeline's default
    DEFAULTS: ClassVar[dict] = {"guidance": 2.0, "blocks": "single:all"}
    vae_latent_output: ClassVar[bool] = True


class Flux2KleinDistilledAdapter(Flux2Adapter):
    """FLUX.2 [klein] distilled: a few-step model without guidance; inversion warns once."""

    name: ClassVar[str] = "flux2-klein-distilled"
    few_step: ClassVar[bool] = True
    vae_latent_output: ClassVar[bool] = True


# ---- the latent layout -----------------------------------------------------------------------------
def patchify(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, 4C, H/2, W/2]``: each 2 x 2 cell to channels (c, dy, dx)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"a {w}x{h} latent is not a multiple of the 2 x 2 patch")
    x = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = x.shape
    z = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, h * 2, w * 2)


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h * w, C]`` tokens, row-major."""
    return x.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``rows`` x ``cols`` token grid."""
    b, n, c = tokens.shape
    if n != rows * cols:
        raise ValueError(f"{n} tokens do not make a {cols}x{rows} token grid")
    return tokens.transpose(1, 2).reshape(b, c, rows, cols)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """FLUX.2 image position ids ``[rows * cols, 4]``: (0, row, col, 0) per token, row-major."""
    ids = torch.zeros(rows, cols, 4, dtype=torch.long)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 4)


def text_ids(length: int) -> torch.Tensor:
    """FLUX.2 text position ids ``[length, 4]``: (0, 0, 0, l), one position per token."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def v_store_bytes(width: int, image_tokens: int, text_tokens: int = MAX_SEQUENCE_LENGTH, bytes_per: int = 2) -> int:
    """Bytes of one block's stored V for one recorded call and one batch row."""
    return (text_tokens + image_tokens) * width * bytes_per
