"""Time grids from t = 1 (noise) to t = 0 (image)."""

from __future__ import annotations

import math

import torch


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift: linear in the packed image-token count, extrapolated."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def linear_timesteps(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0, num_steps + 1)`` in float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def flux_timesteps(num_steps: int, image_seq_len: int | None = None, shift: bool = True) -> torch.Tensor:
    """The FLUX.1-dev grid: ``linspace(1, 0, N + 1)`` with ``t -> e^mu / (e^mu + 1/t - 1)`` applied
    to every point but 0. ``shift=False`` (FLUX.1-schnell) gives the plain linear grid."""
    ts = linear_timesteps(num_steps)
    if not shift:
        return ts
    if image_seq_len is None:
        raise ValueError("flux_timesteps with shift=True needs image_seq_len (packed image tokens)")
    e_mu = math.exp(flux_mu(image_seq_len))
    head = ts[:-1]
    return torch.cat([e_mu / (e_mu + (1 / head - 1)), ts[-1:]])
