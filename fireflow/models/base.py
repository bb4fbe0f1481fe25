"""What the editor needs from a model family: encode prompts and images, decode, and a velocity.

Every adapter wraps a diffusers ``FluxTransformer2DModel`` (FLUX.1 itself, or the bundled demo
model), so the feature-reuse processors attach to either unchanged. A new model family is a new
subclass, not an ``if`` in the editor.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image

from fireflow.features import ProcessorInstaller
from fireflow.schedules import flux_timesteps


@dataclass
class Conditioning:
    """Everything the transformer takes besides the latents and the time, for one pass."""

    prompt_embeds: torch.Tensor  # [B, S, D], text token sequence
    pooled_prompt_embeds: torch.Tensor  # [B, P]
    txt_ids: torch.Tensor  # [S, 3]
    img_ids: torch.Tensor  # [L, 3]
    guidance: float | None  # distilled guidance value; None for models without a guidance input


class ModelAdapter(ABC):
    """A concrete model behind the editor. Latents are packed tokens ``[B, L, C]`` in fp32."""

    name: str = "model"
    #: Apply FLUX's resolution-dependent shift to the time grid.
    shift: bool = True
    #: Side of the square image ``generate`` makes when no size is given.
    default_size: int = 1024
    #: Set by :meth:`optimize`: feature-reuse calls then run with compilation switched off.
    compiled: bool = False

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        #: Installs the feature-reuse attention processors while edits run (shared, holds no edit state).
        self.processors = ProcessorInstaller(transformer)

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
            ``"_native_flash"``, ``"flash"``, ...); the feature-reuse processors follow it.
        compile: regional ``torch.compile`` of the repeated double and single blocks (diffusers'
            ``compile_repeated_blocks``): one compiled graph serves all 57 blocks. Calls that record
            or inject features run eager (2 of 18 per edit at the defaults); the rest run compiled.
            ``compile_kwargs`` go to ``torch.compile`` (default ``fullgraph=True``).
        """
        if attention_backend is not None:
            self.transformer.set_attention_backend(attention_backend)
        if compile:
            self.transformer.compile_repeated_blocks(**{"fullgraph": True, **compile_kwargs})
            self.compiled = True

    # ---- text and images -------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(prompt_embeds [B, S, D], pooled_prompt_embeds [B, P])`` on the execution device."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] to packed fp32 latents ``[B, L, C]`` (deterministic)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents to ``[B, 3, H, W]`` in [-1, 1]."""

    @abstractmethod
    def prepare_image(self, image: Image.Image, resize: tuple[int, int] | None = None) -> Image.Image:
        """The model's size policy: crop or resize an RGB image to a size it accepts."""

    @abstractmethod
    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """Positional ids ``[L, 3]`` of the packed image tokens."""

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def seq_len(self, height: int, width: int) -> int:
        return self.image_ids(height, width).shape[0]

    def timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampling grid from 1 to 0 for this model and resolution."""
        return flux_timesteps(num_steps, self.seq_len(height, width), shift=self.shift)

    # ---- the velocity ----------------------------------------------------------------------
    def conditioning(
        self,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        height: int,
        width: int,
        guidance: float | None,
    ) -> Conditioning:
        device, dtype = self.execution_device, self.dtype  # each walks the model's modules: once
        return Conditioning(
            prompt_embeds=prompt_embeds.to(device, dtype),
            pooled_prompt_embeds=pooled_prompt_embeds.to(device, dtype),
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=self.image_ids(height, width).to(device, dtype),
            guidance=guidance if self.transformer.config.guidance_embeds else None,
        )

    def velocity(
        self, latents: torch.Tensor, t: float, cond: Conditioning, attention_kwargs: dict | None = None
    ) -> torch.Tensor:
        """One transformer call. Casts the fp32 state to the model dtype at the boundary;
        the solver casts the result back. The transformer scales ``t`` by 1000 itself.
        ``attention_kwargs`` reach the attention processors (an edit's feature store)."""
        b = latents.shape[0]
        device = latents.device
        # Built on the device from Python floats: a fill kernel, no host-to-device copy or sync.
        timestep = torch.full((b,), t, device=device, dtype=torch.float32)
        guidance = None
        if cond.guidance is not None:
            guidance = torch.full((b,), cond.guidance, device=device, dtype=torch.float32)
        # A call whose processors record or inject features hands them per-call Python state:
        # compiled blocks would guard on it and recompile, so such calls run eager.
        eager = attention_kwargs is not None and self.compiled
        with _eager_mode() if eager else contextlib.nullcontext():
            return self.transformer(
                # The conditioning already has the compute dtype: no per-call parameter lookup.
                hidden_states=latents.to(cond.prompt_embeds.dtype),
                encoder_hidden_states=_batch(cond.prompt_embeds, b),
                pooled_projections=_batch(cond.pooled_prompt_embeds, b),
                timestep=timestep,
                img_ids=cond.img_ids,
                txt_ids=cond.txt_ids,
                guidance=guidance,
                joint_attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]


def _eager_mode() -> contextlib.AbstractContextManager:
    """Run ``torch.compile``d code eagerly for a while (PyTorch >= 2.6)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _group_onload_device(module: torch.nn.Module) -> torch.device | None:
    """The device diffusers' group offloading runs ``module`` on, or None without it."""
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device, _is_group_offload_enabled
    except ImportError:
        return None
    return _get_group_onload_device(module) if _is_group_offload_enabled(module) else None


def _batch(x: torch.Tensor, b: int) -> torch.Tensor:
    """Broadcast a batch-1 conditioning tensor to ``b`` rows (an inversion shared by many edits)."""
    if x.shape[0] == b:
        return x
    if x.shape[0] == 1:
        return x.expand(b, *x.shape[1:])
    raise ValueError(f"conditioning batch {x.shape[0]} does not match latents batch {b}")
