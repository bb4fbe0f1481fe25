import math

import pytest
import torch

from fireflow.analytic import GaussianMixtureFlow
from fireflow.schedules import linear_timesteps, shifted_timesteps
from fireflow.solvers import SOLVERS, nfe, sample


@pytest.fixture(scope="module")
def flow():
    return GaussianMixtureFlow.random(dim=16, components=4, spread=2.0, std=0.3, seed=0)


class Recorder:
    def __init__(self, velocity):
        self.velocity, self.calls = velocity, []

    def __call__(self, x, t):
        return self.velocity(x, t)

    def hook(self, call):
        self.calls.append(call)
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize(
    "solver,expected", [("euler", lambda n: n), ("midpoint", lambda n: 2 * n), ("fireflow", lambda n: n + 1)]
)
@pytest.mark.parametrize("n", [1, 4, 8, 15])
def test_nfe_counts(flow, solver, expected, n):
    rec = Recorder(flow)
    sample(rec, torch.zeros(2, flow.dim), linear_timesteps(n), solver, call_hook=rec.hook)
    assert len(rec.calls) == expected(n) == nfe(solver, n)


def test_fireflow_call_sequence(flow):
    rec = Recorder(flow)
    ts = shifted_timesteps(4, 0.63)
    sample(rec, torch.zeros(1, flow.dim), ts, "fireflow", call_hook=rec.hook)
    assert [(c.step, c.kind) for c in rec.calls] == [
        (0, "start"),
        (0, "midpoint"),
        (1, "midpoint"),
        (2, "midpoint"),
        (3, "midpoint"),
    ]
    mid = rec.calls[1]
    assert mid.t == pytest.approx((ts[0] + ts[1]).item() / 2)
    assert mid.interval == (ts[1].item(), ts[0].item())


def test_interval_is_direction_free(flow):
    """An inversion step and the denoising step over the same interval report the same interval."""
    fwd, bwd = Recorder(flow), Recorder(flow)
    ts = shifted_timesteps(3, 1.15)
    sample(fwd, torch.zeros(1, flow.dim), ts, "midpoint", call_hook=fwd.hook)
    sample(bwd, torch.zeros(1, flow.dim), ts.flip(0), "midpoint", call_hook=bwd.hook)
    assert {(c.interval, c.kind) for c in fwd.calls} == {(c.interval, c.kind) for c in bwd.calls}


def _reconstruction_error(flow, x0, solver, n):
    ts = linear_timesteps(n)
    noise = sample(flow, x0, ts.flip(0), solver)
    back = sample(flow, noise, ts, solver)
    return ((back - x0).norm(dim=1) / x0.norm(dim=1)).mean().item()


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_inversion_then_sampling_returns_input(flow, solver):
    x0 = flow.sample_data(64, seed=1)
    errors = [_reconstruction_error(flow, x0, solver, n) for n in (4, 8, 16, 32)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1


def test_fireflow_beats_euler_at_equal_nfe(flow):
    """Issue 2's bar: FireFlow 8 steps (18 NFE per edit) <= 0.1x Euler 9 steps (18 NFE)."""
    x0 = flow.sample_data(256, seed=2)
    ff = _reconstruction_error(flow, x0, "fireflow", 8)
    eu = _reconstruction_error(flow, x0, "euler", 9)
    assert ff <= 0.1 * eu, (ff, eu)


def _global_order(flow, solver):
    """Slope of log error against log step size for one sampling pass, noise -> data."""
    x1 = torch.randn(128, flow.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = linear_timesteps
    reference = sample(flow, x1, grid(8192), "midpoint")
    # The order is asymptotic: below ~64 steps the mixture's curvature near t = 0 still shows.
    ns = [64, 128, 256]
    errs = [(sample(flow, x1, grid(n), solver) - reference).norm().item() for n in ns]
    slope = -(math.log(errs[-1]) - math.log(errs[0])) / (math.log(ns[-1]) - math.log(ns[0]))
    return slope, errs


@pytest.mark.parametrize("solver,lo,hi", [("euler", 0.9, 1.1), ("midpoint", 1.8, 2.2), ("fireflow", 1.8, 2.2)])
def test_global_order_of_convergence(flow, solver, lo, hi):
    slope, errs = _global_order(flow, solver)
    assert lo <= slope <= hi, (slope, errs)


def test_state_keeps_fp32_while_model_runs_bf16(flow):
    x1 = torch.randn(32, flow.dim, generator=torch.Generator().manual_seed(4))
    seen = []

    def bf16_model(x, t):
        seen.append(x.dtype)
        return flow(x.to(torch.bfloat16), t)  # a bf16 network: bf16 in, bf16 out

    ts = linear_timesteps(8)
    out = sample(bf16_model, x1, ts, "fireflow")
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    exact = sample(flow, x1.double(), ts, "fireflow")
    all_bf16 = sample(bf16_model, x1.to(torch.bfloat16), ts, "fireflow").double()
    err_fp32_state = (out.double() - exact).norm() / exact.norm()
    err_bf16_state = (all_bf16 - exact).norm() / exact.norm()
    assert err_fp32_state < err_bf16_state


def test_callback_and_progress(flow):
    seen = []
    x = torch.zeros(1, flow.dim)
    ts = linear_timesteps(5)
    a = sample(flow, x, ts, "fireflow", callback=lambda i, t, xi: seen.append((i, t)), progress=True)
    b = sample(flow, x, ts, "fireflow")
    assert [i for i, _ in seen] == list(range(5))
    assert [t for _, t in seen] == pytest.approx(ts[1:].tolist())
    assert torch.equal(a, b)


def test_bad_inputs(flow):
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        sample(flow, torch.zeros(1, flow.dim), linear_timesteps(2), "rk4")
    with pytest.raises(ValueError, match="at least 2"):
        sample(flow, torch.zeros(1, flow.dim), [1.0], "euler")
    with pytest.raises(ValueError, match="shape"):
        sample(lambda x, t: x[:, :2], torch.zeros(1, flow.dim), [1.0, 0.0], "euler")


def test_shifted_schedule_matches_the_512_flux_example():
    expected = [1, 0.9293, 0.8492, 0.7578, 0.6525, 0.5298, 0.3849, 0.2115, 0]
    assert shifted_timesteps(8, 0.63).tolist() == pytest.approx(expected, abs=5e-5)
    assert shifted_timesteps(8, 0.0).tolist() == pytest.approx([1 - i / 8 for i in range(9)])
    assert torch.equal(linear_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_analytic_velocity_is_the_conditional_mean():
    """Monte Carlo check of E[x1 - x0 | x_t] on a one-component mixture (a Gaussian)."""
    flow = GaussianMixtureFlow(torch.tensor([[1.0, -2.0]]), torch.tensor([0.5]))
    g = torch.Generator().manual_seed(0)
    t = 0.4
    x0 = flow.sample_data(200_000, seed=5)
    x1 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = (1 - t) * x0 + t * x1
    # Regress x1 - x0 on x_t: for a Gaussian the conditional mean is affine, so least squares is exact.
    design = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, x1 - x0).solution
    probe = torch.tensor([[0.3, -1.0]], dtype=torch.float64)
    mc = torch.cat([probe, torch.ones(1, 1, dtype=torch.float64)], 1) @ coef
    assert torch.allclose(flow(probe, t), mc, atol=2e-2)
