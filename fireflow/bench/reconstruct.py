"""Inversion + reconstruction: solvers x steps, no feature injection (the paper's DCI table).

Each image is inverted with its prompt and sampled back with the same prompt; the result is
compared with the source over the whole image (PSNR, SSIM, LPIPS, MSE: the PIE-Bench settings
without a mask). Writes ``results.json``, ``table.txt``, ``error_vs_nfe.png`` (the solvers' order
shows as the slope) and ``comparison_grid.png`` (source, then each solver x steps).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from fireflow.bench import _editing, _io
from fireflow.bench._main import run_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRICS = ("psnr", "ssim", "lpips", "mse")


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; the first ``limit`` of them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--images {folder}: no {', '.join(IMAGE_SUFFIXES)} files there")
    return files[:limit] if limit else files


def load_prompts(path: Path | None, images: list[Path], default: str) -> list[str]:
    """One prompt per image from a JSON object ``{file name or stem: prompt}`` or a text file of
    ``name<TAB>prompt`` lines; without a file every image gets ``default``."""
    if path is None:
        return [default] * len(images)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}: not valid JSON ({e})") from None
        if not isinstance(table, dict):
            raise ValueError(f"--prompts {path}: expected a JSON object {{image name: prompt}}")
    else:
        table = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                name, sep, prompt = line.partition("\t")
                if not sep:
                    raise ValueError(f"--prompts {path}:{n}: expected 'name<TAB>prompt', got {line[:60]!r}")
                table[name.strip()] = prompt.strip()
    prompts = []
    for img in images:
        prompt = table.get(img.name, table.get(img.stem))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"--prompts {path}: no prompt for image {img.name}")
        prompts.append(prompt)
    return prompts


def _parse_list(values: list[str], kind: type, what: str) -> list:
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(kind(part))
                except ValueError:
                    raise ValueError(f"{what} {part!r} is not a {kind.__name__}") from None
    return out


def run_reconstruct(
    editor,
    images: list[Path],
    prompts: list[str],
    solvers: list[str],
    steps: list[int],
    out: Path,
    lpips=None,
    guidance: float = 1.0,
    resize: tuple[int, int] | None = None,
    grid_rows: int = 4,
    progress: bool = True,
    model: str = "",
) -> dict[str, Any]:
    """Reconstruct every image with every solver x steps; write the JSON, table and figures."""
    from fireflow.metrics import reconstruction_metrics

    out = Path(out)
    runs = []
    thumbs: dict[str, list[Image.Image]] = {}
    rows = min(grid_rows, len(images))
    # A finished solver x steps run is kept in OUT/runs/ with what it depends on; a rerun with the
    # same inputs reuses it, so a long benchmark (1,000 DCI images x 9 runs) survives a kill.
    key = {
        "model": model,
        "guidance": guidance,
        "resize": list(resize) if resize else None,
        "images": [p.name for p in images],
        "prompts": prompts,
        "lpips": lpips is not None,
    }
    warm = False
    bar = tqdm(total=len(solvers) * len(steps) * len(images), desc="reconstruct", disable=not progress)
    for solver in solvers:
        for n in steps:
            label = f"{solver} {n}"
            cache = out / "runs" / f"{solver}-{n}.json"
            grid_dir = out / "runs" / f"{solver}-{n}"
            cached = json.loads(cache.read_text()) if cache.is_file() else None
            if cached is not None and cached.get("key") == key:
                runs.append(cached["run"])
                thumbs[label] = [_load(grid_dir / f"{i}.png") for i in range(rows)]
                bar.update(len(images))
                continue
            if not warm:
                # One throwaway call per solver first, so lazy initialisation and kernel autotuning
                # do not land in the first timed run.
                for name in solvers:
                    run = dict(solver=name, inversion_guidance=guidance, resize=resize)
                    editor.reconstruct(_load(images[0]), prompts[0], num_steps=1, **run)
                warm = True
            per_image = []
            for i, (path, prompt) in enumerate(zip(images, prompts, strict=True)):
                rec = editor.reconstruct(
                    _load(path), prompt, num_steps=n, solver=solver, inversion_guidance=guidance, resize=resize
                )
                src = np.asarray(rec.source.convert("RGB"))
                m = reconstruction_metrics(src, np.asarray(rec.image.convert("RGB")), lpips=lpips)
                per_image.append({"image": path.name, "nfe": rec.nfe, "seconds": rec.seconds, **m})
                if i < rows:
                    _io.save_image(rec.source, out / "runs" / "source" / f"{i}.png")
                    _io.save_image(rec.image, grid_dir / f"{i}.png")
                    thumbs.setdefault(label, []).append(rec.image)
                bar.update(1)
            run = {"solver": solver, "steps": n, "label": label}
            for k in ("nfe", "seconds", *METRICS):
                vals = [r[k] for r in per_image if k in r and not math.isnan(r[k])]
                run[k] = float(np.mean(vals)) if vals else None
            run["nfe"] = int(round(run["nfe"]))
            run["per_image"] = per_image
            _io.write_json(cache, {"key": key, "run": run})
            runs.append(json.loads(cache.read_text())["run"])  # as a rerun would see it (NaN -> null)
    bar.close()
    sources = [_load(out / "runs" / "source" / f"{i}.png") for i in range(rows)]
    metrics = [m for m in METRICS if runs[0][m] is not None]
    orders = fitted_orders(runs)
    result = {
        "model": model,
        "images": len(images),
        "guidance": guidance,
        "metrics": metrics,
        "order": orders,
        "runs": runs,
    }
    table = format_table(runs, metrics)
    if orders:
        table += "\nfitted order (RMSE ~ NFE^-p): " + ", ".join(f"{k} {v:.2f}" for k, v in orders.items())
    _io.write_json(out / "results.json", result)
    _io.write_text(out / "table.txt", table + "\n")
    plot_error_vs_nfe(runs, metrics, out / "error_vs_nfe.png")
    _io.save_image(comparison_grid(sources, thumbs), out / "comparison_grid.png")
    result["table"] = table
    return result


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def fitted_orders(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per solver, ``p`` in RMSE ~ NFE^-p: minus the least-squares slope of log sqrt(MSE) on log NFE.
    A global order-k solver shows p ~ k once the steps are small enough."""
    orders = {}
    for solver in dict.fromkeys(r["solver"] for r in runs):
        pts = [(r["nfe"], r["mse"]) for r in runs if r["solver"] == solver and r["mse"] and r["mse"] > 0]
        if len({n for n, _ in pts}) >= 2:
            x = np.log([n for n, _ in pts])
            y = 0.5 * np.log([m for _, m in pts])
            orders[solver] = float(-np.polyfit(x, y, 1)[0])
    return orders


def format_table(runs: list[dict[str, Any]], metrics: list[str]) -> str:
    fmt = {"psnr": "{:.2f}", "ssim": "{:.4f}", "lpips": "{:.4f}", "mse": "{:.5f}"}
    head = ["solver", "steps", "NFE", "seconds", *[m.upper() for m in metrics]]
    rows = [
        [r["solver"], str(r["steps"]), str(r["nfe"]), f"{r['seconds']:.2f}"]
        + ["-" if r[m] is None else fmt[m].format(r[m]) for m in metrics]
        for r in runs
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_error_vs_nfe(runs: list[dict[str, Any]], metrics: list[str], path: Path) -> bool:
    """MSE (and LPIPS) against NFE, log-log, one line per solver. False when matplotlib is missing."""
    plt = _io.pyplot()
    if plt is None:
        print("matplotlib is not installed: no error_vs_nfe.png (pip install matplotlib)", file=sys.stderr)
        return False
    from matplotlib.ticker import FuncFormatter

    panels = [m for m in ("mse", "lpips") if m in metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, m in zip(axes[0], panels, strict=True):
        orders = fitted_orders(runs)
        for solver in dict.fromkeys(r["solver"] for r in runs):
            pts = sorted((r["nfe"], r[m]) for r in runs if r["solver"] == solver)
            label = f"{solver} (order {orders[solver]:.2f})" if m == "mse" and solver in orders else solver
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # Minor labels at 2, 3, 5 x 10^k only, so that neighbours do not overlap.
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else ""))
        ax.set_xlabel("NFE (inversion + reconstruction)")
        ax.set_ylabel(m.upper())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Reconstruction error vs NFE")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _io.write_bytes(path, buf.getvalue())
    return True


def comparison_grid(sources: list[Image.Image], recs: dict[str, list[Image.Image]], cell: int = 160) -> Image.Image:
    """Rows: images; columns: the source, then every solver x steps, labelled on top."""
    columns = [("source", sources), *recs.items()]
    label_h = 18
    grid = Image.new("RGB", (cell * len(columns), label_h + cell * len(sources)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns):
        draw.text((c * cell + 4, 3), label, fill="black")
        for r, im in enumerate(images):
            scale = min(cell / im.width, cell / im.height)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            # Small images (the demo's 32 px) are enlarged with nearest so their pixels stay visible.
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            thumb = im.convert("RGB").resize(size, resample)
            grid.paste(thumb, (c * cell + (cell - thumb.width) // 2, label_h + r * cell + (cell - thumb.height) // 2))
    return grid


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; accepted: WIDTHxHEIGHT, e.g. 512x512")
    return int(w), int(h)


def add_parser(subparsers: argparse._SubParsersAction, name: str = "reconstruct") -> argparse.ArgumentParser:
    """Register ``reconstruct`` under ``fireflow bench``."""
    from fireflow.cli import add_model_options

    p = subparsers.add_parser(
        name,
        help="inversion + reconstruction error of solvers x steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, type=Path, help="folder of images (sorted by name)")
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="JSON {name: prompt} or 'name<TAB>prompt' lines (DCI: the official captions)",
    )
    p.add_argument("--default-prompt", default="a photo", help="prompt when no --prompts (default 'a photo')")
    p.add_argument("--out", type=Path, default=Path("runs/reconstruct"), help="output folder")
    p.add_argument("--solvers", nargs="+", default=["fireflow", "midpoint", "euler"], help="solvers to compare")
    p.add_argument("--steps", nargs="+", default=["8", "15", "30"], help="steps per pass (default 8 15 30)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance, both passes (default 1)")
    p.add_argument("--limit", type=int, default=None, help="first N images only (the paper: 1000 DCI images)")
    p.add_argument("--resize", type=_size, default=None, help="resize to WIDTHxHEIGHT first (default: crop to /16)")
    p.add_argument("--squeezenet", default=None, help="torchvision squeezenet1_1 state dict for LPIPS")
    p.add_argument("--lpips-heads", default=None, help="LPIPS v0.1 squeeze.pth (default: lpips/torchmetrics copy)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    p.set_defaults(func=reconstruct_cli)
    return p


def reconstruct_cli(args: argparse.Namespace) -> dict[str, Any]:
    """``fireflow bench reconstruct``. Bad input raises ValueError (exit status 2)."""
    from fireflow import metrics as M
    from fireflow.solvers import check_solver

    solvers = _parse_list(args.solvers, str, "--solvers")
    for s in solvers:
        check_solver(s)
    steps = _parse_list(args.steps, int, "--steps")
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps must be positive integers, got {args.steps}")
    images = list_images(args.images, args.limit)
    prompts = load_prompts(args.prompts, images, args.default_prompt)
    try:
        lpips = M.load_lpips(args.squeezenet, args.lpips_heads, args.device or _editing.default_device(0))
    except M.MissingWeightsError as e:
        print(f"lpips: skipped: {e}", file=sys.stderr)
        lpips = None
    editor = _editing.load_editor(args)
    result = run_reconstruct(
        editor,
        images,
        prompts,
        solvers,
        steps,
        args.out,
        lpips,
        args.guidance,
        args.resize,
        progress=not args.quiet,
        model=str(args.model),
    )
    print(result["table"])
    print(f"wrote {args.out}/results.json, table.txt, error_vs_nfe.png, comparison_grid.png")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m fireflow.bench.reconstruct --images DIR ...``."""
    return run_command("reconstruct", add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
