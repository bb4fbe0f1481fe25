"""An exactly known rectified flow, for tests and solver benchmarks.

Data ``x_0`` is an isotropic Gaussian mixture, noise ``x_1 ~ N(0, I)``, ``x_t = (1 - t) x_0 + t x_1``.
The velocity is the closed-form ``E[x_1 - x_0 | x_t = x]``: what an ideally trained model predicts.
Given component k, ``x_t ~ N(a mu_k, s2_k I)`` with ``a = 1 - t`` and ``s2_k = a^2 sigma_k^2 + t^2``, and
``E[x_1 - x_0 | x_t, k] = (t - a sigma_k^2) / s2_k * (x - a mu_k) - mu_k``; the mixture velocity weights
these by the posterior ``p(k | x_t)``.
"""

from __future__ import annotations

import torch


class GaussianMixtureFlow:
    """Exact velocity of the rectified flow from a Gaussian mixture to N(0, I)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = means.double()  # [K, D]
        self.stds = stds.double().reshape(-1)  # [K]
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.double()
        self.log_weights = torch.log(w / w.sum())

    @classmethod
    def random(cls, dim: int = 16, components: int = 4, spread: float = 2.0, std: float = 0.3, seed: int = 0):
        """A reproducible mixture with ``components`` modes at distance ~``spread`` from the origin."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        means = spread * means / means.norm(dim=1, keepdim=True)
        return cls(means, torch.full((components,), std, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` draws of ``x_0`` from the mixture, float64 ``[n, D]``."""
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=g)
        return self.means[k] + self.stds[k, None] * torch.randn(n, self.dim, generator=g, dtype=torch.float64)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Exact ``E[x_1 - x_0 | x_t = x]`` for a batch ``x`` of shape ``[B, D]`` (any float dtype)."""
        xd = x.double()
        a = 1.0 - t
        var0 = self.stds**2  # [K]
        s2 = a * a * var0 + t * t  # [K]
        diff = xd[:, None, :] - a * self.means[None]  # [B, K, D]
        logp = self.log_weights - 0.5 * self.dim * torch.log(s2) - 0.5 * (diff**2).sum(-1) / s2
        post = torch.softmax(logp, dim=1)  # [B, K]
        v_k = ((t - a * var0) / s2)[None, :, None] * diff - self.means[None]
        return (post[..., None] * v_k).sum(1).to(x.dtype)

    __call__ = velocity
