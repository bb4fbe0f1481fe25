"""The public API: invert a real image, edit it with a new prompt, reconstruct it, or generate.

image -> latents -> inversion (source prompt, recording features) -> noise
      -> denoising (target prompt, injecting features) -> latents -> image
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from fireflow import solvers
from fireflow.features import FeatureReuse, parse_strategy
from fireflow.image import MAX_PIXELS, ImageInput, load_image, to_pil, to_tensor
from fireflow.models.base import Conditioning, ModelAdapter
from fireflow.models.flux import grid_ids

Blocks = str | Iterable[int] | None


@dataclass(frozen=True)
class EditSettings:
    """The knobs of one edit, with the paper's defaults (METHOD.md §5)."""

    num_steps: int = 8
    inject: int = 1
    guidance: float = 2.0
    inversion_guidance: float = 1.0
    solver: str = "fireflow"
    strategy: str = "replace_v"
    blocks: tuple[int, ...] | None = None  # single-stream blocks; None: all of them
    double_blocks: tuple[int, ...] = ()  # double-stream blocks (an extension of the method)
    ratios: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Q, K, V scale at record time

    def validate(self, transformer: torch.nn.Module) -> EditSettings:
        """Check every knob against the model; return the settings with ``blocks`` filled in."""
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        if not 0 <= self.inject <= self.num_steps:
            raise ValueError(f"inject must be between 0 and num_steps={self.num_steps}, got {self.inject}")
        solvers.check_solver(self.solver)
        parse_strategy(self.strategy)
        if len(self.ratios) != 3:
            raise ValueError(f"ratios must be three numbers (Q, K, V), got {self.ratios!r}")
        n_single = transformer.config.num_single_layers
        blocks = tuple(range(n_single)) if self.blocks is None else self.blocks
        _check_range(blocks, n_single, "single block")
        _check_range(self.double_blocks, transformer.config.num_layers, "double block")
        return dataclasses.replace(self, blocks=blocks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_blocks(spec: Blocks) -> tuple[int, ...] | None:
    """``"0-37"``, ``"20..37"``, ``"0,5,9"``, ``"all"`` or ints -> block indices (None: all)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    if not isinstance(spec, str):
        return tuple(int(b) for b in spec)
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        lo, sep, hi = part.replace("..", "-").partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"bad block spec {spec!r}; accepted: 'all', '0-37', '20..37', '0,5,9'") from None
    return tuple(out)


def _check_range(blocks: Sequence[int], n: int, what: str) -> None:
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise ValueError(f"{what} {bad[0]} out of range; this model has {what}s 0..{n - 1}")


@dataclass
class FireFlowOutput:
    """What ``edit``, ``reconstruct``, ``generate`` and ``invert`` return."""

    images: list[Image.Image]  # one per target prompt (empty for ``invert``)
    latents: torch.Tensor  # packed fp32 latents the images decode from (the noise for ``invert``)
    nfe: int  # transformer calls made, inversion included
    seconds: float
    settings: dict = field(default_factory=dict)
    source: Image.Image | None = None  # the source image as the model saw it (cropped or resized)
    noise: torch.Tensor | None = None  # the inverted latents, for edits and reconstructions
    reconstruction: Image.Image | None = None  # source prompt, no injection, when asked for
    reconstruction_latents: torch.Tensor | None = None
    #: (denoising step, call kind, block) of every feature injection made, in order.
    injections: list[tuple[int, str, tuple[str, int]]] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


class TransformerAdapter(ModelAdapter):
    """A bare transformer with no VAE or text encoders: for the latent-level API only."""

    name = "transformer"

    def __init__(self, transformer: torch.nn.Module, vae_scale_factor: int = 8, shift: bool = True):
        super().__init__(transformer)
        self.multiple, self.shift = 2 * vae_scale_factor, shift

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        return grid_ids(height // self.multiple, width // self.multiple)

    def _missing(self, *_args, **_kwargs):
        raise RuntimeError("this editor has only a transformer: use the *_latents methods with embeddings")

    encode_prompt = encode_image = decode = prepare_image = _missing  # type: ignore[assignment]


class FireFlowEditor:
    """FireFlow inversion and editing over a model adapter (FLUX.1 through diffusers, or the demo).

    ``FireFlowEditor(transformer=...)`` gives the latent-level API alone (no VAE, no text encoders).
    The editor holds no per-edit state: every call creates and drops its own, so one editor can
    serve several threads.
    """

    def __init__(self, adapter: ModelAdapter | None = None, *, transformer: torch.nn.Module | None = None):
        if (adapter is None) == (transformer is None):
            raise ValueError("pass exactly one of adapter= or transformer=")
        self.adapter = adapter if adapter is not None else TransformerAdapter(transformer)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "demo",
        *,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        offload: str | None = None,
    ) -> FireFlowEditor:
        """``"demo"`` (the bundled model), a local diffusers FLUX folder, or a Hub id in the HF cache."""
        from fireflow.models import load_adapter

        return cls(load_adapter(model, device=device, torch_dtype=torch_dtype, offload=offload))

    @property
    def transformer(self) -> torch.nn.Module:
        return self.adapter.transformer

    @property
    def model_name(self) -> str:
        return self.adapter.name

    # ---- latent-level API ----------------------------------------------------------------------
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
    ) -> tuple[torch.Tensor, int]:
        """One pass of the ODE; returns the end state and the transformer calls it made."""
        calls = 0

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            nonlocal calls
            calls += 1
            # Asked per call: the store hands itself to the processors only when this call uses it.
            kwargs = reuse.attention_kwargs if reuse is not None else None
            return self.adapter.velocity(x, t, cond, kwargs)

        x = solvers.sample(
            velocity, latents.float(), timesteps, solver, call_hook=hook, callback=callback, progress=progress
        )
        return x, calls

    @torch.no_grad()
    def invert_latents(
        self,
        latents: torch.Tensor,
        height: int,
        width: int,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        num_steps: int = 8,
        guidance: float = 1.0,
        solver: str = "fireflow",
        progress: bool | str = False,
    ) -> torch.Tensor:
        """Packed image latents ``[B, L, C]`` -> the noise they come from (t = 0 -> 1)."""
        cond = self.adapter.conditioning(prompt_embeds, pooled_prompt_embeds, height, width, guidance)
        ts = self.adapter.timesteps(num_steps, height, width).flip(0)
        return self._solve(latents, cond, ts, solver, progress=progress)[0]

    @torch.no_grad()
    def sample_latents(
        self,
        latents: torch.Tensor,
        height: int,
        width: int,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        num_steps: int = 8,
        guidance: float = 2.0,
        solver: str = "fireflow",
        progress: bool | str = False,
        callback: solvers.StepCallback | None = None,
    ) -> torch.Tensor:
        """Noise ``[B, L, C]`` -> packed image latents (t = 1 -> 0), no feature injection."""
        cond = self.adapter.conditioning(prompt_embeds, pooled_prompt_embeds, height, width, guidance)
        ts = self.adapter.timesteps(num_steps, height, width)
        return self._solve(latents, cond, ts, solver, progress=progress, callback=callback)[0]

    @torch.no_grad()
    def edit_latents(
        self,
        *,
        latents: torch.Tensor,
        height: int,
        width: int,
        source_prompt_embeds: torch.Tensor,
        source_pooled_prompt_embeds: torch.Tensor,
        target_prompt_embeds: torch.Tensor,
        target_pooled_prompt_embeds: torch.Tensor,
        num_steps: int = 8,
        inject: int = 1,
        guidance: float = 2.0,
        **options,
    ) -> torch.Tensor:
        """Edit packed latents ``[B, L, C]``; returns the edited packed latents.

        With ``B == 1`` and ``T`` target embeddings, one inversion serves ``T`` edits batched
        through the transformer (9 + 9T NFE at 8 steps). Other options: see :meth:`edit`.
        """
        out = self._edit(
            latents,
            height,
            width,
            (source_prompt_embeds, source_pooled_prompt_embeds),
            (target_prompt_embeds, target_pooled_prompt_embeds),
            num_steps=num_steps,
            inject=inject,
            guidance=guidance,
            **options,
        )
        return out.latents

    def _edit(
        self,
        latents: torch.Tensor,
        height: int,
        width: int,
        source: tuple[torch.Tensor, torch.Tensor],
        target: tuple[torch.Tensor, torch.Tensor],
        *,
        reconstruction: bool = False,
        feature_device: str | torch.device | None = None,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
        **knobs,
    ) -> FireFlowOutput:
        start = time.perf_counter()
        if "blocks" in knobs:
            knobs["blocks"] = parse_blocks(knobs["blocks"])
        knobs["double_blocks"] = parse_blocks(knobs.get("double_blocks")) or ()
        s = EditSettings(**knobs).validate(self.transformer)
        b, t = latents.shape[0], target[0].shape[0]
        if b != 1 and t != b:
            raise ValueError(f"{t} target prompts for {b} images: give one per image, or one image")
        expected = self.adapter.seq_len(height, width)
        if latents.shape[1] != expected:
            raise ValueError(f"latents have {latents.shape[1]} tokens; {height}x{width} needs {expected}")
        reuse = FeatureReuse(
            s.num_steps,
            s.inject,
            s.strategy,
            s.blocks or (),
            s.double_blocks,
            s.ratios,
            storage_device=feature_device,
        )
        ts = self.adapter.timesteps(s.num_steps, height, width)
        src = self.adapter.conditioning(*source, height, width, s.inversion_guidance)
        tgt = self.adapter.conditioning(*target, height, width, s.guidance)
        with torch.no_grad(), self.adapter.processors.installed():
            noise, nfe_inv = self._solve(
                latents, src, ts.flip(0), s.solver, reuse, reuse.recording, progress and "inversion"
            )
            start_noise = noise.expand(t, *noise.shape[1:]) if b == 1 else noise
            edited, nfe_edit = self._solve(
                start_noise, tgt, ts, s.solver, reuse, reuse.injecting, progress and "editing", callback
            )
            recon, nfe_rec = None, 0
            if reconstruction:
                recon, nfe_rec = self._solve(noise, src, ts, s.solver, progress=progress and "reconstruction")
        # Model evaluations per source image: one inversion shared by ``t`` batched edits.
        nfe = nfe_inv + (t if b == 1 else 1) * nfe_edit + nfe_rec
        seconds = time.perf_counter() - start
        return FireFlowOutput(
            [],
            edited,
            nfe,
            seconds,
            s.to_dict(),
            noise=noise,
            reconstruction_latents=recon,
            injections=reuse.injections,
        )

    # ---- image-level API -----------------------------------------------------------------------
    def _prepare(
        self, image: ImageInput, resize: tuple[int, int] | None, max_pixels: int | None
    ) -> tuple[Image.Image, torch.Tensor]:
        pil = self.adapter.prepare_image(load_image(image, max_pixels), resize)
        return pil, self.adapter.encode_image(to_tensor(pil))

    def _decode(self, latents: torch.Tensor, image: Image.Image) -> list[Image.Image]:
        return to_pil(self.adapter.decode(latents, image.height, image.width))

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
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
        guidance: float = 2.0,
        inversion_guidance: float = 1.0,
        solver: str = "fireflow",
        strategy: str = "replace_v",
        blocks: Blocks = None,
        double_blocks: Blocks = None,
        ratios: tuple[float, float, float] = (1.0, 1.0, 1.0),
        feature_device: str | torch.device | None = None,
        reconstruction: bool = False,
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
    ) -> FireFlowOutput:
        """Edit ``image`` from ``source_prompt`` to ``target_prompt`` (or several at once).

        num_steps, inject: steps per pass; features recorded in the last ``inject`` inversion
            steps are reused in the first ``inject`` denoising steps.
        guidance / inversion_guidance: FLUX's distilled guidance while denoising / inverting.
        solver: "fireflow" (N + 1 NFE per pass), "midpoint" (2N, RF-Solver) or "euler" (N).
        strategy: "replace_v" or any space-separated mix of replace/add of q, k, v.
        blocks: single-stream blocks to reuse in ("all", "20-37", ...); double_blocks likewise.
        ratios: scale of the stored Q, K, V.  feature_device: where features live ("cpu" to save
            accelerator memory; default the model's device).
        reconstruction: also sample the inverted noise back with the source prompt (N + 1 NFE).
        resize: (width, height) before the model's own crop or resize.
        """
        targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
        if not targets:
            raise ValueError("target_prompt is empty; give at least one target prompt")
        start = time.perf_counter()
        src_image, latents = self._prepare(image, resize, max_pixels)
        embeds, pooled = self._encode_prompts([source_prompt, *targets])
        out = self._edit(
            latents,
            src_image.height,
            src_image.width,
            (embeds[:1], pooled[:1]),
            (embeds[1:], pooled[1:]),
            num_steps=num_steps,
            inject=inject,
            guidance=guidance,
            inversion_guidance=inversion_guidance,
            solver=solver,
            strategy=strategy,
            blocks=blocks,
            double_blocks=double_blocks,
            ratios=tuple(ratios),
            reconstruction=reconstruction,
            feature_device=feature_device,
            progress=progress,
            callback=callback,
        )
        out.images = self._decode(out.latents, src_image)
        if out.reconstruction_latents is not None:
            out.reconstruction = self._decode(out.reconstruction_latents, src_image)[0]
        out.source = src_image
        out.seconds = time.perf_counter() - start
        return out

    def _invert_image(
        self,
        image: ImageInput,
        prompt: str,
        num_steps: int,
        guidance: float,
        solver: str,
        resize: tuple[int, int] | None,
        max_pixels: int | None,
        progress: bool,
    ):
        """Prepare, encode and invert an image; returns what sampling back needs too."""
        src_image, latents = self._prepare(image, resize, max_pixels)
        cond = self.adapter.conditioning(*self._encode_prompts([prompt]), src_image.height, src_image.width, guidance)
        ts = self._timesteps(num_steps, solver, src_image)
        noise, nfe = self._solve(latents, cond, ts.flip(0), solver, progress=progress and "inversion")
        return src_image, cond, ts, noise, nfe

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
        src_image, _, _, noise, nfe = self._invert_image(
            image, prompt, num_steps, guidance, solver, resize, max_pixels, progress
        )
        settings = {"num_steps": num_steps, "guidance": guidance, "solver": solver}
        return FireFlowOutput([], noise, nfe, time.perf_counter() - start, settings, src_image, noise)

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

        How close the result is to the source measures the inversion alone (EVALUATION.md).
        """
        start = time.perf_counter()
        src_image, cond, ts, noise, nfe_inv = self._invert_image(
            image, prompt, num_steps, guidance, solver, resize, max_pixels, progress
        )
        latents, nfe = self._solve(noise, cond, ts, solver, progress=progress and "sampling")
        settings = {"num_steps": num_steps, "guidance": guidance, "solver": solver}
        return FireFlowOutput(
            self._decode(latents, src_image),
            latents,
            nfe_inv + nfe,
            time.perf_counter() - start,
            settings,
            src_image,
            noise,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_steps: int = 8,
        guidance: float = 3.5,
        solver: str = "fireflow",
        seed: int | None = 0,
        latents: torch.Tensor | None = None,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
    ) -> FireFlowOutput:
        """Text-to-image with any solver. ``seed`` draws the noise on the CPU, so it is the same
        on every device; or pass ``latents`` (packed noise ``[B, L, C]``)."""
        start = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.adapter.default_size
        width = width or self.adapter.default_size
        # The model's own size policy (crop to a multiple of 16, or the demo's fixed size).
        height, width = self.adapter.prepare_image(Image.new("RGB", (width, height))).size[::-1]
        cond = self.adapter.conditioning(*self._encode_prompts(prompts), height, width, guidance)
        if latents is None:
            shape = (len(prompts), self.adapter.seq_len(height, width), self.adapter.latent_channels)
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            latents = torch.randn(shape, generator=g, dtype=torch.float32)
        latents = latents.to(self.adapter.execution_device, torch.float32)
        ts = self.adapter.timesteps(num_steps, height, width)
        x, nfe = self._solve(latents, cond, ts, solver, progress=progress and "generating", callback=callback)
        settings = {"num_steps": num_steps, "guidance": guidance, "solver": solver, "seed": seed}
        return FireFlowOutput(
            to_pil(self.adapter.decode(x, height, width)), x, nfe, time.perf_counter() - start, settings
        )

    def _timesteps(self, num_steps: int, solver: str, image: Image.Image) -> torch.Tensor:
        solvers.check_solver(solver)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        return self.adapter.timesteps(num_steps, image.height, image.width)
