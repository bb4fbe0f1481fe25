"""The public API: invert a real image, edit it with a new prompt, reconstruct it, or generate.

image -> latents -> inversion (source prompt, recording features) -> noise
      -> denoising (target prompt, injecting features) -> latents -> image

Nothing here knows a model family: the adapter (``fireflow/models/<family>/``) supplies the
latent layout, the conditioning, the time grid and the attention processors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from fireflow import solvers
from fireflow.features import FeatureReuse
from fireflow.image import MAX_PIXELS, ImageInput, load_image, to_pil, to_tensor
from fireflow.masks import MaskInput, load_mask
from fireflow.masks import paste_pixels as paste_source_pixels
from fireflow.models.base import Conditioning, Embeds, ModelAdapter
from fireflow.settings import EditSettings, ResolvedSettings, SettingError


@dataclass
class FireFlowOutput:
    """What ``edit``, ``reconstruct``, ``generate`` and ``invert`` return."""

    images: list[Image.Image]  # one per target prompt (empty for ``invert``)
    latents: torch.Tensor  # fp32 latents in the pipeline's layout (the noise for ``invert``)
    nfe: int  # velocity evaluations, inversion included (what the paper counts)
    seconds: float
    settings: dict = field(default_factory=dict)
    source: Image.Image | None = None  # the source image as the model saw it (cropped or resized)
    noise: torch.Tensor | None = None  # the inverted latents, for edits and reconstructions
    reconstruction: Image.Image | None = None  # source prompt, no injection, when asked for
    reconstruction_latents: torch.Tensor | None = None
    #: (denoising step, call kind, block) of every feature injection made, in order.
    injections: list[tuple[int, str, tuple[str, int]]] = field(default_factory=list)
    #: Transformer forward calls, and batch rows through the transformer summed over them
    #: (classifier-free guidance doubles the rows of every call; see the family's docs).
    transformer_calls: int = 0
    transformer_rows: int = 0
    mask: np.ndarray | None = None  # the edit mask at image size (True = edited), when given

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass
class _Cost:
    nfe: int = 0
    calls: int = 0
    rows: int = 0

    def add(self, other: _Cost, times: int = 1) -> None:
        self.nfe += other.nfe * times
        self.calls += other.calls * times
        self.rows += other.rows * times


class FireFlowEditor:
    """FireFlow inversion and editing over a model adapter (any family in ``fireflow.models``).

    The editor holds no per-edit state: every call creates and drops its own, so one editor can
    serve several threads.
    """

    def __init__(self, adapter: ModelAdapter | None = None, *, transformer: torch.nn.Module | None = None):
        if (adapter is None) == (transformer is None):
            raise ValueError("pass exactly one of adapter= or transformer=")
        if adapter is None:
            from fireflow.models import adapter_from_transformer

            adapter = adapter_from_transformer(transformer)  # the latent-level API only
        self.adapter = adapter

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "demo",
        *,
        device: str | torch.device | None = None,
        torch_dtype: str | torch.dtype | None = None,
        offload: str | None = None,
    ) -> FireFlowEditor:
        """``"demo"`` (the bundled model), a local diffusers folder, or a Hub id in the HF cache."""
        from fireflow.models import load_adapter

        return cls(load_adapter(model, device=device, torch_dtype=torch_dtype, offload=offload))

    @classmethod
    def from_pipe(cls, pipe) -> FireFlowEditor:
        """An editor over a diffusers pipeline object you already have (weights shared)."""
        from fireflow.models import adapter_from_pipe

        return cls(adapter_from_pipe(pipe))

    @property
    def transformer(self) -> torch.nn.Module:
        return self.adapter.transformer

    @property
    def model_name(self) -> str:
        return self.adapter.name

    # ---- one pass of the ODE --------------------------------------------------------------------
    def _solve(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        timesteps: torch.Tensor,
        solver: str,
        reuse: FeatureReuse | None = None,
        hook: Callable | None = None,
        progress: bool | str = False,
        callback: solvers.StepCallback | None = None,
        state_hook: solvers.StateHook | None = None,
    ) -> tuple[torch.Tensor, _Cost]:
        cost = _Cost()

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            cost.nfe += 1
            cost.calls += cond.forwards
            cost.rows += x.shape[0] * cond.rows
            # Asked per call: the store hands itself to the processors only when this call uses it.
            kwargs = reuse.attention_kwargs if reuse is not None else None
            return self.adapter.velocity(x, t, cond, kwargs)

        x = solvers.sample(
            velocity,
            latents.float(),
            timesteps,
            solver,
            call_hook=hook,
            callback=callback,
            state_hook=state_hook,
            progress=progress,
        )
        return x, cost

    def _size(self, latents: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
        if height is None or width is None:
            size = self.adapter.size_of(latents)
            if size is None:
                raise ValueError(f"{self.adapter.name} latents need height= and width= (pixels)")
            height, width = size if height is None and width is None else (height or size[0], width or size[1])
        self.adapter.check_latents(latents, height, width)
        return height, width

    def _cond(self, embeds: Mapping[str, Any], height: int, width: int, guidance: float, prefix: str = ""):
        return self.adapter.conditioning(self.adapter.check_embeds(embeds, prefix), height, width, guidance)

    # ---- latent-level API ----------------------------------------------------------------------
    @torch.no_grad()
    def invert_latents(
        self,
        latents: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        num_steps: int = 8,
        guidance: float = 1.0,
        solver: str = "fireflow",
        progress: bool | str = False,
        **embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Image latents (the pipeline's layout) -> the noise they come from (t = 0 -> 1).

        ``embeds``: the family's conditioning by diffusers' names (``prompt_embeds``, ...).
        """
        s = EditSettings(num_steps=num_steps, inject=0, guidance=guidance, solver=solver).check()
        height, width = self._size(latents, height, width)
        cond = self._cond(embeds, height, width, s.guidance)
        ts = self.adapter.timesteps(s.num_steps, height, width).flip(0)
        with self.adapter.running():
            return self._solve(latents, cond, ts, s.solver, progress=progress)[0]

    @torch.no_grad()
    def sample_latents(
        self,
        latents: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        num_steps: int = 8,
        guidance: float | None = None,
        solver: str = "fireflow",
        progress: bool | str = False,
        callback: solvers.StepCallback | None = None,
        **embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Noise (the pipeline's ``latents=`` layout) -> image latents (t = 1 -> 0), no injection.

        With ``solver="euler"`` this is the family's own pipeline with ``output_type="latent"``.
        ``guidance`` defaults to the family's text-to-image guidance.
        """
        g = self.adapter.generate_guidance if guidance is None else guidance
        s = EditSettings(num_steps=num_steps, inject=0, guidance=g, solver=solver).check()
        height, width = self._size(latents, height, width)
        cond = self._cond(embeds, height, width, s.guidance)
        ts = self.adapter.timesteps(s.num_steps, height, width)
        with self.adapter.running():
            return self._solve(latents, cond, ts, s.solver, progress=progress, callback=callback)[0]

    @torch.no_grad()
    def edit_latents(
        self,
        latents: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        mask: torch.Tensor | None = None,
        reconstruction: bool = False,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | FireFlowOutput:
        """Edit latents (the pipeline's layout); returns the edited latents, or with
        ``return_dict=True`` the whole :class:`FireFlowOutput` (NFE, calls, injections, noise).

        Conditioning comes as ``source_<name>`` and ``target_<name>`` for each of the family's
        names (``source_prompt_embeds``, ``target_pooled_prompt_embeds``, ...); every other keyword
        is a setting (see :meth:`edit`). ``mask``: a latent mask from the adapter's ``latent_mask``.
        With one source and ``T`` target rows, one inversion serves ``T`` batched edits.
        """
        source = {k[7:]: v for k, v in kwargs.items() if k.startswith("source_")}
        target = {k[7:]: v for k, v in kwargs.items() if k.startswith("target_")}
        knobs = {k: v for k, v in kwargs.items() if not k.startswith(("source_", "target_"))}
        unknown = sorted(set(knobs) - set(EditSettings.__dataclass_fields__))
        if unknown:
            raise TypeError(f"edit_latents() got an unexpected keyword argument {unknown[0]!r}")
        height, width = self._size(latents, height, width)
        out = self._edit(
            latents,
            height,
            width,
            self.adapter.check_embeds(source, "source_"),
            self.adapter.check_embeds(target, "target_"),
            EditSettings(**knobs),
            mask=mask,
            reconstruction=reconstruction,
            progress=progress,
            callback=callback,
        )
        return out if return_dict else out.latents

    def resolve(self, settings: EditSettings) -> ResolvedSettings:
        """The settings with this model's defaults filled in and blocks checked: what would run."""
        return settings.resolve(self.adapter.defaults, self.adapter.block_counts)

    def _edit(
        self,
        latents: torch.Tensor,
        height: int,
        width: int,
        source: Embeds,
        target: Embeds,
        settings: EditSettings,
        *,
        mask: torch.Tensor | None = None,
        reconstruction: bool = False,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
    ) -> FireFlowOutput:
        start = time.perf_counter()
        s = self.resolve(settings)
        b, t = latents.shape[0], target["prompt_embeds"].shape[0]
        if b != 1 and t != b:
            raise ValueError(f"{t} target prompts for {b} images: give one per image, or one image")
        reuse = FeatureReuse(s.num_steps, s.inject, s.strategy, s.blocks, s.ratios, storage_device=s.feature_device)
        ts = self.adapter.timesteps(s.num_steps, height, width)
        src = self.adapter.conditioning(source, height, width, s.inversion_guidance)
        tgt = self.adapter.conditioning(target, height, width, s.guidance)
        keep, record = _MaskBlend.make(mask, latents, ts)
        cost = _Cost()
        with torch.no_grad(), self.adapter.running(), self.adapter.processors.installed(s.blocks):
            noise, inv = self._solve(
                latents, src, ts.flip(0), s.solver, reuse, reuse.recording, progress and "inversion", None, record
            )
            start_noise = noise.expand(t, *noise.shape[1:]) if b == 1 else noise
            edited, ed = self._solve(
                start_noise, tgt, ts, s.solver, reuse, reuse.injecting, progress and "editing", callback, keep
            )
            cost.add(inv)
            cost.add(ed)
            # NFE per source image: one inversion shared by ``t`` edits, each of which costs a full
            # pass of velocity evaluations (batched into the same transformer calls).
            cost.nfe += ed.nfe * ((t if b == 1 else 1) - 1)
            recon = None
            if reconstruction:
                recon, rec = self._solve(noise, src, ts, s.solver, progress=progress and "reconstruction")
                cost.add(rec)
        return FireFlowOutput(
            [],
            edited,
            cost.nfe,
            time.perf_counter() - start,
            s.to_dict(),
            noise=noise,
            reconstruction_latents=recon,
            injections=reuse.injections,
            transformer_calls=cost.calls,
            transformer_rows=cost.rows,
        )

    # ---- image-level API -----------------------------------------------------------------------
    def _prepare(
        self, image: ImageInput, resize: tuple[int, int] | None, max_pixels: int | None
    ) -> tuple[Image.Image, torch.Tensor, Image.Image]:
        """``(image as the model sees it, its latents, the input as loaded)``."""
        original = load_image(image, max_pixels)
        pil = self.adapter.prepare_image(original, resize)
        return pil, self.adapter.encode_image(to_tensor(pil)), original

    def _prepare_mask(self, mask: np.ndarray, resize: tuple[int, int] | None, size: tuple[int, int]) -> np.ndarray:
        """The input-sized mask through the model's size policy. It goes in as black = edit, so
        that any padding the policy adds (white) is kept, never edited."""
        keep = Image.fromarray(np.where(mask, 0, 255).astype(np.uint8)).convert("RGB")
        prepared = np.asarray(self.adapter.prepare_image(keep, resize).convert("L")) < 128
        if prepared.shape != (size[1], size[0]) or not prepared.any():
            raise ValueError(
                f"the mask does not survive this model's size policy ({size[0]}x{size[1]}): nothing to edit"
            )
        return prepared

    def _decode(self, latents: torch.Tensor, image: Image.Image) -> list[Image.Image]:
        return to_pil(self.adapter.decode(latents, image.height, image.width))

    def _encode_prompts(self, prompts: list[str]) -> Embeds:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        return self.adapter.encode_prompt(prompts)

    @torch.no_grad()
    def edit(
        self,
        image: ImageInput,
        source_prompt: str,
        target_prompt: str | Sequence[str],
        *,
        num_steps: int = 8,
        inject: int = 1,
        guidance: float | None = None,
        inversion_guidance: float = 1.0,
        solver: str = "fireflow",
        strategy: str = "replace_v",
        blocks: Any = "default",
        ratios: tuple[float, float, float] = (1.0, 1.0, 1.0),
        feature_device: str | torch.device | None = None,
        mask: MaskInput | None = None,
        paste_pixels: bool = False,
        reconstruction: bool = False,
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
    ) -> FireFlowOutput:
        """Edit ``image`` from ``source_prompt`` to ``target_prompt`` (or several at once).

        num_steps, inject: steps per pass; features recorded in the last ``inject`` inversion
            steps are reused in the first ``inject`` denoising steps.
        guidance / inversion_guidance: guidance while denoising / inverting (embedded for FLUX.1,
            classifier-free for SD3; ``None``: the family's default).
        solver: "fireflow" (N + 1 NFE per pass), "midpoint" (2N, RF-Solver) or "euler" (N).
        strategy: "replace_v" or any space-separated mix of replace/add of q, k, v.
        blocks: where features are reused: "default" (the family's), "none", "all", "20-37",
            "single:all,double:0-3" (see :mod:`fireflow.settings`).
        ratios: scale of the stored Q, K, V.  feature_device: where features live ("cpu" to save
            accelerator memory; default the model's device).
        mask: the region to edit (white / True), a path, PIL image or array of any size; outside
            it the result keeps the source latents exactly, at no extra model calls.
        paste_pixels: with a mask, also paste the source pixels outside it after decoding (a
            feathered edge inside the mask), so the background is the source's to the bit.
        reconstruction: also sample the inverted noise back with the source prompt (N + 1 NFE).
        resize: (width, height) before the model's own crop or resize.
        """
        settings = EditSettings(
            num_steps=num_steps,
            inject=inject,
            guidance=guidance,
            inversion_guidance=inversion_guidance,
            solver=solver,
            strategy=strategy,
            blocks=blocks,
            ratios=tuple(ratios) if not isinstance(ratios, str) else ratios,
            feature_device=None if feature_device is None else str(feature_device),
        )
        self.resolve(settings)  # every knob checked before any image or text work
        targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
        if not targets:
            raise ValueError("target_prompt is empty; give at least one target prompt")
        if paste_pixels and mask is None:
            raise ValueError("paste_pixels needs a mask: the pixels outside the mask are pasted")
        start = time.perf_counter()
        src_image, latents, original = self._prepare(image, resize, max_pixels)
        pixel_mask = None
        if mask is not None:  # drawn over the input: cropped, padded and resized as the image was
            pixel_mask = self._prepare_mask(load_mask(mask, original.size), resize, src_image.size)
        latent_mask = None
        if pixel_mask is not None:
            latent_mask = self.adapter.latent_mask(pixel_mask, src_image.height, src_image.width).to(latents.device)
        embeds = self._encode_prompts([source_prompt, *targets])
        out = self._edit(
            latents,
            src_image.height,
            src_image.width,
            {k: v[:1] for k, v in embeds.items()},
            {k: v[1:] for k, v in embeds.items()},
            settings,
            mask=latent_mask,
            reconstruction=reconstruction,
            progress=progress,
            callback=callback,
        )
        out.images = self._decode(out.latents, src_image)
        if paste_pixels:
            out.images = [paste_source_pixels(img, src_image, pixel_mask) for img in out.images]
        out.mask = pixel_mask
        if out.reconstruction_latents is not None:
            out.reconstruction = self._decode(out.reconstruction_latents, src_image)[0]
        out.source = src_image
        out.seconds = time.perf_counter() - start
        return out

    def _invert_image(self, image, prompt, settings, resize, max_pixels, progress):
        """Prepare, encode and invert an image; returns what sampling back needs too."""
        s = settings.check()
        src_image, latents, _ = self._prepare(image, resize, max_pixels)
        h, w = src_image.height, src_image.width
        cond = self.adapter.conditioning(self._encode_prompts([prompt]), h, w, s.inversion_guidance)
        ts = self.adapter.timesteps(s.num_steps, h, w)
        with self.adapter.running():
            noise, cost = self._solve(latents, cond, ts.flip(0), s.solver, progress=progress and "inversion")
        return src_image, cond, ts, noise, cost, s

    @torch.no_grad()
    def invert(
        self,
        image: ImageInput,
        prompt: str,
        *,
        num_steps: int = 8,
        guidance: float = 1.0,
        solver: str = "fireflow",
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
    ) -> FireFlowOutput:
        """Invert ``image`` under ``prompt`` to the noise it comes from (``out.latents``)."""
        start = time.perf_counter()
        settings = EditSettings(num_steps=num_steps, inject=0, inversion_guidance=guidance, solver=solver)
        src_image, _, _, noise, cost, s = self._invert_image(image, prompt, settings, resize, max_pixels, progress)
        meta = {"num_steps": s.num_steps, "guidance": s.inversion_guidance, "solver": s.solver}
        return FireFlowOutput(
            [], noise, cost.nfe, time.perf_counter() - start, meta, src_image, noise,
            transformer_calls=cost.calls, transformer_rows=cost.rows,
        )  # fmt: skip

    @torch.no_grad()
    def reconstruct(
        self,
        image: ImageInput,
        prompt: str,
        *,
        num_steps: int = 8,
        guidance: float = 1.0,
        solver: str = "fireflow",
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
    ) -> FireFlowOutput:
        """Invert ``image`` and sample it back with the same prompt and no injection.

        How close the result is to the source measures the inversion alone.
        """
        start = time.perf_counter()
        settings = EditSettings(num_steps=num_steps, inject=0, inversion_guidance=guidance, solver=solver)
        src_image, cond, ts, noise, cost, s = self._invert_image(image, prompt, settings, resize, max_pixels, progress)
        with self.adapter.running():
            latents, back = self._solve(noise, cond, ts, s.solver, progress=progress and "sampling")
        cost.add(back)
        meta = {"num_steps": s.num_steps, "guidance": s.inversion_guidance, "solver": s.solver}
        return FireFlowOutput(
            self._decode(latents, src_image), latents, cost.nfe, time.perf_counter() - start, meta, src_image,
            noise, transformer_calls=cost.calls, transformer_rows=cost.rows,
        )  # fmt: skip

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_steps: int = 8,
        guidance: float | None = None,
        solver: str = "fireflow",
        seed: int | None = 0,
        latents: torch.Tensor | None = None,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
    ) -> FireFlowOutput:
        """Text-to-image with any solver. ``seed`` draws the noise on the CPU, so it is the same
        on every device; or pass ``latents`` (noise in the pipeline's layout)."""
        start = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        g = self.adapter.generate_guidance if guidance is None else guidance
        s = EditSettings(num_steps=num_steps, inject=0, guidance=g, solver=solver).check()
        height = self.adapter.default_size if height is None else height
        width = self.adapter.default_size if width is None else width
        self.adapter.check_size(height, width)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise SettingError("seed", f"{{name}} must be a whole number >= 0, got {seed!r}")
        cond = self.adapter.conditioning(self._encode_prompts(prompts), height, width, s.guidance)
        if latents is None:
            shape = (len(prompts), *self.adapter.latent_shape(height, width))
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            latents = torch.randn(shape, generator=gen, dtype=torch.float32)
        self.adapter.check_latents(latents, height, width)
        latents = latents.to(self.adapter.execution_device, torch.float32)
        ts = self.adapter.timesteps(s.num_steps, height, width)
        with self.adapter.running():
            x, cost = self._solve(latents, cond, ts, s.solver, progress=progress and "generating", callback=callback)
        meta = {"num_steps": s.num_steps, "guidance": s.guidance, "solver": s.solver, "seed": seed}
        return FireFlowOutput(
            to_pil(self.adapter.decode(x, height, width)), x, cost.nfe, time.perf_counter() - start, meta,
            transformer_calls=cost.calls, transformer_rows=cost.rows,
        )  # fmt: skip


class _MaskBlend:
    """A masked edit: the inversion's states on the grid, and the blend back into them.

    After every denoising step, tokens outside the mask are set to the inversion's state at the
    same grid time; the last step therefore ends on the exact source latents there. Zero extra
    model calls; ``N + 1`` stored latents.
    """

    def __init__(self, mask: torch.Tensor, latents: torch.Tensor, ts: torch.Tensor):
        self.keep = mask.to(latents.device) > 0.5  # True: edited
        self.n = len(ts) - 1
        self.states: dict[int, torch.Tensor] = {self.n: latents.float()}  # grid index -> state

    @classmethod
    def make(cls, mask, latents, ts):
        if mask is None:
            return None, None
        blend = cls(mask, latents, ts)
        return blend.blend, blend.record

    def record(self, step: int, t_end: float, x: torch.Tensor) -> torch.Tensor:
        # Inversion runs the grid backwards: its step i ends at grid index N - 1 - i.
        self.states[self.n - 1 - step] = x
        return x

    def blend(self, step: int, t_end: float, x: torch.Tensor) -> torch.Tensor:
        src = self.states[step + 1]  # denoising step i ends at grid index i + 1
        return torch.where(self.keep, x, src.expand_as(x))
