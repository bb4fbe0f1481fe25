"""The public API: invert a real image (or clip), edit it with a new prompt, reconstruct it, or generate.

image -> latents -> inversion (source prompt, recording features) -> noise
      -> denoising (target prompt, injecting features) -> latents -> image

Nothing here knows a model family: the adapter (``fireflow/models/<family>/``) supplies the
latent layout, the conditioning, the time grid and the attention processors. Settings are
validated where they enter (:class:`fireflow.settings.EditSettings`), resolved against the
family's defaults once (:meth:`FireFlowEditor.resolve`), and that one resolved object travels to
the feature reuse and into the output.
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
from fireflow.features import FeatureReuse, in_call
from fireflow.image import MAX_PIXELS, ImageInput, load_frames, to_pil, to_tensor
from fireflow.masks import MaskInput, load_mask
from fireflow.masks import paste_pixels as paste_source_pixels
from fireflow.models.base import Conditioning, Embeds, Geometry, ModelAdapter
from fireflow.settings import VERB_KNOBS, EditSettings, ResolvedSettings, SettingError

#: An image (path, PIL image, array, tensor), or a clip as a sequence of frames.
MediaInput = ImageInput | Sequence[ImageInput]


# ---- outputs -------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every call reports: the settings it ran with and what it cost."""

    settings: ResolvedSettings | None = None
    nfe: int = 0  # velocity evaluations, inversion included (what the paper counts)
    #: Transformer forward calls, and batch rows through the transformer summed over them
    #: (classifier-free guidance doubles the rows of every call; see the family's docs).
    transformer_calls: int = 0
    transformer_rows: int = 0
    seconds: float = 0.0


@dataclass
class _Media:
    """Decoded results: ``images`` for image models, ``videos`` (each a list of frames) for video
    models; the other list is empty."""

    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        """The result, when there is exactly one image."""
        if len(self.images) != 1:
            raise ValueError(f"this output has {len(self.images)} images (and {len(self.videos)} videos); use .images")
        return self.images[0]

    @property
    def video(self) -> list[Image.Image]:
        """The frames of the result, when there is exactly one video."""
        if len(self.videos) != 1:
            raise ValueError(f"this output has {len(self.videos)} videos (and {len(self.images)} images); use .videos")
        return self.videos[0]


@dataclass
class FireFlowOutput(_Media, _Run):
    """What ``edit`` returns: one image (or video) per target prompt, from one inversion."""

    latents: torch.Tensor | None = None  # edited latents (the family's layout; edit_latents: the pipeline's)
    noise: torch.Tensor | None = None  # the inverted latents (what the edit started from)
    source: Image.Image | list[Image.Image] | None = None  # the input as the model saw it (frames for video)
    reconstruction: Image.Image | list[Image.Image] | None = None  # source prompt, no injection, when asked for
    reconstruction_latents: torch.Tensor | None = None
    #: (denoising step, call kind, block) of every feature injection made, in order.
    injections: list[tuple[int, str, tuple[str, int]]] = field(default_factory=list)
    #: The edit mask at the model's size ([F, H, W], True = edited); mask="auto": the found one
    #: ([1, H, W]; with several targets, the union of theirs).
    mask: np.ndarray | None = None


@dataclass
class InversionOutput(_Run):
    """What ``invert`` returns: the noise the image comes from."""

    latents: torch.Tensor | None = None  # the noise, in the layout the pipeline's ``latents=`` takes
    source: Image.Image | list[Image.Image] | None = None


@dataclass
class ReconstructionOutput(_Media, _Run):
    """What ``reconstruct`` returns: the image sampled back from its own inversion."""

    latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    source: Image.Image | list[Image.Image] | None = None


@dataclass
class GenerationOutput(_Media, _Run):
    """What ``generate`` returns: one image (or video) per prompt."""

    latents: torch.Tensor | None = None
    seed: int | None = None


@dataclass
class _Cost:
    nfe: int = 0
    calls: int = 0
    rows: int = 0

    def add(self, other: _Cost, times: int = 1) -> None:
        self.nfe += other.nfe * times
        self.calls += other.calls * times
        self.rows += other.rows * times

    def report(self) -> dict[str, int]:
        return {"nfe": self.nfe, "transformer_calls": self.calls, "transformer_rows": self.rows}


def _media(pixels: torch.Tensor, video: bool) -> dict[str, Any]:
    """``[B, F, 3, H, W]`` -> ``{"images": [...]}`` or ``{"videos": [[frames], ...]}``."""
    if video:
        return {"videos": [to_pil(clip) for clip in pixels]}
    return {"images": to_pil(pixels[:, 0])}


def _prompts(name: str, value: Any, many: bool = False) -> list[str]:
    """A prompt argument as a list of non-empty strings, checked before any model call: the wrong
    type is a TypeError, an empty prompt a ValueError, each naming the argument."""
    accepted = "a str or a non-empty list of str" if many else "a str"
    items = [value] if isinstance(value, str) else list(value) if many and isinstance(value, (list, tuple)) else None
    bad = [p for p in (items if items is not None else [value]) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must be {accepted}, got {type(bad[0]).__name__}")
    if not items:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    if not all(p.strip() for p in items):
        raise ValueError(f"{name} must be non-empty text, got {value!r:.80}")
    return items


def _split(kwargs: Mapping[str, Any], verb: str, prefixes: Sequence[str] = ("",)):
    """A latent-level call's keywords: knobs by API name, and conditioning by diffusers' names."""
    knobs = {k: v for k, v in kwargs.items() if k in VERB_KNOBS[verb]}
    embeds = {p: {} for p in prefixes}
    for k, v in kwargs.items():
        if k in knobs:
            continue
        # Unknown conditioning names go on, so that the family names what it takes.
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if prefix is None:
            raise TypeError(f"unexpected keyword argument {k!r}; knobs: {', '.join(VERB_KNOBS[verb])}")
        embeds[prefix][k[len(prefix) :]] = v
    return knobs, embeds


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
        """``"demo"``/``"scenes"`` (bundled), a local diffusers folder, or a Hub id in the HF cache."""
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
        return self.adapter.model_name

    def resolve(
        self, settings: EditSettings | ResolvedSettings | None = None, verb: str = "edit", **overrides: Any
    ) -> ResolvedSettings:
        """The settings (plus ``overrides`` by API name) with this model's defaults filled in and
        blocks checked: exactly what would run. A :class:`ResolvedSettings` is returned as it is."""
        if isinstance(settings, ResolvedSettings):
            if overrides:
                raise TypeError("settings are already resolved; pass an EditSettings to override knobs")
            return settings
        s = EditSettings.build(settings, overrides, verb)
        a = self.adapter
        defaults = dict(a.defaults)
        if verb == "generate":
            defaults["guidance"] = a.generate_guidance
        return s.resolve(defaults, a.block_counts, verb)

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
            # Asked per call: the store reaches the processors only when this call uses it.
            store = reuse if reuse is not None and reuse.active else None
            kwargs, context = self.adapter.feature_call(store, reusing=reuse is not None)
            with context:
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

    def _cond(self, embeds: Mapping[str, Any], geometry: Geometry, guidance: float, prefix: str = ""):
        return self.adapter.conditioning(self.adapter.check_embeds(embeds, prefix), geometry, guidance)

    # ---- latent-level API ----------------------------------------------------------------------
    def _latents_in(
        self, latents: torch.Tensor, height: int | None, width: int | None, num_frames: int | None
    ) -> tuple[torch.Tensor, Geometry]:
        """Latents in any layout the family's pipeline uses -> the adapter's layout, and the
        geometry they stand for (read from the layout, or from ``height``/``width``/``num_frames``)."""
        a = self.adapter
        g = a.geometry_of(latents)
        if g is None and (height is None or width is None):
            raise ValueError(f"{a.name} latents in this layout need height= and width= (pixels)")
        g = Geometry(
            height if height is not None else g.height,
            width if width is not None else g.width,
            num_frames if num_frames is not None else (g.frames if g is not None else 1),
        )
        x = a.from_pipeline_latents(latents, g)
        a.check_latents(x, g)
        return x, g

    @torch.no_grad()
    def invert_latents(
        self,
        latents: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        num_frames: int | None = None,
        settings: EditSettings | ResolvedSettings | None = None,
        progress: bool | str = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Image latents (the pipeline's ``output_type="latent"`` layout) -> the noise they come
        from (t = 0 -> 1), in the layout the pipeline's ``latents=`` takes.

        ``kwargs``: knobs (``num_steps``, ``inversion_guidance``, ``solver``) and the family's
        conditioning by diffusers' names (``prompt_embeds``, ...).
        """
        knobs, embeds = _split(kwargs, "invert")
        s = self.resolve(settings, "invert", **knobs)
        x, g = self._latents_in(latents, height, width, num_frames)
        cond = self._cond(embeds[""], g, s.inversion_guidance)
        ts = self.adapter.timesteps(s.num_steps, g).flip(0)
        noise = self._solve(x, cond, ts, s.solver, progress=progress)[0]
        return self.adapter.to_pipeline_noise(noise, g)

    @torch.no_grad()
    def sample_latents(
        self,
        latents: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        num_frames: int | None = None,
        settings: EditSettings | ResolvedSettings | None = None,
        progress: bool | str = False,
        callback: solvers.StepCallback | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Noise (the pipeline's ``latents=`` layout) -> image latents (t = 1 -> 0), no injection,
        in the layout of the pipeline's ``output_type="latent"``.

        With ``solver="euler"`` this is the family's own pipeline with ``output_type="latent"``.
        ``guidance`` defaults to the family's text-to-image guidance.
        """
        knobs, embeds = _split(kwargs, "generate")
        s = self.resolve(settings, "generate", **knobs)
        x, g = self._latents_in(latents, height, width, num_frames)
        cond = self._cond(embeds[""], g, s.guidance)
        ts = self.adapter.timesteps(s.num_steps, g)
        out = self._solve(x, cond, ts, s.solver, progress=progress, callback=callback)[0]
        return self.adapter.to_pipeline_latents(out, g)

    @torch.no_grad()
    def edit_latents(
        self,
        latents: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        *,
        num_frames: int | None = None,
        settings: EditSettings | ResolvedSettings | None = None,
        mask: torch.Tensor | None = None,
        reconstruction: bool = False,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | FireFlowOutput:
        """Edit latents (the pipeline's ``output_type="latent"`` layout); returns the edited
        latents in that layout, or with ``return_dict=True`` the whole :class:`FireFlowOutput`.

        Conditioning comes as ``source_<name>`` and ``target_<name>`` for each of the family's
        names (``source_prompt_embeds``, ``target_pooled_prompt_embeds``, ...); every other keyword
        is a knob (see :meth:`edit`). ``mask``: a latent mask from the adapter's ``latent_mask``.
        With one source and ``T`` target rows, one inversion serves ``T`` batched edits.
        """
        knobs, embeds = _split(kwargs, "edit", ("source_", "target_"))
        s = self.resolve(settings, **knobs)
        x, g = self._latents_in(latents, height, width, num_frames)
        a = self.adapter
        out = self._edit(
            x,
            g,
            a.check_embeds(embeds["source_"], "source_"),
            a.check_embeds(embeds["target_"], "target_"),
            s,
            mask=mask,
            reconstruction=reconstruction,
            progress=progress,
            callback=callback,
        )
        out.latents = a.to_pipeline_latents(out.latents, g)
        out.noise = a.to_pipeline_noise(out.noise, g)
        if out.reconstruction_latents is not None:
            out.reconstruction_latents = a.to_pipeline_latents(out.reconstruction_latents, g)
        return out if return_dict else out.latents

    def _edit(
        self,
        latents: torch.Tensor,
        geometry: Geometry,
        source: Embeds,
        target: Embeds,
        s: ResolvedSettings,
        *,
        mask: torch.Tensor | None = None,
        reconstruction: bool = False,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
    ) -> FireFlowOutput:
        start = time.perf_counter()
        a = self.adapter
        b, t = latents.shape[0], target["prompt_embeds"].shape[0]
        if b != 1 and t != b:
            raise ValueError(f"{t} target prompts for {b} images: give one per image, or one image")
        reuse = FeatureReuse.from_settings(s)
        ts = a.timesteps(s.num_steps, geometry)
        src = a.conditioning(source, geometry, s.inversion_guidance)
        tgt = a.conditioning(target, geometry, s.guidance)
        keep, record = _MaskBlend.make(mask, latents, ts)
        cost = _Cost()
        with torch.no_grad(), a.processors.installed(s.blocks):
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
            settings=s,
            **cost.report(),
            seconds=time.perf_counter() - start,
            latents=edited,
            noise=noise,
            reconstruction_latents=recon,
            injections=reuse.injections,
        )

    # ---- image-level API -----------------------------------------------------------------------
    def _prepare(
        self, media: MediaInput, resize: tuple[int, int] | None, max_pixels: int | None
    ) -> tuple[list[Image.Image], torch.Tensor, Geometry, list[Image.Image]]:
        """``(frames as the model sees them, their latents, the geometry, the input as loaded)``."""
        a = self.adapter
        original = load_frames(media, max_pixels)
        original = original[: a.prepare_frames(len(original))]  # a video family may trim (e.g. to 4k + 1)
        frames = [a.prepare_image(f, resize) for f in original]
        if len({f.size for f in frames}) != 1:
            raise ValueError(f"frames of different sizes: {sorted({f.size for f in frames})}; give frames of one size")
        geometry = Geometry(frames[0].height, frames[0].width, len(frames))
        pixels = torch.stack([to_tensor(f)[0] for f in frames])[None]  # [1, F, 3, H, W]
        return frames, a.encode_image(pixels), geometry, original

    def _prepare_mask(
        self, mask: MaskInput | Sequence[MaskInput], original: list[Image.Image], resize, geometry: Geometry
    ) -> np.ndarray:
        """The input-sized mask (one still mask, or one per frame) through the model's size policy,
        as ``[F, H, W]`` (F = 1 for a still mask). It goes in as black = edit, so that any padding
        the policy adds (white) is kept, never edited."""
        masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
        if len(masks) not in (1, geometry.frames):
            raise ValueError(f"{len(masks)} masks for {geometry.frames} frames: give one mask, or one per frame")
        out = []
        for m, frame in zip(masks, original * len(masks) if len(original) == 1 else original):
            keep = Image.fromarray(np.where(load_mask(m, frame.size), 0, 255).astype(np.uint8)).convert("RGB")
            out.append(np.asarray(self.adapter.prepare_image(keep, resize).convert("L")) < 128)
        prepared = np.stack(out)
        if prepared.shape[1:] != (geometry.height, geometry.width) or not prepared.any():
            raise ValueError(f"the mask does not survive this model's size policy ({geometry}): nothing to edit")
        return prepared

    def _decode(self, latents: torch.Tensor, geometry: Geometry) -> dict[str, Any]:
        return _media(self.adapter.decode(latents, geometry), self.adapter.video)

    def _encode_prompts(self, prompts: list[str]) -> Embeds:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        with in_call():  # the pipelines' truncation notices are dropped here only
            return self.adapter.encode_prompt(prompts)

    def _source(self, frames: list[Image.Image]) -> Image.Image | list[Image.Image]:
        return frames if self.adapter.video else frames[0]

    @torch.no_grad()
    def edit(
        self,
        image: MediaInput,
        source_prompt: str,
        target_prompt: str | Sequence[str],
        settings: EditSettings | ResolvedSettings | None = None,
        *,
        mask: MaskInput | Sequence[MaskInput] | str | None = None,
        paste_pixels: bool = False,
        reconstruction: bool = False,
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
        **overrides: Any,
    ) -> FireFlowOutput:
        """Edit ``image`` (or a clip: a sequence of frames) from ``source_prompt`` to
        ``target_prompt``, or to several targets at once (one inversion; ``out.images`` has one
        result per target).

        image: a path, PIL image or array (HxW or HxWxC; uint8, uint16, or float in [0, 1]: a float
            array outside [0, 1], one with NaN or infinite values, or an empty one is a ValueError;
            give 0..255 as uint8). Prompts that are not text are a TypeError, empty ones a
            ValueError: all of it before any model call.
        settings: an :class:`EditSettings` (or resolved settings); ``overrides`` set knobs by API
            name on top of it: ``num_steps``, ``inject``, ``guidance``, ``inversion_guidance``,
            ``solver``, ``strategy``, ``blocks``, ``ratios``, ``feature_device`` (see
            :mod:`fireflow.settings`; every default comes from its table or the family).
        mask: the region to edit (white / True), a path, PIL image or array of any size (video: one
            still mask, or one per frame); outside it the result keeps the source latents exactly,
            at no extra model calls. ``"auto"``: the region is found from the model
            (:mod:`fireflow.automask`; knobs ``mask_threshold``, ``mask_dilation``), at
            ``2 x len(fireflow.automask.TIMES)`` extra velocity evaluations, counted in ``nfe``.
        paste_pixels: with a mask, also paste the source pixels outside it after decoding (a
            feathered edge inside the mask), so the background is the source's to the bit.
        reconstruction: also sample the inverted noise back with the source prompt (N + 1 NFE).
        resize: (width, height) before the model's own crop or resize.
        """
        s = self.resolve(settings, **overrides)  # every knob checked before any image or text work
        source_prompt = _prompts("source_prompt", source_prompt)[0]
        targets = _prompts("target_prompt", target_prompt, many=True)
        if paste_pixels and mask is None:
            raise ValueError("paste_pixels needs a mask: the pixels outside the mask are pasted")
        start = time.perf_counter()
        frames, latents, g, original = self._prepare(image, resize, max_pixels)
        pixel_mask = latent_mask = None
        auto = isinstance(mask, str) and mask == "auto"
        if mask is not None and not auto:  # drawn over the input: cropped, padded and resized as the image was
            pixel_mask = self._prepare_mask(mask, original, resize, g)
            latent_mask = self.adapter.latent_mask(pixel_mask, g).to(latents.device)
        embeds = self._encode_prompts([source_prompt, *targets])
        found = None
        if auto:  # the mask from the model: fireflow.automask
            from fireflow import automask

            source_embeds = {k: v[:1] for k, v in embeds.items()}
            target_embeds = {k: v[1:] for k, v in embeds.items()}
            found = automask.find(
                self.adapter,
                latents,
                g,
                source_embeds,
                target_embeds,
                threshold=s.mask_threshold,
                dilation=s.mask_dilation,
                guidance=s.inversion_guidance,
            )
            pixel_mask, latent_mask = found.union, found.latent  # one mask per target; the union shown
        out = self._edit(
            latents,
            g,
            {k: v[:1] for k, v in embeds.items()},
            {k: v[1:] for k, v in embeds.items()},
            s,
            mask=latent_mask,
            reconstruction=reconstruction,
            progress=progress,
            callback=callback,
        )
        if found is not None:
            out.nfe += found.nfe
            out.transformer_calls += found.transformer_calls
            out.transformer_rows += found.transformer_rows
        media = self._decode(out.latents, g)
        if paste_pixels:
            if "videos" in media:
                media["videos"] = [_paste(v, frames, pixel_mask) for v in media["videos"]]
            else:
                media["images"] = [paste_source_pixels(r, frames[0], pixel_mask[0]) for r in media["images"]]
        out.images, out.videos = media.get("images", []), media.get("videos", [])
        out.mask = pixel_mask
        if out.reconstruction_latents is not None:
            rec = self._decode(out.reconstruction_latents, g)
            out.reconstruction = rec["videos"][0] if "videos" in rec else rec["images"][0]
        out.source = self._source(frames)
        out.seconds = time.perf_counter() - start
        return out

    def _invert_image(self, image, prompt, s: ResolvedSettings, resize, max_pixels, progress):
        """Prepare, encode and invert an image; returns what sampling back needs too."""
        frames, latents, g, _ = self._prepare(image, resize, max_pixels)
        cond = self.adapter.conditioning(self._encode_prompts([prompt]), g, s.inversion_guidance)
        ts = self.adapter.timesteps(s.num_steps, g)
        noise, cost = self._solve(latents, cond, ts.flip(0), s.solver, progress=progress and "inversion")
        return frames, g, cond, ts, noise, cost

    @torch.no_grad()
    def invert(
        self,
        image: MediaInput,
        prompt: str,
        settings: EditSettings | ResolvedSettings | None = None,
        *,
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
        **overrides: Any,
    ) -> InversionOutput:
        """Invert ``image`` under ``prompt`` to the noise it comes from (``out.latents``).
        Knobs: ``num_steps``, ``inversion_guidance``, ``solver``."""
        start = time.perf_counter()
        s = self.resolve(settings, "invert", **overrides)
        prompt = _prompts("prompt", prompt)[0]
        frames, g, _, _, noise, cost = self._invert_image(image, prompt, s, resize, max_pixels, progress)
        return InversionOutput(
            settings=s,
            **cost.report(),
            seconds=time.perf_counter() - start,
            latents=self.adapter.to_pipeline_noise(noise, g),
            source=self._source(frames),
        )

    @torch.no_grad()
    def reconstruct(
        self,
        image: MediaInput,
        prompt: str,
        settings: EditSettings | ResolvedSettings | None = None,
        *,
        resize: tuple[int, int] | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
        **overrides: Any,
    ) -> ReconstructionOutput:
        """Invert ``image`` and sample it back with the same prompt and no injection: how close
        the result is to the source measures the inversion alone. Knobs as for :meth:`invert`."""
        start = time.perf_counter()
        s = self.resolve(settings, "reconstruct", **overrides)
        prompt = _prompts("prompt", prompt)[0]
        frames, g, cond, ts, noise, cost = self._invert_image(image, prompt, s, resize, max_pixels, progress)
        latents, back = self._solve(noise, cond, ts, s.solver, progress=progress and "sampling")
        cost.add(back)
        return ReconstructionOutput(
            **self._decode(latents, g),
            settings=s,
            **cost.report(),
            seconds=time.perf_counter() - start,
            latents=latents,
            noise=noise,
            source=self._source(frames),
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        settings: EditSettings | ResolvedSettings | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        seed: int | None = 0,
        latents: torch.Tensor | None = None,
        max_pixels: int | None = MAX_PIXELS,
        progress: bool = False,
        callback: solvers.StepCallback | None = None,
        **overrides: Any,
    ) -> GenerationOutput:
        """Text-to-image (or video) with any solver. Knobs: ``num_steps``, ``guidance`` (default:
        the family's text-to-image guidance), ``solver``. ``seed`` draws the noise on the CPU, so it
        is the same on every device; or pass ``latents`` (noise in the pipeline's layout).
        ``height * width`` above ``max_pixels`` is refused (None: no limit of ours)."""
        start = time.perf_counter()
        a = self.adapter
        s = self.resolve(settings, "generate", **overrides)
        prompts = _prompts("prompt", prompt, many=True)
        g = a.default_geometry(height, width, num_frames)
        a.check_geometry(g)
        if max_pixels is not None and g.height * g.width > max_pixels:  # before the schedule, which overflows
            raise ValueError(
                f"size {g.height}x{g.width} is {g.height * g.width} pixels, more than max_pixels={max_pixels}; "
                "use a smaller size"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise SettingError("seed", f"{{name}} must be a whole number from 0 to 2**63 - 1, got {seed!r}")
        cond = a.conditioning(self._encode_prompts(prompts), g, s.guidance)
        if latents is None:
            shape = (len(prompts), *a.latent_shape(g))
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            latents = torch.randn(shape, generator=gen, dtype=torch.float32)
        else:
            latents = a.from_pipeline_latents(latents, g)
        a.check_latents(latents, g)
        latents = latents.to(a.execution_device, torch.float32)
        ts = a.timesteps(s.num_steps, g)
        x, cost = self._solve(latents, cond, ts, s.solver, progress=progress and "generating", callback=callback)
        return GenerationOutput(
            **self._decode(x, g),
            settings=s,
            **cost.report(),
            seconds=time.perf_counter() - start,
            latents=x,
            seed=seed,
        )


def _paste(frames_out: list[Image.Image], frames_in: list[Image.Image], mask: np.ndarray) -> list[Image.Image]:
    """Paste each source frame's pixels outside its mask (a still mask serves every frame)."""
    pairs = enumerate(zip(frames_out, frames_in, strict=True))
    return [paste_source_pixels(o, i, mask[min(k, len(mask) - 1)]) for k, (o, i) in pairs]


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
