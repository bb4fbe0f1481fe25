"""Moving scenes: one sprite of :mod:`research.bundled.scenes` gliding along a straight line.

A clip is ``FRAMES`` frames of 32x32: one object, at one size, on one plain background, at an
integer start position with an integer velocity (pixels per frame, each axis in
``-VMAX..VMAX``), so frame ``f`` is exactly the scene with its corner at ``(x + f vx, y + f vy)``,
composited by :func:`research.bundled.scenes.composite`. Start and velocity are drawn per clip so that
the sprite stays fully inside the frame for every frame (zero velocity, a still clip, included).
The prompt is the scene's, ``"<object>, <colour> background"``, never the motion.

A fixed tenth of all clips (by a hash of object, background, size, start and velocity,
:func:`is_held_out`) is never drawn in training. Every clip comes with its per-frame boxes and
masks (exact: the sprite's alpha at the frame's placement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fireflow.models.demo import PATCH, pack
from research.bundled import scenes as S

#: Frames per clip and the largest speed per axis, in pixels per frame (see the model card).
FRAMES = 6
VMAX = 2
RESOLUTION = S.RESOLUTION
#: One clip in ``HOLDOUT_MOD`` (by hash) is reserved for evaluation.
HOLDOUT_MOD = 10
_NV = 2 * VMAX + 1


@dataclass(frozen=True)
class Clip:
    """One clip: object, background, size index into ``scenes.SIZES``, start corner (x, y), velocity."""

    obj: int
    bg: int
    size: int
    x: int
    y: int
    vx: int
    vy: int
    frames: int = FRAMES

    @property
    def side(self) -> int:
        return S.SIZES[self.size]

    @property
    def prompt(self) -> str:
        return S.prompt(self.obj, self.bg)

    def scene(self, f: int) -> S.Scene:
        """Frame ``f`` as a still scene."""
        return S.Scene(self.obj, self.bg, self.size, self.x + f * self.vx, self.y + f * self.vy)

    def scenes(self) -> list[S.Scene]:
        return [self.scene(f) for f in range(self.frames)]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Per frame, the placement square ``(x0, y0, x1, y1)``, exclusive ends."""
        return [s.box for s in self.scenes()]

    def inside(self) -> bool:
        """Whether the sprite is fully inside the frame in every frame."""
        return all(0 <= x0 and 0 <= y0 and x1 <= RESOLUTION and y1 <= RESOLUTION for x0, y0, x1, y1 in self.boxes)


def clip_key(obj, bg, size, x, y, vx, vy):
    """A unique integer per clip (ints or int64 tensors); below 2**31, as ``scenes._mix`` needs."""
    return (S.scene_key(obj, bg, size, x, y) * _NV + (vx + VMAX)) * _NV + (vy + VMAX)


def is_held_out(obj, bg, size, x, y, vx, vy):
    """Whether the clip is reserved for evaluation (never drawn in training)."""
    return S._mix(clip_key(obj, bg, size, x, y, vx, vy)) % HOLDOUT_MOD == 0


def composite(clip: Clip, spr: S.Sprites | None = None) -> torch.Tensor:
    """The clip as float ``[F, 3, H, W]`` in [0, 1], each frame on the 8-bit grid."""
    spr = spr or S.sprites()
    return torch.stack([S.composite(s, spr) for s in clip.scenes()])


def object_masks(clip: Clip, spr: S.Sprites | None = None, opaque: bool = False) -> np.ndarray:
    """Boolean ``[F, H, W]``: per frame, every pixel the object touches (or, with ``opaque``,
    covers entirely); see :func:`research.bundled.scenes.object_mask`."""
    spr = spr or S.sprites()
    return np.stack([S.object_mask(s, spr, opaque) for s in clip.scenes()])


def box_masks(clip: Clip) -> np.ndarray:
    """Boolean ``[F, H, W]``: per frame, the placement square."""
    return np.stack([S.box_mask(s) for s in clip.scenes()])


def draw_clips(n: int, gen: torch.Generator, held_out: bool = False, frames: int = FRAMES) -> list[Clip]:
    """``n`` clips from the training split (or, with ``held_out``, the evaluation split), by
    rejection, in blocks drawn from ``gen`` (deterministic). Object, background and size are
    uniform; then each axis' velocity is uniform over those that keep the sprite inside for
    ``frames`` frames, and the start uniform over those that do."""
    found: list[Clip] = []
    steps = frames - 1
    while len(found) < n:
        m = 2 * n if not held_out else 16 * n
        obj = torch.randint(len(S.OBJECTS), (m,), generator=gen)
        bg = torch.randint(len(S.BACKGROUNDS), (m,), generator=gen)
        size = torch.randint(len(S.SIZES), (m,), generator=gen)
        u = torch.rand(m, 4, generator=gen)
        span = RESOLUTION - torch.tensor(S.SIZES)[size]  # the corner lies in 0 .. span
        vlim = (span // max(steps, 1)).clamp(max=VMAX)  # |v| * steps <= span
        nv = 2 * vlim + 1
        axes = []
        for a in range(2):
            v = (u[:, a] * nv).long().clamp(max=nv - 1) - vlim
            lo = (-v * steps).clamp(min=0)
            n_start = span - (v * steps).abs() + 1
            p = lo + (u[:, 2 + a] * n_start).long().clamp(max=n_start - 1)
            axes.append((p, v))
        (x, vx), (y, vy) = axes
        keep = is_held_out(obj, bg, size, x, y, vx, vy) == held_out
        for i in torch.nonzero(keep).flatten().tolist():
            found.append(
                Clip(int(obj[i]), int(bg[i]), int(size[i]), int(x[i]), int(y[i]), int(vx[i]), int(vy[i]), frames)
            )
            if len(found) == n:
                break
    return found


def clip_ids(frames: int = FRAMES, side: int = RESOLUTION, patch: int = PATCH) -> torch.Tensor:
    """Image position ids ``[F * (side/patch)**2, 3]``: (frame, row, col), frame-major."""
    r = side // patch
    ids = torch.zeros(frames, r, r, 3)
    ids[..., 0] = torch.arange(frames)[:, None, None]
    ids[..., 1] = torch.arange(r)[None, :, None]
    ids[..., 2] = torch.arange(r)[None, None, :]
    return ids.reshape(frames * r * r, 3)


def pack_clips(pixels: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[B, F, 3, H, W]`` -> ``[B, F * (H/p)(W/p), 3 p p]``: each frame packed, frame-major."""
    b, f = pixels.shape[:2]
    tokens = pack(pixels.flatten(0, 1), patch)
    return tokens.reshape(b, f * tokens.shape[1], tokens.shape[2])


def unpack_clips(tokens: torch.Tensor, frames: int, side: int = RESOLUTION, patch: int = PATCH) -> torch.Tensor:
    """The inverse of :func:`pack_clips`: ``[B, F * L, C]`` -> ``[B, F, 3, side, side]``."""
    from fireflow.models.demo import unpack

    b = tokens.shape[0]
    frames_tokens = tokens.reshape(b * frames, tokens.shape[1] // frames, tokens.shape[2])
    return unpack(frames_tokens, side, side, patch).reshape(b, frames, 3, side, side)


class ClipSource:
    """Training batches: packed clip tokens ``[B, F * 64, 48]`` in [-1, 1] and prompt indices."""

    prompts = S.PROMPTS

    def __init__(self, frames: int = FRAMES, spr: S.Sprites | None = None):
        self.frames = frames
        self.spr = spr or S.sprites()

    def pixels(self, clips: list[Clip]) -> torch.Tensor:
        """``[B, F, 3, H, W]`` in [-1, 1]."""
        return torch.stack([composite(c, self.spr) for c in clips]) * 2 - 1

    def tokens(self, clips: list[Clip]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([S.prompt_index(c.obj, c.bg) for c in clips])
        return pack_clips(self.pixels(clips)), idx

    def batch(self, b: int, gen: torch.Generator, held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(draw_clips(b, gen, held_out, self.frames))
