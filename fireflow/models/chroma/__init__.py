"""Chroma through diffusers' ``ChromaPipeline``: FLUX.1's latent layout and attention, T5 text
with an attention mask, no guidance input, true classifier-free guidance.

Chroma is derived from FLUX.1-schnell: the same ``FluxAttention`` layers (double blocks over
[text, image] with RoPE after the concatenation, single blocks over ``cat([text, image])``), the
same 2x2 packing into 64-channel tokens, the same ids and VAE normalisation. So this adapter is
:class:`~fireflow.models.flux.FluxAdapter` with FLUX.1's feature processor, and three differences
that follow ``ChromaPipeline.__call__`` exactly:

* the text comes with a mask (T5 padding masked out but for the first pad token); the pipeline
  extends it with ones over the image tokens (``cat([text_mask, ones(B, L_img)])``; a float text
  mask keeps the joint mask float) and each block turns it into the ``[B, 1, S, S]`` outer
  product that reaches attention as given (an additive 0/1 float mask, as diffusers does it);
* the transformer has no guidance input, and the modulation comes from the timestep alone;
* guidance above 1 is true CFG, ``neg + g * (cond - neg)``, as two separate forwards with each
  prompt's own mask. The negative forward runs first, so that a guided inversion leaves the
  positive prompt's features in the store (the last writer wins); the sum is the same.

Defaults, and why (nothing is measured on real Chroma weights yet):

* inversion guidance 1 (the settings' default): one forward per call, and inverting under CFG is
  known to break reconstruction on CFG models (the SD3 editors' reports);
* editing guidance 2: the value FTEdit uses for true CFG on SD3.5 and this package uses on the
  other CFG families; low enough to keep the source's structure. The pipeline's text-to-image
  default (5) is what ``generate`` uses;
* V replaced in all single blocks (``single:all``), the paper's FLUX.1 setting: Chroma keeps
  FLUX.1's block structure (19 double, 38 single blocks in Chroma1-HD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fireflow.models._pipeline import scheduler_sigmas, shift_mu
from fireflow.models.base import Conditioning, Embeds, Geometry, batch_to
from fireflow.models.flux import FLUX_DEV_SCHEDULER, FluxAdapter

#: The T5 sequence length ``ChromaPipeline`` pads every prompt to (its default).
MAX_SEQUENCE_LENGTH = 512


@dataclass
class ChromaConditioning(Conditioning):
    prompt_embeds: torch.Tensor | None = None  # [B, S, D] T5 tokens
    attention_mask: torch.Tensor | None = None  # [B, S + L] text mask then ones over the image
    negative_prompt_embeds: torch.Tensor | None = None  # only under CFG
    negative_attention_mask: torch.Tensor | None = None
    txt_ids: torch.Tensor | None = None  # [S, 3] zeros
    negative_txt_ids: torch.Tensor | None = None
    img_ids: torch.Tensor | None = None  # [L, 3]
    cfg: float = 1.0  # CFG scale; CFG runs when it is > 1, as in the pipeline


class ChromaAdapter(FluxAdapter):
    """Chroma (any diffusers ``ChromaPipeline``) as the editor's model. Latents are packed tokens
    ``[B, L, 64]``, as ``ChromaPipeline(latents=...)`` takes them and ``output_type="latent"``
    returns them."""

    name: ClassVar[str] = "chroma"
    pipelines: ClassVar[tuple[str, ...]] = ("ChromaPipeline",)
    transformers: ClassVar[tuple[str, ...]] = ("ChromaTransformer2DModel",)
    embed_names: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
    )
    guidance_kind: ClassVar[str] = "cfg"
    DEFAULTS: ClassVar[dict[str, Any]] = {"guidance": 2.0, "blocks": "single:all"}
    generate_guidance: ClassVar[float] = 5.0  # ChromaPipeline's default guidance_scale
    # The FluxAttention layers warn about unused kwargs from diffusers' FLUX transformer module.
    attention_logger: ClassVar[str | None] = "diffusers.models.transformers.transformer_flux"
    #: Assumed (not checked against Chroma1-HD's files): FLUX.1-dev's dynamic-shift config.
    reference_scheduler: ClassVar[dict[str, Any]] = FLUX_DEV_SCHEDULER

    @classmethod
    def variant(cls, transformer: torch.nn.Module, pipe=None) -> type[ChromaAdapter]:
        return cls

    # ---- text ----------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> Embeds:
        """The pipeline's own encoding (T5 with its mask), with the empty negative prompt."""
        pipe = self.need_pipe("text encoder")
        pe, _, pm, npe, _, npm = pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=[""] * len(prompts),
            device=self.execution_device,
            do_classifier_free_guidance=True,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return {
            "prompt_embeds": pe,
            "prompt_attention_mask": pm,
            "negative_prompt_embeds": npe,
            "negative_prompt_attention_mask": npm,
        }

    # ---- time and the velocity -----------------------------------------------------------------
    def timesteps(self, num_steps: int, geometry: Geometry) -> torch.Tensor:
        """``ChromaPipeline``'s grid: ``sigmas = linspace(1, 1/N, N)`` shifted by ``mu(L)`` with
        the scheduler config's constants (a static ``shift`` where dynamic shifting is off)."""
        cfg = self.scheduler_config
        mu = shift_mu(self.tokens(geometry), cfg)
        return scheduler_sigmas(cfg, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def conditioning(self, embeds: Embeds, geometry: Geometry, guidance: float) -> ChromaConditioning:
        device, dtype = self.execution_device, self.dtype
        img_ids = self.image_ids(geometry).to(device, dtype)
        tokens = img_ids.shape[0]

        def text(prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, mask = embeds.get(f"{prefix}prompt_embeds"), embeds.get(f"{prefix}prompt_attention_mask")
            if mask is None:
                raise ValueError(
                    f"Chroma needs {prefix}prompt_attention_mask with {prefix}prompt_embeds "
                    "(the pipeline's encode_prompt returns both; 1 for the tokens attended to)"
                )
            if mask.shape != x.shape[:2]:
                raise ValueError(
                    f"{prefix}prompt_attention_mask of shape {tuple(mask.shape)} does not fit {prefix}prompt_embeds "
                    f"of shape {tuple(x.shape)}"
                )
            x = x.to(device, dtype)
            # As ChromaPipeline._prepare_attention_mask: the text mask, then ones (bool) over the
            # image tokens; torch.cat promotes to the text mask's dtype. A float mask is cast to
            # the model dtype (the pipeline's comes in the text encoder's, normally the same).
            mask = mask.to(device, mask.dtype if mask.dtype == torch.bool else dtype)
            ones = torch.ones(mask.shape[0], tokens, device=device, dtype=torch.bool)
            ids = torch.zeros(x.shape[1], 3, device=device, dtype=dtype)
            return x, torch.cat([mask, ones], dim=1), ids

        pe, mask, txt_ids = text("")
        cond = ChromaConditioning(prompt_embeds=pe, attention_mask=mask, txt_ids=txt_ids, img_ids=img_ids)
        if guidance > 1:  # as the pipeline: CFG only above 1
            if embeds.get("negative_prompt_embeds") is None:
                raise ValueError(
                    f"guidance {guidance:g} > 1 is classifier-free guidance on Chroma: it needs negative_prompt_embeds "
                    "and negative_prompt_attention_mask (the empty prompt's), or guidance 1"
                )
            cond.negative_prompt_embeds, cond.negative_attention_mask, cond.negative_txt_ids = text("negative_")
            cond.cfg = guidance
            cond.forwards, cond.rows = 2, 2
        return cond

    def velocity(
        self, latents: torch.Tensor, t: float, cond: ChromaConditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One forward, or two under CFG (negative first, then the prompt), as the pipeline
        calls them. The transformer scales ``t`` by 1000 itself."""
        x = latents.to(cond.prompt_embeds.dtype)
        positive = cond.prompt_embeds, cond.attention_mask, cond.txt_ids
        if cond.negative_prompt_embeds is None:
            return self._forward(x, t, *positive, cond.img_ids, attention_kwargs)
        negative = cond.negative_prompt_embeds, cond.negative_attention_mask, cond.negative_txt_ids
        if attention_kwargs is not None and negative[0].shape[1] != positive[0].shape[1]:
            # The store's text part has the source prompt's length.
            raise ValueError(
                f"negative_prompt_embeds of {negative[0].shape[1]} tokens and prompt_embeds of "
                f"{positive[0].shape[1]} cannot share the inversion's features; give both the same length "
                f"(the pipeline pads to {MAX_SEQUENCE_LENGTH})"
            )
        uncond = self._forward(x, t, *negative, cond.img_ids, attention_kwargs)
        out = self._forward(x, t, *positive, cond.img_ids, attention_kwargs)
        return uncond + cond.cfg * (out - uncond)

    def _forward(self, x, t: float, text, mask, txt_ids, img_ids, attention_kwargs) -> torch.Tensor:
        b = x.shape[0]
        # Built on the device from a Python float: a fill kernel, no host-to-device copy or sync.
        timestep = torch.full((b,), t, device=x.device, dtype=torch.float32)
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=batch_to(text, b),
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            attention_mask=batch_to(mask, b),
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
