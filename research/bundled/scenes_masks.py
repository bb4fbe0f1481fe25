"""Masked against mask-free edits on the held-out scene set, with its true edit masks.

    python -m research.bundled.scenes_masks --weights scenes --out docs/scenes

At the default setting (FireFlow, 8 steps, inject 1, replace_v): the mask-free edit, the masked edit
(``edit(mask=...)``: latents outside the mask kept exactly) and the masked edit with the source
pixels pasted outside (``paste_pixels``). Reports target hit, object IoU with the source and the
kept PSNR outside the mask (see ``research.bundled.scenes_eval``), overall and per edit type, and
the model calls per edit. Writes ``OUT/scenes_masks.json`` and ``OUT/scenes_masks.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fireflow._io import atomic_write
from fireflow.bench import _io
from fireflow.masks import paste_pixels
from fireflow.models.base import Geometry
from research.bundled import scenes_eval as E


def run(weights: str, out: Path | None, data: Path = E.SET_DIR) -> dict:
    torch.set_num_threads(1)
    bench = E.Bench(weights, data)
    editor, adapter, side = bench.editor, bench.adapter, bench.side
    masks = [E.edit_mask(c) for c in bench.cases]
    latent_masks = torch.stack([adapter.latent_mask(m, Geometry(side, side)) for m in masks])  # [B, L, C]
    results, timings = {}, {}
    for name in ("mask-free", "masked", "masked + pixel paste"):
        t0 = time.perf_counter()
        latents = []
        for sl in bench._chunks(len(bench.cases)):
            latents.append(
                editor.edit_latents(
                    bench.latents[sl],
                    side,
                    side,
                    mask=None if name == "mask-free" else latent_masks[sl],
                    **{f"source_{k}": v[sl] for k, v in bench.src_emb.items()},
                    **{f"target_{k}": v[sl] for k, v in bench.tgt_emb.items()},
                )
            )
        images = bench._decode(torch.cat(latents))
        if name.endswith("paste"):
            images = _pasted(images, bench.sources, masks)
        timings[name] = time.perf_counter() - t0
        results[name] = E.summarize(E.layout_metrics(bench.cases, images))
    report = {"weights": weights, "cases": len(bench.cases), "nfe_per_edit": 18, "results": results,
              "seconds": timings}  # fmt: skip
    table = markdown(report)
    print(table)
    if out is not None:
        _io.write_json(Path(out) / "scenes_masks.json", report)
        atomic_write(Path(out) / "scenes_masks.md", lambda f: f.write(table.encode() + b"\n"))
    return report


def _pasted(images: torch.Tensor, sources: torch.Tensor, masks: list[np.ndarray]) -> torch.Tensor:
    out = []
    for img, src, m in zip(images, sources, masks, strict=True):
        to_pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in (img, src)]
        out.append(torch.from_numpy(np.asarray(paste_pixels(*to_pil, m), dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out)


def _cell(v: float, pct: bool = False) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "exact"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def markdown(report: dict) -> str:
    rows = ["| edit | type | target hit | object IoU | kept PSNR (dB) |", "|---|---|---:|---:|---:|"]
    for name, res in report["results"].items():
        for part, m in res.items():
            rows.append(
                f"| {name} | {part} | {_cell(m['target_hit'], True)} | {_cell(m['object_iou'])} | "
                f"{_cell(m['kept_psnr'])} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m research.bundled.scenes_masks", description=__doc__)
    p.add_argument("--weights", default="scenes", help="model: 'scenes', 'demo' or a weights folder")
    p.add_argument("--data", type=Path, default=E.SET_DIR)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    run(a.weights, a.out, a.data)


if __name__ == "__main__":
    main()
