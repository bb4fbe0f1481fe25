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
from fireflow.models._pipeline import (
    PipelineAdapter,
    quiet_truncation,
    scheduler_sigmas,
)
from fireflow.models.base import Conditioning, Embeds, batch_to, grid_mask
from fireflow.models.flux2.processors import PROCESSORS, Bounded, flux2_layers

PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")

#: FLUX.2's scheduler config, for a bare transformer that comes without a pipeline.
FLUX2_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

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
    attention_logger: ClassVar[str | None] = "diffusers.models.transformers.transformer_flux2"

    pipelines: ClassVar[tuple[str, ...]] = PIPELINES
    reference_scheduler: ClassVar[dict] = FLUX2_SCHEDULER

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None):
        super().__init__(transformer, flux2_layers(transformer), pipe, scheduler)
        #: Pixels per token side: the VAE's downsampling times the 2 x 2 patchify.
        self.multiple = self.vae_scale_factor * 2
        self.default_size = getattr(pipe, "default_sample_size", 128) * self.vae_scale_factor
        klein = type(pipe).__name__ == "Flux2KleinPipeline"
        # Only the pipeline's config says distilled; a bare transformer gets [klein] base's CFG, which
        # runs only with guidance > 1 and negative_prompt_embeds.
        distilled = klein and bool(pipe.config.get("is_distilled", False))
        #: A few-step model: warn once when an inversion runs on it.
        self.few_step = distilled
        self._warned = False
        if transformer.config.guidance_embeds:
            self.name, self.guidance_kind, self.embed_names = "flux2-dev", "embedded", ("prompt_embeds",)
            self.generate_guidance = 4.0  # Flux2Pipeline's default
            self.defaults = {"guidance": 2.0, "blocks": "single:all"}
        elif not distilled and (klein or pipe is None):  # [klein] base, or a bare transformer
            self.name, self.guidance_kind = "flux2-klein", "cfg"
            self.embed_names = ("prompt_embeds", "negative_prompt_embeds")
            self.generate_guidance = 4.0  # Flux2KleinPipeline's default
            self.defaults = {"guidance": 2.0, "blocks": "single:all"}
        else:
            self.name = "flux2-klein-distilled" if distilled else "flux2"
            self.guidance_kind, self.embed_names = "none", ("prompt_embeds",)
            self.generate_guidance = 1.0
            self.defaults = {"guidance": 1.0, "blocks": "single:all"}

    # ---- attention -------------------------------------------------------------------------
    def make_processor(self, block: BlockId, current: object) -> object:
        proc = PROCESSORS[block[0]](block)
        proc._attention_backend = getattr(current, "_attention_backend", None)
        proc._parallel_config = getattr(current, "_parallel_config", None)
        return proc

    # ---- sizes and latents -------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        return ((height // self.multiple) * (width // self.multiple), self.transformer.config.in_channels)

    def latent_mask(self, mask: np.ndarray, height: int, width: int) -> torch.Tensor:
        f = self.multiple // 2  # pixels per VAE latent cell; a token is 2 x 2 cells
        cells = grid_mask(mask, height // f, width // f)
        c = self.transformer.config.in_channels // 4
        return pack(patchify(cells[None, None].expand(1, c, *cells.shape)))[0]  # [L, 4C] like the tokens

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of 16, as for FLUX.1."""
        if resize is not None:
            image = image.resize(resize, Image.Resampling.LANCZOS)
        w, h = image.size
        m = self.multiple
        if w < m or h < m:
            raise ValueError(f"image {w}x{h} is smaller than the model's minimum {m}x{m}")
        return image.crop((0, 0, w - w % m, h - h % m))

    def _pipe(self, what: str):
        if self.pipe is None or (what == "vae" and getattr(self.pipe, "vae", None) is None):
            raise RuntimeError(f"this editor has no {what}: use the *_latents methods with embeddings")
        return self.pipe

    def _bn(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's BatchNorm running mean and std over the 128 patchified channels, fp32."""
        vae = self._pipe("vae").vae
        mean = vae.bn.running_mean.float().to(device)
        std = torch.sqrt(vae.bn.running_var.float().to(device) + vae.config.batch_norm_eps)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self._pipe("vae").vae
        z = vae.encode(pixels.to(self.execution_device, vae.dtype)).latent_dist.mode()  # deterministic
        tokens = pack(patchify(z.float()))
        mean, std = self._bn(tokens.device)
        return (tokens - mean) / std

    def vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed, normalised tokens -> the VAE's own latents ``[B, 32, H/8, W/8]``: what
        ``Flux2KleinPipeline(output_type="latent")`` returns."""
        mean, std = self._bn(latents.device)
        tokens = latents.float() * std + mean
        return unpatchify(unpack(tokens, height // self.multiple, width // self.multiple))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self._pipe("vae").vae
        z = self.vae_latents(latents, height, width)
        return vae.decode(z.to(vae.dtype)).sample.float()

    # ---- text ----------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's own encoding (Mistral-3 for [dev], Qwen3 for [klein]); [klein] base adds
        the empty negative prompt, the only one its pipeline uses."""
        pipe = self._pipe("text encoder")
        device = self.execution_device
        with quiet_truncation():
            embeds, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
            out = {"prompt_embeds": embeds}
            if self.guidance_kind == "cfg":
                negative, _ = pipe.encode_prompt([""], device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
                out["negative_prompt_embeds"] = negative.expand(len(prompts), *negative.shape[1:])
        return out

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The FLUX.2 pipelines' grid: ``sigmas = linspace(1, 1/N, N)`` shifted with
        ``mu = empirical_mu(L, N)`` by the scheduler the config describes (which may ignore mu,
        or make its own sigmas where it has ``use_flow_sigmas``)."""
        cfg = self.scheduler_config
        mu = empirical_mu((height // self.multiple) * (width // self.multiple), num_steps)
        if cfg.get("use_flow_sigmas"):
            return scheduler_sigmas(cfg, num_inference_steps=num_steps, mu=mu)
        return scheduler_sigmas(cfg, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def conditioning(self, embeds: Embeds, height: int, width: int, guidance: float) -> Flux2Conditioning:
        device, dtype = self.execution_device, self.dtype
        prompt_embeds = embeds["prompt_embeds"].to(device, dtype)
        img_ids = image_ids(height // self.multiple, width // self.multiple).to(device)
        cond = Flux2Conditioning(
            height,
            width,
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
        with self.eager_if(attention_kwargs):
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
