"""Automatic edit masks: the region to change, found from the model itself (``mask="auto"``).

DiffEdit's idea on a flow. The source latents are noised along the flow's straight path,
``x_t = (1 - t) x_0 + t eps`` (a fixed seed, so the mask is deterministic), and the velocity is
evaluated there under the source and under the target prompt. Where the prompts disagree about
the image, ``|v(x_t | target) - v(x_t | source)|`` is large: averaged over the latent channels of
each latent cell and over the noise times, normalised by its high quantile, thresholded and
dilated by whole cells, it is the mask the landed blend uses (outside it the result keeps the
source latents exactly).

Family-free: it needs only the contract's velocity, conditioning and layout. Which latent
elements make one cell is read off the adapter's own ``latent_mask`` with a few probe masks
(:func:`cell_layout`), so packed layouts (FLUX's 2x2 tokens, FLUX.2's patchified channels) and
unpacked ones (SD3, Wan) are served alike. A video gets one still mask over its frames.

Cost: ``2 x len(times)`` velocity evaluations per edit (source and target at each time), counted
in ``nfe``, ``transformer_calls`` and ``transformer_rows`` like every other call; at the defaults
(two times) 4 evaluations on top of the edit's 18. Both passes run at the inversion guidance
(1 by default: no classifier-free guidance doubling, and under true CFG the guided difference is
the conditional one scaled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fireflow.models.base import Conditioning, Embeds, Geometry, ModelAdapter

#: Noise levels the velocity difference is read at (t = 1 is pure noise).
TIMES: tuple[float, ...] = (0.5, 0.7)
#: Seed of the noise the source is carried to those times with.
SEED = 0
#: The per-cell score is divided by this quantile of itself before thresholding.
QUANTILE = 0.99


@dataclass
class CellLayout:
    """Which latent cell each element of one sample's latents belongs to."""

    factor: tuple[int, int]  # pixels per cell (rows, columns)
    grid: tuple[int, int]  # cells (rows, columns)
    index: torch.Tensor  # long, shaped like one sample's latents: the element's cell (row-major)

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]


def cell_layout(adapter: ModelAdapter, geometry: Geometry) -> CellLayout:
    """Read the cell structure off ``adapter.latent_mask``: the cell size from single-pixel
    probes, then each element's cell index from one probe per bit of the index (a cell's pixels
    all carry the same bits, and ``latent_mask`` marks an element when any of its pixels is set)."""
    h, w = geometry.height, geometry.width
    shape = tuple(adapter.latent_shape(geometry))

    def probe(m: np.ndarray) -> torch.Tensor:
        out = adapter.latent_mask(m[None], geometry).detach().cpu()
        return torch.broadcast_to(out, shape) > 0.5

    def pixel(y: int, x: int) -> np.ndarray:
        m = np.zeros((h, w), bool)
        m[y, x] = True
        return m

    base = probe(pixel(0, 0))
    fx = 1
    while fx < w and torch.equal(probe(pixel(0, fx)), base):
        fx += 1
    fy = 1
    while fy < h and torch.equal(probe(pixel(fy, 0)), base):
        fy += 1
    rows, cols = -(-h // fy), -(-w // fx)
    ids = (np.arange(h)[:, None] // fy) * cols + np.arange(w)[None, :] // fx
    index = torch.zeros(shape, dtype=torch.long)
    for bit in range(max(1, (rows * cols - 1).bit_length())):
        m = (ids >> bit) & 1 == 1
        if m.any():
            index |= probe(m).long() << bit
    return CellLayout((fy, fx), (rows, cols), index)


@dataclass
class AutoMask:
    """A found mask: per target, per latent cell, and as pixels."""

    cells: torch.Tensor  # [T, rows, cols] bool, True = edited
    scores: torch.Tensor  # [T, rows, cols] the normalised velocity difference
    latent: torch.Tensor  # [T, *latent shape] 0/1, what the blend takes
    pixels: np.ndarray  # [T, H, W] bool at the model's size
    nfe: int = 0
    transformer_calls: int = 0
    transformer_rows: int = 0

    @property
    def union(self) -> np.ndarray:
        """``[1, H, W]``: the cells any target edits (``FireFlowOutput.mask``)."""
        return self.pixels.any(axis=0, keepdims=True)


def _noised(latents: torch.Tensor, times: Sequence[float], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in times:
        eps = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(latents.device)
        out.append((1 - t) * latents.float() + t * eps)
    return out


def velocity_difference(
    adapter: ModelAdapter,
    latents: torch.Tensor,
    source: Conditioning,
    target: Conditioning,
    targets: int,
    times: Sequence[float] = TIMES,
    seed: int = SEED,
) -> tuple[torch.Tensor, dict[str, int]]:
    """``mean_t |v(x_t | target) - v(x_t | source)|`` per latent element, ``[T, *shape]``
    (``targets`` rows; one source row serves them all), and what it cost, counted as the editor
    counts: NFE per source image (a batch of ``T`` targets over one image costs ``T``)."""
    cost = {"nfe": 0, "transformer_calls": 0, "transformer_rows": 0}
    b = latents.shape[0]

    def velocity(x: torch.Tensor, t: float, cond: Conditioning, nfe: int) -> torch.Tensor:
        # As the editor's own velocity: no feature store, the family's per-call context.
        cost["nfe"] += nfe
        cost["transformer_calls"] += cond.forwards
        cost["transformer_rows"] += x.shape[0] * cond.rows
        kwargs, context = adapter.feature_call(None, reusing=False)
        with context:
            return adapter.velocity(x, t, cond, kwargs).float()

    total = None
    for t, x in zip(times, _noised(latents, times, seed), strict=True):
        v_src = velocity(x, t, source, 1)
        one_image = b == 1 and targets != 1
        xt = x.expand(targets, *x.shape[1:]) if one_image else x
        v_tgt = velocity(xt, t, target, targets if one_image else 1)
        d = (v_tgt - v_src).abs()
        total = d if total is None else total + d
    return total / len(times), cost


def cell_scores(diff: torch.Tensor, layout: CellLayout) -> torch.Tensor:
    """Per-element differences ``[T, *shape]`` -> per-cell means ``[T, rows, cols]``."""
    idx = layout.index.to(diff.device).flatten()
    flat = diff.reshape(diff.shape[0], -1)
    sums = torch.zeros(diff.shape[0], layout.cells, device=diff.device).index_add_(1, idx, flat)
    counts = torch.bincount(idx, minlength=layout.cells).clamp(min=1)
    return (sums / counts).reshape(diff.shape[0], *layout.grid).cpu()


def threshold_cells(scores: torch.Tensor, threshold: float, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each map by its high quantile, threshold, dilate by ``dilation`` cells.

    Returns ``(mask [T, rows, cols] bool, normalised scores)``. A map with no difference at all
    (identical prompts) selects every cell: the edit is then the plain one."""
    flat = scores.flatten(1)
    scale = torch.quantile(flat, QUANTILE, dim=1).clamp(min=0)
    norm = torch.where(scale[:, None] > 0, flat / scale[:, None].clamp(min=1e-30), torch.ones_like(flat))
    norm = norm.reshape(scores.shape).clamp(max=1.0)
    mask = norm >= threshold
    if dilation > 0:
        k = 2 * dilation + 1
        mask = F.max_pool2d(mask[:, None].float(), k, stride=1, padding=dilation)[:, 0] > 0.5
    empty = ~mask.flatten(1).any(1)
    mask[empty] = True
    return mask, norm


def cells_to_pixels(cells: torch.Tensor, layout: CellLayout, geometry: Geometry) -> np.ndarray:
    """``[T, rows, cols]`` -> ``[T, H, W]`` bool at the model's size."""
    fy, fx = layout.factor
    m = cells.numpy().repeat(fy, axis=1).repeat(fx, axis=2)
    return m[:, : geometry.height, : geometry.width]


def find(
    adapter: ModelAdapter,
    latents: torch.Tensor,
    geometry: Geometry,
    source: Embeds,
    target: Embeds,
    *,
    threshold: float,
    dilation: int,
    guidance: float = 1.0,
    times: Sequence[float] = TIMES,
    seed: int = SEED,
    layout: CellLayout | None = None,
) -> AutoMask:
    """The automatic mask of an edit of ``latents`` (the adapter's layout, one row, or one per
    target) from the ``source`` to the ``target`` conditioning (embeds, batch first)."""
    if not times or any(not 0.0 < float(t) <= 1.0 or math.isnan(float(t)) for t in times):
        raise ValueError(f"times must be noise levels in (0, 1], got {times!r}")
    layout = layout or cell_layout(adapter, geometry)
    src = adapter.conditioning(source, geometry, guidance)
    tgt = adapter.conditioning(target, geometry, guidance)
    with torch.no_grad():
        diff, cost = velocity_difference(adapter, latents, src, tgt, target["prompt_embeds"].shape[0], times, seed)
    scores = cell_scores(diff, layout)
    cells, norm = threshold_cells(scores, threshold, dilation)
    pixels = cells_to_pixels(cells, layout, geometry)
    latent = torch.stack([adapter.latent_mask(p[None], geometry).float() for p in pixels])
    latent = torch.broadcast_to(latent, (len(pixels), *adapter.latent_shape(geometry))).contiguous()
    return AutoMask(cells, norm, latent.to(latents.device), pixels, **cost)
