"""Inversion -> reconstruction error against NFE for each solver, on an exactly known flow.

    python -m research.solvers --out runs/solvers

The flow is :class:`fireflow.analytic.GaussianMixtureFlow`, whose velocity is the exact
conditional mean: an ideally trained model. Each solver inverts data samples to noise and samples
them back on the same grid; the error is the mean relative L2 distance to the input. Also reports
the measured global order of one sampling pass against a fine reference solution.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from fireflow._io import atomic_write
from fireflow.analytic import GaussianMixtureFlow
from fireflow.bench import _io
from fireflow.schedules import linear_timesteps, shifted_timesteps
from fireflow.solvers import SOLVERS, nfe, sample

STEPS = (4, 8, 15, 30, 60)


def grid(kind: str, n: int) -> torch.Tensor:
    # "flux": FLUX.1-dev's shifted grid for a 512x512 image (1024 tokens: mu = 0.5 + 0.65 * 768 / 3840).
    return shifted_timesteps(n, 0.63) if kind == "flux" else linear_timesteps(n)


def reconstruction_error(flow: GaussianMixtureFlow, x0: torch.Tensor, solver: str, ts: torch.Tensor) -> float:
    noise = sample(flow, x0, ts.flip(0), solver)
    back = sample(flow, noise, ts, solver)
    return ((back - x0).norm(dim=1) / x0.norm(dim=1)).mean().item()


def global_orders(flow: GaussianMixtureFlow, steps=(64, 128, 256), seed: int = 0) -> dict[str, float]:
    """Per solver, the least-squares slope of log error vs log N for one noise -> data pass
    (linear grid), against a midpoint solution with 4096 steps."""
    x1 = torch.randn(128, flow.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = sample(flow, x1, linear_timesteps(4096), "midpoint")
    return {s: _slope(flow, x1, ref, s, steps) for s in SOLVERS}


def _slope(flow, x1, ref, solver, steps) -> float:
    xs = [math.log(n) for n in steps]
    ys = [math.log((sample(flow, x1, linear_timesteps(n), solver) - ref).norm().item()) for n in steps]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(grid_kind: str = "flux", samples: int = 256, seed: int = 0) -> dict:
    flow = GaussianMixtureFlow.random(dim=16, components=4, spread=2.0, std=0.3, seed=seed)
    x0 = flow.sample_data(samples, seed=seed + 1)
    rows = []
    for solver in SOLVERS:
        for n in STEPS:
            err = reconstruction_error(flow, x0, solver, grid(grid_kind, n))
            rows.append({"solver": solver, "steps": n, "nfe": 2 * nfe(solver, n), "error": err})
    # The equal-cost comparison: FireFlow 8 steps vs Euler 9 steps, both 18 NFE per round trip.
    ff8 = reconstruction_error(flow, x0, "fireflow", grid(grid_kind, 8))
    eu9 = reconstruction_error(flow, x0, "euler", grid(grid_kind, 9))
    mid4 = reconstruction_error(flow, x0, "midpoint", grid(grid_kind, 4))
    return {
        "flow": {"kind": "gaussian_mixture", "dim": 16, "components": 4, "spread": 2.0, "std": 0.3, "seed": seed},
        "grid": grid_kind,
        "samples": samples,
        "rows": rows,
        "equal_nfe_18": {"fireflow_8": ff8, "euler_9": eu9, "midpoint_4": mid4, "fireflow_over_euler": ff8 / eu9},
        "global_order": global_orders(flow),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def table(result: dict) -> str:
    by = {(r["solver"], r["steps"]): r for r in result["rows"]}
    head = "| solver | " + " | ".join(f"N={n}" for n in STEPS) + " | order |"
    lines = [head, "|" + "---|" * (len(STEPS) + 2)]
    for s in SOLVERS:
        cells = [f"{by[s, n]['error']:.2e} ({by[s, n]['nfe']})" for n in STEPS]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {result['global_order'][s]:.2f} |")
    e = result["equal_nfe_18"]
    lines.append("")
    lines.append(
        f"At 18 NFE per round trip: fireflow 8 steps {e['fireflow_8']:.2e}, euler 9 steps {e['euler_9']:.2e}, "
        f"midpoint 4 steps {e['midpoint_4']:.2e}; fireflow / euler = {e['fireflow_over_euler']:.3f}"
    )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    plt = _io.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in SOLVERS:
        rows = [r for r in result["rows"] if r["solver"] == s]
        ax.loglog(
            [r["nfe"] for r in rows],
            [r["error"] for r in rows],
            "o-",
            label=f"{s} (order {result['global_order'][s]:.2f})",
        )
    ax.set_xlabel("NFE per inversion + reconstruction")
    ax.set_ylabel("relative reconstruction error")
    ax.set_title(f"Analytic mixture flow, {result['grid']} grid")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/solvers", help="folder for solvers.json and solvers.png")
    p.add_argument("--grid", default="flux", choices=["flux", "linear"], help="time grid (default: FLUX at 512x512)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def _run_cli(args: argparse.Namespace) -> None:
    result = run(args.grid, args.samples, args.seed)
    print(table(result))
    out = Path(args.out)
    atomic_write(out / "solvers.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    plotted = plot(result, out / "solvers.png")
    print(f"wrote {out / 'solvers.json'}" + (f" and {out / 'solvers.png'}" if plotted else " (no matplotlib: no plot)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.solvers", description=__doc__.splitlines()[0])
    _add_arguments(p)
    _run_cli(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
