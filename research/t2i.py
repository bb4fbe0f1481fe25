"""Text-to-image on the demo model: FireFlow against Euler and the midpoint rule at matched model calls.

    python -m research.t2i --out runs/t2i

The paper's text-to-image claim (FireFlow at 10 steps, 11 NFE, beats FLUX's Euler at 20 steps) measured
on the bundled demo model, for N in {5, 10, 20}:

- **sampling error**: every setting starts from the same noise as a 256-step FireFlow reference on
  the same grid family (the editor's FLUX-shifted grid at the model's 64 tokens); the error is the
  relative L2 distance of the final latents to the reference's, and the PSNR of the decoded image
  against the reference image;
- **prompt fidelity**: is the prompt's own emoji the generated image's nearest training image
  (pixel L2, as ``research.bundled.quality`` scores generation)? Top-1 and top-5.

Settings per N: Euler N (N calls), midpoint ceil(N/2) (2 ceil(N/2)), FireFlow N (N + 1), Euler N + 1
(FireFlow's calls exactly) and Euler 2N. The verdict compares FireFlow N with Euler N + 1. Also checks,
for one setting, that ``FireFlowScheduler`` in diffusers' ``FluxPipeline`` around the same transformer
gives the editor's FireFlow result. Prints a markdown table; writes ``t2i.json`` and ``t2i.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fireflow.bench import _io
from fireflow.bench._io import write_json
from fireflow.models.base import Geometry
from fireflow.solvers import nfe

STEPS = (5, 10, 20)
REFERENCE = ("fireflow", 256)
PROMPTS = 32
SIDE = 32


def settings(n: int) -> list[tuple[str, int]]:
    """(solver, steps) compared at N, in order of model calls (Euler N + 1 is Euler 2N at N = 1)."""
    rows = [("euler", n), ("midpoint", math.ceil(n / 2)), ("fireflow", n), ("euler", n + 1), ("euler", 2 * n)]
    return list(dict.fromkeys(rows))


class _Demo:
    """The demo model, its prompts and training images, one fixed noise per prompt."""

    def __init__(self, num_prompts: int, seed: int, weights: str | None = None):
        from fireflow.editor import FireFlowEditor
        from fireflow.models.demo import DemoAdapter
        from research.bundled import emoji as emoji_data

        self.adapter = DemoAdapter.from_pretrained(weights)
        self.editor = FireFlowEditor(adapter=self.adapter)
        data = emoji_data.load()
        self.pixels01 = (torch.from_numpy(data.pixels()) + 1) / 2  # [233, 3, 32, 32], the nearest-image set
        n = len(data)
        num_prompts = min(num_prompts, n)
        # Evenly spread over the set, so every family is represented.
        self.index = torch.linspace(0, n - 1, num_prompts).round().long()
        self.prompts = [data.prompts[i] for i in self.index.tolist()]
        self.embeds = self.adapter.encode_prompt(self.prompts)  # prompt_embeds, pooled_prompt_embeds
        shape = (num_prompts, *self.adapter.latent_shape(Geometry(SIDE, SIDE)))
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def sample(self, solver: str, steps: int) -> torch.Tensor:
        return self.editor.sample_latents(self.noise, SIDE, SIDE, num_steps=steps, solver=solver, **self.embeds).float()

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.adapter.decode(latents, Geometry(SIDE, SIDE))[:, 0].float() + 1) / 2

    def fidelity(self, images: torch.Tensor) -> tuple[float, float]:
        from research.bundled.quality import nearest

        ranks = nearest(images, self.pixels01, k=5)
        own = self.index[:, None]
        return (ranks[:, :1] == own).any(1).float().mean().item(), (ranks == own).any(1).float().mean().item()


def scheduler_check(demo: _Demo, steps: int) -> float:
    """Max relative difference between FireFlowScheduler in diffusers' FluxPipeline (around the demo
    transformer, with the scheduler config the editor's grid comes from) and the editor's FireFlow
    sampling, over the prompts."""
    from diffusers import FluxPipeline

    from fireflow.scheduler import FireFlowScheduler

    scheduler = FireFlowScheduler.from_config(demo.adapter.scheduler_config)
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    pipe = FluxPipeline(scheduler=scheduler, transformer=demo.adapter.transformer, **none)
    pipe.set_progress_bar_config(disable=True)
    # Without a VAE FluxPipeline assumes 8x downsampling and 2x2 packing: 16 pixels per token, so
    # 128 "pixels" give the demo's 8x8 token grid with FLUX's (0, row, column) ids.
    tokens = int(demo.noise.shape[1] ** 0.5)
    out = pipe(
        **demo.embeds,
        latents=demo.noise,
        height=16 * tokens,
        width=16 * tokens,
        num_inference_steps=steps,
        output_type="latent",
    ).images
    ref = demo.sample("fireflow", steps)
    return ((out.float() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()


def run(
    steps: tuple[int, ...] = STEPS,
    num_prompts: int = PROMPTS,
    seed: int = 0,
    reference: tuple[str, int] = REFERENCE,
    weights: str | None = None,
    check_steps: int | None = 10,
) -> dict:
    demo = _Demo(num_prompts, seed, weights)
    t0 = time.perf_counter()
    ref = demo.sample(*reference)
    ref_seconds = time.perf_counter() - t0
    ref_images = demo.images(ref)
    ref_top1, ref_top5 = demo.fidelity(ref_images)
    cache: dict[tuple[str, int], dict] = {}
    for n in steps:
        for solver, k in settings(n):
            if (solver, k) in cache:
                continue
            t0 = time.perf_counter()
            x = demo.sample(solver, k)
            seconds = time.perf_counter() - t0
            images = demo.images(x)
            err = (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
            mse = (images - ref_images).pow(2).flatten(1).mean(1).clamp(min=1e-12)
            top1, top5 = demo.fidelity(images)
            cache[solver, k] = {
                "solver": solver,
                "steps": k,
                "nfe": nfe(solver, k),
                "error": err.mean().item(),
                "error_max": err.max().item(),
                "psnr": (10 * torch.log10(1 / mse)).mean().item(),
                "top1": top1,
                "top5": top5,
                "seconds": round(seconds, 2),
            }
    groups = []
    for n in steps:
        rows = [cache[s] for s in settings(n)]
        ff, eq = cache["fireflow", n], cache["euler", n + 1]
        groups.append(
            {
                "n": n,
                "rows": [f"{r['solver']}-{r['steps']}" for r in rows],
                "fireflow_over_euler_equal_calls": ff["error"] / eq["error"],
                "fireflow_over_euler_2n": ff["error"] / cache["euler", 2 * n]["error"],
                "fireflow_beats_euler_equal_calls": ff["error"] < eq["error"],
                "fireflow_beats_euler_2n": ff["error"] < cache["euler", 2 * n]["error"],
            }
        )
    ff_err = [cache["fireflow", n]["error"] for n in steps]
    order = -math.log(ff_err[-1] / ff_err[-2]) / math.log(steps[-1] / steps[-2]) if len(steps) > 1 else None
    result = {
        "model": "demo" if weights is None else str(weights),
        "size": SIDE,
        "prompts": demo.prompts,
        "num_prompts": len(demo.prompts),
        "seed": seed,
        "grid": "the editor's: FLUX.1-dev shift at 64 image tokens",
        "reference": {
            "solver": reference[0],
            "steps": reference[1],
            "nfe": nfe(*reference),
            "top1": ref_top1,
            "top5": ref_top5,
            "seconds": round(ref_seconds, 1),
            # FireFlow's error at the two largest N gives its order p here; the reference's own error is
            # then about err(N_max) * (N_max / 256)^p.
            "fireflow_order": order,
            "estimated_error": ff_err[-1] * (steps[-1] / reference[1]) ** order if order else None,
        },
        "rows": sorted(cache.values(), key=lambda r: (r["nfe"], r["solver"])),
        "groups": groups,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    if check_steps:
        result["scheduler_check"] = {"steps": check_steps, "max_rel_diff": scheduler_check(demo, check_steps)}
    return result


def table(result: dict) -> str:
    by = {(r["solver"], r["steps"]): r for r in result["rows"]}
    lines = [
        "| N | setting | model calls | error vs reference | PSNR vs reference (dB) | prompt fidelity top-1 | top-5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in result["groups"]:
        for label in g["rows"]:
            solver, steps = label.rsplit("-", 1)
            r = by[solver, int(steps)]
            name = f"**FireFlow {steps}**" if solver == "fireflow" else f"{solver.capitalize()} {steps}"
            lines.append(
                f"| {g['n']} | {name} | {r['nfe']} | {r['error']:.2e} | {r['psnr']:.1f} | "
                f"{r['top1']:.1%} | {r['top5']:.1%} |"
            )
    ref = result["reference"]
    own = ""
    if ref["estimated_error"] is not None:
        own = (
            f"; its own error is about {ref['estimated_error']:.0e} (FireFlow's measured order "
            f"{ref['fireflow_order']:.2f} extrapolated to {ref['steps']} steps)"
        )
    lines.append("")
    lines.append(
        f"Reference: {ref['solver']} {ref['steps']} steps ({ref['nfe']} calls), fidelity top-1 {ref['top1']:.1%}, "
        f"top-5 {ref['top5']:.1%}{own}. {result['num_prompts']} prompts, one noise each, same noise for every row."
    )
    for g in result["groups"]:
        n = g["n"]
        verdict = "beats" if g["fireflow_beats_euler_equal_calls"] else "does NOT beat"
        v2 = "beats" if g["fireflow_beats_euler_2n"] else "does NOT beat"
        lines.append(
            f"- N={n}: FireFlow {n} ({n + 1} calls) {verdict} Euler {n + 1} at equal calls "
            f"(error ratio {g['fireflow_over_euler_equal_calls']:.2f}) and {v2} Euler {2 * n} ({2 * n} calls, "
            f"ratio {g['fireflow_over_euler_2n']:.2f})."
        )
    if "scheduler_check" in result:
        c = result["scheduler_check"]
        lines.append(
            f"- FireFlowScheduler in diffusers' FluxPipeline around the same transformer, {c['steps']} steps: "
            f"max relative difference to the table's FireFlow {c['steps']} = {c['max_rel_diff']:.1e}."
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    plt = _io.pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from fireflow._io import atomic_write

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4))
    for solver, style in (("euler", "s-"), ("midpoint", "^-"), ("fireflow", "o-")):
        rows = sorted((r for r in result["rows"] if r["solver"] == solver), key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rows]
        ax1.loglog(x, [r["error"] for r in rows], style, label=solver)
        ax2.semilogx(x, [r["psnr"] for r in rows], style, label=solver)
        ax3.semilogx(x, [100 * r["top1"] for r in rows], style, label=solver)
    ax3.axhline(100 * result["reference"]["top1"], color="grey", ls=":", label="256-step reference")
    ax1.set_ylabel("relative error vs 256-step reference")
    ax2.set_ylabel("PSNR vs reference image (dB)")
    ax3.set_ylabel("prompt fidelity top-1 (%)")
    ax3.set_ylim(0, 105)
    ticks = sorted({g["n"] for g in result["groups"]} | {2 * g["n"] for g in result["groups"]})
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("model calls (NFE)")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Text-to-image on the demo model ({result['num_prompts']} prompts, same noise)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/t2i", help="folder for t2i.json and t2i.png")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="N values (default 5 10 20)")
    p.add_argument("--prompts", type=int, default=PROMPTS, help=f"prompts, spread over the 233 (default {PROMPTS})")
    p.add_argument("--reference-steps", type=int, default=REFERENCE[1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="a demo-model folder (default: the bundled weights)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the demo model runs fastest on one)")
    p.add_argument("--no-scheduler-check", action="store_true", help="skip the FluxPipeline cross-check")


def _run_cli(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    steps = tuple(sorted(set(args.steps)))
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps must be positive integers, got {args.steps}")
    if args.prompts < 1 or args.reference_steps < 2:
        raise ValueError("--prompts must be >= 1 and --reference-steps >= 2")
    start = time.perf_counter()
    result = run(
        steps,
        args.prompts,
        args.seed,
        ("fireflow", args.reference_steps),
        args.weights,
        check_steps=None if args.no_scheduler_check else min(10, max(steps)),
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = table(result)
    print(text)
    out = Path(args.out)
    write_json(out / "t2i.json", result)
    plotted = plot(result, out / "t2i.png")
    print(f"wrote {out / 't2i.json'}" + (f" and {out / 't2i.png'}" if plotted else " (no matplotlib: no plot)"))


def main(argv: list[str] | None = None) -> int:
    from fireflow.bench._main import run_main

    p = argparse.ArgumentParser(prog="python -m research.t2i", description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=_run_cli)
    return run_main(p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
