"""Measure the demo model: prompt fidelity, reconstruction at equal NFE, and editing success.

    python -m research.bundled.quality --out /work/runs/quality [--weights DIR]

- **Prompt fidelity**: every prompt is generated (FireFlow, 8 steps, one fixed noise per prompt);
  is the prompt's own emoji the nearest training image (pixel L2)? Top-1 and top-5.
- **Reconstruction**: every training emoji is inverted and sampled back with its own prompt,
  no injection: FireFlow 8 vs Euler 9 (18 NFE each) vs midpoint 4 and 5 (16 and 20 NFE: the
  midpoint rule costs 2 per step, so no step count gives 18), FireFlow 15 vs Euler 16 (32 NFE).
  PSNR and SSIM on [0, 1] images.
- **Editing**: for each within-family pair in :data:`EDIT_PAIRS`, edit the source emoji to the
  target prompt at the default settings (8 steps, FireFlow, replace_v in all single blocks) for
  inject 0..3; success when the edited image's nearest training emoji is the target.

Writes ``quality.json``, ``edits.png`` (source | edit at inject 0..3 | target) and
``generated.png``, and prints tables. Everything is batched: one pass per setting. Threads
default to 1, as in training (a busy 2-core machine runs the tiny model fastest on one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fireflow._io import atomic_write
from fireflow.models.base import Geometry
from fireflow.models.demo import DemoAdapter
from research.bundled import emoji as emoji_data

#: Within-family edits (source prompt, target prompt): colour changes, animal swaps, expressions.
EDIT_PAIRS: list[tuple[str, str]] = [
    ("red heart", "blue heart"),
    ("yellow heart", "green heart"),
    ("red heart", "purple heart"),
    ("blue heart", "orange heart"),
    ("green heart", "pink heart"),
    ("white heart", "black heart"),
    ("cat face", "dog face"),
    ("dog face", "cat face"),
    ("tiger face", "lion"),
    ("mouse face", "hamster"),
    ("cow face", "pig face"),
    ("panda", "bear"),
    ("fox", "wolf"),
    ("grinning face", "winking face"),
    ("slightly smiling face", "slightly frowning face"),
    ("neutral face", "expressionless face"),
    ("angry face", "enraged face"),
    ("smiling face with sunglasses", "nerd face"),
    ("grinning cat", "pouting cat"),
    ("red apple", "green apple"),
    ("tangerine", "lemon"),
    ("grapes", "blueberries"),
    ("peach", "tangerine"),
    ("sun", "sun with face"),
    ("cloud", "cloud with rain"),
    ("cloud with rain", "cloud with snow"),
    ("snowman", "snowman without snow"),
]

#: Candidate edits of the images in ``examples/`` (file stem, source prompt, target prompt), run
#: through the image API as the CLI runs them; the ones that land are listed in examples/README.md.
EXAMPLE_EDITS: list[tuple[str, str, str]] = [
    ("red_heart", "red heart", "blue heart"),
    ("red_heart", "red heart", "green heart"),
    ("red_heart", "red heart", "purple heart"),
    ("red_heart", "red heart", "broken heart"),
    ("yellow_heart", "yellow heart", "green heart"),
    ("cat_face", "cat face", "dog face"),
    ("cat_face", "cat face", "tiger face"),
    ("cat_face", "cat face", "fox"),
    ("grinning_face", "grinning face", "winking face"),
    ("grinning_face", "grinning face", "smiling face with sunglasses"),
    ("grinning_face", "grinning face", "loudly crying face"),
    ("red_apple", "red apple", "green apple"),
    ("red_apple", "red apple", "tomato"),
    ("cloud", "cloud", "cloud with rain"),
    ("cloud", "cloud", "cloud with snow"),
]

#: Reconstruction settings compared at equal NFE: (label, solver, steps).
RECON_SETTINGS: list[tuple[str, str, int]] = [
    ("fireflow-8", "fireflow", 8),
    ("euler-9", "euler", 9),
    ("midpoint-4", "midpoint", 4),  # 16 NFE: the midpoint rule's nearest step count to 18
    ("midpoint-5", "midpoint", 5),  # 20 NFE, bracketing 18 from above
    ("fireflow-15", "fireflow", 15),
    ("euler-16", "euler", 16),
]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B, 3, H, W]`` images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return 10 * torch.log10(1 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of ``[B, 3, H, W]`` images in [0, 1]: Gaussian window 11, sigma 1.5,
    k1 0.01, k2 0.03, data range 1, valid region only (as skimage / torchmetrics compute it)."""
    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).to(a.dtype)
    c = a.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def nearest(images: torch.Tensor, reference: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` nearest reference images by pixel L2."""
    d = torch.cdist(images.flatten(1).double(), reference.flatten(1).double())
    return d.topk(k, dim=1, largest=False).indices


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class Quality:
    """The three measurements over one adapter, sharing encoded data and prompts."""

    def __init__(self, adapter: DemoAdapter, batch_size: int = 128, seed: int = 0):
        from fireflow.editor import FireFlowEditor

        self.adapter = adapter
        self.editor = FireFlowEditor(adapter=adapter)
        self.data = emoji_data.load()
        self.batch_size, self.seed = batch_size, seed
        self.pixels = torch.from_numpy(self.data.pixels())  # [N, 3, H, W] in [-1, 1]
        self.side = self.pixels.shape[-1]
        self.latents = adapter.encode_image(self.pixels[:, None])
        e = adapter.encode_prompt(self.data.prompts)
        self.embeds, self.pooled = e["prompt_embeds"], e["pooled_prompt_embeds"]

    def _decode01(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.adapter.decode(latents, Geometry(self.side, self.side))[:, 0].cpu().float() + 1) / 2

    def generate(self, num_steps: int = 8) -> tuple[dict, torch.Tensor]:
        n = len(self.data)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.latents.shape, generator=g)
        out = []
        for s in _batches(n, self.batch_size):
            out.append(
                self.editor.sample_latents(
                    noise[s],
                    self.side,
                    self.side,
                    prompt_embeds=self.embeds[s],
                    pooled_prompt_embeds=self.pooled[s],
                    num_steps=num_steps,
                )
            )
        images = self._decode01(torch.cat(out))
        ranks = nearest(images, (self.pixels + 1) / 2, k=5)
        own = torch.arange(n)[:, None]
        top1 = (ranks[:, :1] == own).any(1)
        top5 = (ranks == own).any(1)
        misses = [
            {"prompt": self.data.prompts[i], "nearest": self.data.prompts[int(ranks[i, 0])]}
            for i in range(n)
            if not top1[i]
        ]
        result = {
            "num_steps": num_steps,
            "solver": "fireflow",
            "n": n,
            "top1": top1.float().mean().item(),
            "top5": top5.float().mean().item(),
            "top1_by_family": _by_family(top1, self.data.families),
            "top5_by_family": _by_family(top5, self.data.families),
            "top1_misses": misses,
        }
        return result, images

    def reconstruct(self, solver: str, num_steps: int) -> dict:
        n, out = len(self.data), []
        for s in _batches(n, self.batch_size):
            kw = dict(prompt_embeds=self.embeds[s], pooled_prompt_embeds=self.pooled[s], num_steps=num_steps)
            noise = self.editor.invert_latents(self.latents[s], self.side, self.side, solver=solver, **kw)
            out.append(self.editor.sample_latents(noise, self.side, self.side, solver=solver, **kw))
        rec = self._decode01(torch.cat(out))
        ref = (self.pixels + 1) / 2
        p, q = psnr(rec, ref), ssim(rec, ref)
        from fireflow.solvers import nfe

        return {
            "solver": solver,
            "num_steps": num_steps,
            "nfe": 2 * nfe(solver, num_steps),
            "psnr": p.mean().item(),
            "psnr_min": p.min().item(),
            "ssim": q.mean().item(),
            "psnr_by_family": _by_family(p, self.data.families),
        }

    def edit(self, pairs: list[tuple[str, str]], inject: int, num_steps: int = 8) -> tuple[dict, torch.Tensor]:
        src = torch.tensor([self.data.index(a) for a, _ in pairs])
        tgt = torch.tensor([self.data.index(b) for _, b in pairs])
        latents = self.editor.edit_latents(
            latents=self.latents[src],
            height=self.side,
            width=self.side,
            source_prompt_embeds=self.embeds[src],
            source_pooled_prompt_embeds=self.pooled[src],
            target_prompt_embeds=self.embeds[tgt],
            target_pooled_prompt_embeds=self.pooled[tgt],
            num_steps=num_steps,
            inject=inject,
        )
        images = self._decode01(latents)
        ref = (self.pixels + 1) / 2
        top = nearest(images, ref, k=1)[:, 0]
        hit = top == tgt
        rows = [
            {
                "source": a,
                "target": b,
                "nearest": self.data.prompts[int(top[i])],
                "success": bool(hit[i]),
                "psnr_to_target": psnr(images[i : i + 1], ref[tgt[i] : tgt[i] + 1]).item(),
                "psnr_to_source": psnr(images[i : i + 1], ref[src[i] : src[i] + 1]).item(),
            }
            for i, (a, b) in enumerate(pairs)
        ]
        result = {
            "inject": inject,
            "num_steps": num_steps,
            "success": hit.float().mean().item(),
            "pairs": rows,
        }
        return result, images

    def examples(self, folder: Path, edits: list[tuple[str, str, str]] = EXAMPLE_EDITS) -> tuple[list, list]:
        """The example edits through ``editor.edit`` at its defaults, from the PNG files."""
        from fireflow.image import to_tensor

        ref = (self.pixels + 1) / 2
        rows, images = [], []
        for stem, source, target in edits:
            out = self.editor.edit(folder / f"{stem}.png", source, target)
            img = (to_tensor(out.image) + 1) / 2
            top = int(nearest(img, ref, k=1)[0, 0])
            rows.append(
                {
                    "command": f'fireflow edit examples/{stem}.png -s "{source}" -t "{target}"'
                    f" -o {target.replace(' ', '_')}.png",
                    "nearest": self.data.prompts[top],
                    "success": self.data.prompts[top] == target,
                    "seconds": round(out.seconds, 2),
                }
            )
            images.append(img)
        return rows, images


def _by_family(values: torch.Tensor, families: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in dict.fromkeys(families):
        mask = torch.tensor([f == fam for f in families])
        out[fam] = values[mask].float().mean().item()
    return out


def to_grid(columns: list[torch.Tensor], scale: int = 3, pad: int = 2) -> Image.Image:
    """Images ``[R, 3, H, W]`` in [0, 1] per column -> one grid, rows aligned, on grey."""
    rows, _, h, w = columns[0].shape
    grid = np.full((rows * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 160, np.uint8)
    for c, col in enumerate(columns):
        arr = (col.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        for r in range(rows):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = arr[r]
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


PARTS = ("generation", "reconstruction", "editing", "examples")


def run(out: Path, weights: str | None = None, batch_size: int = 128, parts: tuple[str, ...] = PARTS) -> dict:
    """The measurements named in ``parts``; writes ``quality.json`` and the PNGs into ``out``."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part {bad[0]!r}; accepted: {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    adapter = DemoAdapter.from_pretrained(weights)
    q = Quality(adapter, batch_size=batch_size)
    ref = (q.pixels + 1) / 2
    report: dict = {"weights": str(weights or "bundled"), "n_emoji": len(q.data)}
    timings: dict[str, float] = {}

    if "generation" in parts:
        t0 = time.perf_counter()
        report["generation"], generated = q.generate()
        timings["generation"] = time.perf_counter() - t0
        grid = to_grid([ref[:60], generated[:60]])
        atomic_write(out / "generated.png", lambda f: grid.save(f, format="PNG"))
        g = report["generation"]
        print(f"\nprompt fidelity (FireFlow 8 steps, {g['n']} prompts):", end=" ")
        print(f"top-1 {g['top1']:.1%}  top-5 {g['top5']:.1%}")

    if "reconstruction" in parts:
        report["reconstruction"] = {}
        print(f"\n{'reconstruction':<14} {'NFE':>4} {'PSNR dB':>8} {'min':>6} {'SSIM':>7}")
        for label, solver, steps in RECON_SETTINGS:
            t0 = time.perf_counter()
            r = q.reconstruct(solver, steps)
            timings[f"reconstruction {label}"] = time.perf_counter() - t0
            report["reconstruction"][label] = r
            print(f"{label:<14} {r['nfe']:>4} {r['psnr']:>8.2f} {r['psnr_min']:>6.1f} {r['ssim']:>7.4f}")

    if "editing" in parts:
        report["editing"] = {}
        cols = [ref[torch.tensor([q.data.index(a) for a, _ in EDIT_PAIRS])]]
        print(f"\nediting ({len(EDIT_PAIRS)} within-family pairs, FireFlow 8 steps, replace_v, all single blocks)")
        for inject in range(4):
            t0 = time.perf_counter()
            r, images = q.edit(EDIT_PAIRS, inject)
            timings[f"editing inject {inject}"] = time.perf_counter() - t0
            report["editing"][f"inject_{inject}"] = r
            cols.append(images)
            print(f"inject {inject}: success {r['success']:.1%}")
        cols.append(ref[torch.tensor([q.data.index(b) for _, b in EDIT_PAIRS])])
        grid = to_grid(cols)
        atomic_write(out / "edits.png", lambda f: grid.save(f, format="PNG"))

    examples = Path(__file__).resolve().parents[2] / "examples"
    if "examples" in parts and examples.is_dir():
        t0 = time.perf_counter()
        rows, images = q.examples(examples)
        timings["examples"] = time.perf_counter() - t0
        report["examples"] = rows
        hits = sum(r["success"] for r in rows)
        print(f"\nexample edits (examples/, image API at its defaults): {hits}/{len(rows)}")
        for r in rows:
            print(f"  {'ok  ' if r['success'] else 'MISS'} {r['command']}  -> nearest: {r['nearest']}")
        src = ref[torch.tensor([q.data.index(a) for _, a, _ in EXAMPLE_EDITS])]
        tgt = ref[torch.tensor([q.data.index(b) for _, _, b in EXAMPLE_EDITS])]
        grid = to_grid([src, torch.cat(images), tgt])
        atomic_write(out / "examples.png", lambda f: grid.save(f, format="PNG"))

    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    text = json.dumps(report, indent=2)
    atomic_write(out / "quality.json", lambda f: f.write(text.encode()))
    print(f"\nwrote {out / 'quality.json'} and PNGs")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description="Measure the FireFlow demo model's quality.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", default=None, help="a save_pretrained folder (default: the bundled weights)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (see the module docstring)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    run(args.out, args.weights, args.batch_size, tuple(p.strip() for p in args.parts.split(",") if p.strip()))


if __name__ == "__main__":
    main()
