"""Time grids from t = 1 (noise) to t = 0 (image), family-free.

Each model family computes its own grid from its pipeline's scheduler config
(``ModelAdapter.timesteps``); these are the plain building blocks.
"""

from __future__ import annotations

import math

import torch


def linear_timesteps(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0, num_steps + 1)`` in float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def shifted_timesteps(num_steps: int, mu: float) -> torch.Tensor:
    """The linear grid with the exponential time shift ``t -> e^mu / (e^mu + 1/t - 1)`` applied to
    every point but 0, as diffusers' flow-matching schedulers apply it with dynamic shifting."""
    ts = linear_timesteps(num_steps)
    e_mu = math.exp(mu)
    head = ts[:-1]
    return torch.cat([e_mu / (e_mu + (1 / head - 1)), ts[-1:]])
