"""Wan 2.1 / 2.2 video models through diffusers' ``WanPipeline`` (the "context" route).

One adapter serves three variants, told apart by the pipeline's components and config, never by a
folder name: Wan 2.1 T2V (1.3B, 14B: one transformer), Wan 2.2 A14B (``transformer`` and
``transformer_2``, switched by the config's ``boundary_ratio``) and Wan 2.2 TI2V-5B
(``expand_timesteps``: a timestep per video token, a 48-channel latent with a 16x spatial VAE).

Latents are ``[B, C, F_lat, H/8, W/8]`` (``H/16`` for TI2V), fp32, normalised as the pipeline's
``output_type="latent"`` returns them: ``(z - latents_mean) / latents_std`` from the VAE config.
``F_lat = (F - 1) // 4 + 1``: the first latent frame is video frame 0, each later one covers 4.

**Frames.** Wan takes ``4k + 1`` frames. Another count is refused with the two nearest accepted
counts named (``prepare_frames``), not trimmed: a silently shortened clip would be a surprise
(the front ends' ``--max-frames`` trims on request).

**Time grid.** The pipeline's own scheduler decides. The Wan folders ship
``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)``: its sigmas,
``warp(linspace(1, 1/1000, N + 1)[:-1])`` plus a terminal 0 (warp = ``s x / (1 + (s - 1) x)``),
computed by that scheduler class from the config. With a ``FlowMatchEulerDiscreteScheduler(shift=s)``
swapped in, ``WanPipeline`` runs ``set_timesteps(N)`` on a 1000-step table that is already warped,
so the shift is applied twice (4 steps: 1, .85769, .60215, .00893, 0): this grid is matched
exactly, since that is what the pipeline runs. The transformer receives ``sigma x 1000`` unrounded
(the UniPC pipeline feeds integer timesteps, 999, 900, ...; it is not an Euler loop anyway).

**Guidance.** True CFG ``uncond + g (cond - uncond)`` as two forwards (the pipeline's order: the
prompt, then the negative prompt), when ``guidance > 1``; it needs ``negative_prompt_embeds``.

**Wan 2.2 experts.** Each velocity evaluation uses the expert the pipeline would use at its time:
``transformer`` while ``t x 1000 >= boundary_ratio x num_train_timesteps``, else ``transformer_2``.
Guidance: ``guidance`` for both experts; the pipeline's ``guidance_scale_2`` only where the
pipeline's config carries one (the settings table has one guidance knob). FireFlow reuses the
previous step's midpoint velocity as the next step's start velocity: when a midpoint lies above the
boundary and the next grid point below it, that start velocity comes from the high-noise expert
although the pipeline would ask the low-noise one there. Nothing is re-evaluated: a pass still
makes ``N + 1`` evaluations, and the reuse is the same approximation FireFlow makes everywhere
(the velocity at ``t_mid`` standing for the one at ``t_next``), across one switch. Features recorded
by an expert are injected into the same expert (inversion and sampling evaluate at the same times);
both experts share the block ids ``("attn1", i)``.

Defaults, and why (no published FireFlow setting for Wan; none measured on real weights):

* inversion guidance 1 (one forward per evaluation; guided inversion breaks reconstruction on the
  image families too);
* editing guidance 3: below Wan's text-to-video 5 (``generate`` uses 5), as image editors keep CFG
  low to keep structure (SD3: 2, DNAEdit 3.5; Wan 2.2 A14B itself uses 4 and 3);
* V replaced in the self-attention ``attn1`` of every block, in the first step. The
  cross-attention ``attn2`` (``--blocks attn2:all``) is not touched by default: its K and V come
  from the text, so replacing V there brings back the SOURCE prompt's values and undoes the edit.
  Measured on the tiny random Wan 2.1 model (8 steps, UniPC grid, relative distances): the plain
  target edit lies 0.175 from the source latents; ``attn2:all`` with inject 3 pulls it back to
  0.142 (0.039 from the plain edit), ``attn1:all`` leaves it at 0.175 (0.003 from the plain edit;
  random weights carry no structure for V to keep). Wan 2.2 and TI2V: the same direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fireflow.features import BlockId, in_call, quiet_in_calls
from fireflow.models._pipeline import PipelineAdapter, scheduler_sigmas
from fireflow.models.base import Conditioning, Embeds, Geometry, batch_to, crop_to_multiple, grid_mask
from fireflow.models.wan.processors import WanFeatureProcessor, wan_layers

#: What the Wan 2.1 folders ship (flow_shift 3 for 480p; the 14B at 720p uses 5).
WAN_SCHEDULER: dict[str, Any] = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}


@dataclass
class WanConditioning(Conditioning):
    prompt_embeds: torch.Tensor | None = None  # [B, 512 (226 by default) UMT5 tokens, 4096]
    negative_prompt_embeds: torch.Tensor | None = None
    guidance: float = 1.0  # CFG scale of ``transformer``; CFG runs when it is > 1
    guidance_2: float = 1.0  # of ``transformer_2`` (Wan 2.2 A14B)


class WanAdapter(PipelineAdapter):
    """Wan 2.1 / 2.2 (one or two experts, TI2V) as the editor's model."""

    name: ClassVar[str] = "wan"
    pipelines: ClassVar[tuple[str, ...]] = ("WanPipeline",)
    transformers: ClassVar[tuple[str, ...]] = ("WanTransformer3DModel",)
    route: ClassVar[str] = "context"
    video: ClassVar[bool] = True
    embed_names: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_prompt_embeds")
    guidance_kind: ClassVar[str] = "cfg"
    DEFAULTS: ClassVar[dict[str, Any]] = {"guidance": 3.0, "blocks": "attn1:all"}
    generate_guidance: ClassVar[float] = 5.0  # WanPipeline's default
    reference_scheduler: ClassVar[dict[str, Any]] = WAN_SCHEDULER

    def __init__(self, transformer: torch.nn.Module, pipe=None, scheduler: dict | None = None, transformer_2=None):
        if transformer is None:
            raise ValueError("this Wan pipeline has no `transformer`: fireflow needs the high-noise expert")
        if transformer_2 is None and pipe is not None:
            transformer_2 = getattr(pipe, "transformer_2", None)
        ratio = pipe.config.get("boundary_ratio") if pipe is not None else None
        if transformer_2 is not None and ratio is None:
            transformer_2 = None  # the pipeline never calls it without a boundary
        if ratio is not None and transformer_2 is None:
            raise ValueError(f"boundary_ratio {ratio} but no transformer_2: this Wan 2.2 pipeline lacks an expert")
        if transformer_2 is None:
            layers = wan_layers(transformer)
            models: Any = transformer
        else:
            if transformer_2.config.num_layers != transformer.config.num_layers:
                raise ValueError("Wan experts with different block counts are not supported")
            layers = {**wan_layers(transformer, "0."), **wan_layers(transformer_2, "1.")}
            models = [transformer, transformer_2]
        super().__init__(models, layers, pipe, scheduler)
        cfg = transformer.config
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False)) if pipe is not None else False
        vae = getattr(pipe, "vae", None)
        # WanPipeline's own factors (vae_scale_factor_spatial / _temporal); a bare transformer:
        # 16x for the 48-channel TI2V latent, 8x otherwise.
        spatial = getattr(pipe, "vae_scale_factor_spatial", 0)
        self.vae_scale_factor = int(spatial or (16 if cfg.in_channels == 48 else 8))
        self.vae_scale_factor_temporal = int(getattr(pipe, "vae_scale_factor_temporal", 0) or 4)
        self.patch = tuple(cfg.patch_size)
        self.multiple = self.vae_scale_factor * self.patch[1]
        self.boundary = None if ratio is None else ratio * self.scheduler_config.get("num_train_timesteps", 1000)
        #: ``guidance_scale_2`` where the pipeline's config carries one (else ``guidance``).
        self.guidance_2 = pipe.config.get("guidance_scale_2") if pipe is not None and self.boundary else None
        self.default_size = 480  # WanPipeline's default 480 x 832, 81 frames
        self.has_vae = vae is not None

    @property
    def model_name(self) -> str:
        if self.expand_timesteps:
            return "wan-ti2v"
        return "wan2.2" if len(self.models) == 2 else "wan2.1"

    def make_processor(self, block: BlockId, current: object) -> WanFeatureProcessor:
        return WanFeatureProcessor(
            block, getattr(current, "_attention_backend", None), getattr(current, "_parallel_config", None)
        )

    # ---- sizes -------------------------------------------------------------------------------
    def check_geometry(self, geometry: Geometry) -> None:
        m = self.multiple
        for name, side in (("height", geometry.height), ("width", geometry.width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < m or side % m:
                raise ValueError(f"{name} {side!r} is not accepted; this model takes multiples of {m} (>= {m})")
        self.prepare_frames(geometry.frames)

    def default_geometry(self, height: int | None = None, width: int | None = None, frames: int | None = None):
        return Geometry(480 if height is None else height, 832 if width is None else width, frames or 81)

    def prepare_frames(self, frames: int) -> int:
        """Wan takes ``4k + 1`` frames (1, 5, 9, ..., 81); another count is refused, naming the
        nearest accepted ones."""
        t = self.vae_scale_factor_temporal
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"{frames!r} frames: Wan takes {t}k + 1 frames (1, 5, 9, ..., 81)")
        if (frames - 1) % t:
            lo = (frames - 1) // t * t + 1
            raise ValueError(
                f"{frames} frames: Wan takes {t}k + 1 frames; give {lo} or {lo + t} (e.g. the first {lo} frames)"
            )
        return frames

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.vae_scale_factor_temporal + 1

    def latent_shape(self, geometry: Geometry) -> tuple[int, int, int, int]:
        s = self.vae_scale_factor
        c = self.transformer.config.in_channels
        return (c, self.latent_frames(geometry.frames), geometry.height // s, geometry.width // s)

    def geometry_of(self, latents: torch.Tensor) -> Geometry | None:
        if latents.dim() != 5:
            return None
        s, t = self.vae_scale_factor, self.vae_scale_factor_temporal
        return Geometry(latents.shape[-2] * s, latents.shape[-1] * s, (latents.shape[2] - 1) * t + 1)

    def latent_mask(self, mask: np.ndarray, geometry: Geometry) -> torch.Tensor:
        """``[1, F_lat, h, w]`` (a still mask: ``[1, 1, h, w]``): latent frame 0 covers video
        frame 0, latent frame j > 0 video frames ``4j - 3 .. 4j``; a cell is edited if any of its
        pixels is, in any frame it covers."""
        m = np.asarray(mask, dtype=bool)
        if m.ndim == 2:
            m = m[None]
        s, t = self.vae_scale_factor, self.vae_scale_factor_temporal
        rows, cols = geometry.height // s, geometry.width // s
        if m.shape[0] == 1:
            return grid_mask(m[0], rows, cols)[None, None]
        if m.shape[0] != geometry.frames:
            raise ValueError(f"{m.shape[0]} mask frames for {geometry.frames} frames: give 1 or {geometry.frames}")
        groups = [m[:1]] + [m[1 + t * (j - 1) : 1 + t * j] for j in range(1, self.latent_frames(geometry.frames))]
        return torch.stack([grid_mask(g.any(axis=0), rows, cols) for g in groups])[None]

    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """Resize if asked, then crop top-left to a multiple of VAE factor x patch (16; TI2V 32)."""
        return crop_to_multiple(image, self.multiple, resize)

    # ---- text and video ------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's UMT5 encoding, with the empty negative prompt (WanPipeline's default)."""
        pipe = self.need_pipe("text encoder", "text_encoder")
        pe, ne = pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=[""] * len(prompts),
            do_classifier_free_guidance=True,
            device=self.execution_device,
        )
        return {"prompt_embeds": pe, "negative_prompt_embeds": ne}

    def _norm(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, F, 3, H, W]`` -> the posterior mean, normalised ``(z - mean) / std``."""
        vae = self.need_pipe("VAE", "vae").vae
        x = pixels.permute(0, 2, 1, 3, 4).to(self.execution_device, vae.dtype)  # [B, 3, F, H, W]
        z = vae.encode(x).latent_dist.mean.float()
        mean, std = self._norm(vae, z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        vae = self.need_pipe("VAE", "vae").vae
        z = latents.to(self.execution_device, torch.float32)
        mean, std = self._norm(vae, z)
        video = vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)
        return video.permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """The sigmas the pipeline's scheduler makes for ``set_timesteps(N)`` (see the module
        docstring: UniPC's flow sigmas, or a swapped-in flow-match Euler's twice-shifted grid)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        cfg = self.scheduler_config
        if self.pipe is not None:
            cls = type(self.pipe.scheduler)
        else:
            cls = UniPCMultistepScheduler if cfg.get("use_flow_sigmas") else FlowMatchEulerDiscreteScheduler
        if issubclass(cls, FlowMatchEulerDiscreteScheduler):
            return scheduler_sigmas(cfg, num_inference_steps=num_steps)
        quiet_in_calls("diffusers.configuration_utils", "config-keys", lambda r: "are not expected" in r.getMessage())
        with in_call():
            scheduler = cls.from_config(dict(cfg))
        scheduler.set_timesteps(num_steps)
        sigmas = scheduler.sigmas.to(torch.float64)
        if len(sigmas) != num_steps + 1 or sigmas[0] < sigmas[-1]:
            raise ValueError(f"{cls.__name__} gives no flow-matching grid from 1 to 0; use flow sigmas")
        return sigmas

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> WanConditioning:
        device, dtype = self.execution_device, self.dtype
        cfg = guidance > 1
        if cfg and embeds.get("negative_prompt_embeds") is None:
            raise ValueError(
                f"guidance {guidance:g} > 1 is classifier-free guidance on Wan: it needs negative_prompt_embeds "
                "(or guidance 1)"
            )
        neg = embeds.get("negative_prompt_embeds")
        g2 = self.guidance_2 if self.guidance_2 is not None else guidance
        return WanConditioning(
            forwards=2 if cfg else 1,
            rows=2 if cfg else 1,
            prompt_embeds=embeds["prompt_embeds"].to(device, dtype),
            negative_prompt_embeds=neg.to(device, dtype) if cfg else None,
            guidance=guidance,
            guidance_2=g2,
        )

    def expert(self, t: float) -> int:
        """Which transformer the pipeline calls at ``t`` (0: ``transformer``, 1: ``transformer_2``)."""
        timestep = torch.tensor(t * 1000.0, dtype=torch.float32).item()
        return 0 if self.boundary is None or timestep >= self.boundary else 1

    def velocity(
        self, latents: torch.Tensor, t: float, cond: WanConditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Two forwards under CFG (prompt, then negative prompt), on the expert for ``t``; the
        timestep is ``sigma x 1000``, one per video token under ``expand_timesteps`` (TI2V)."""
        index = self.expert(t)
        model, g = self.models[index], (cond.guidance, cond.guidance_2)[index]
        b = latents.shape[0]
        x = latents.to(cond.prompt_embeds.dtype)
        timestep = torch.full((b,), t * 1000.0, device=x.device, dtype=torch.float32)
        if self.expand_timesteps:
            _, p_h, p_w = self.patch
            tokens = x.shape[2] * (x.shape[3] // p_h) * (x.shape[4] // p_w)
            timestep = timestep[:, None].expand(b, tokens)
        kw = dict(hidden_states=x, timestep=timestep, attention_kwargs=attention_kwargs, return_dict=False)
        out = model(encoder_hidden_states=batch_to(cond.prompt_embeds, b), **kw)[0]
        if cond.negative_prompt_embeds is not None:
            uncond = model(encoder_hidden_states=batch_to(cond.negative_prompt_embeds, b), **kw)[0]
            out = uncond + g * (out - uncond)
        return out
