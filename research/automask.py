"""Automatic masks (``mask="auto"``) against mask-free and true-mask edits on the held-out scenes.

    python -m research.automask --out docs/automask

On the 140 held-out scene edits (``fireflow/bench/scenes_pie``) at the default setting (FireFlow,
8 steps, inject 1, replace_v), the mask-free edit, the edit with the true mask and the edit with
the automatic mask (:mod:`fireflow.automask`, at the settings table's defaults). Target hit,
placement IoU and PSNR outside the true mask come from ``research.bundled.scenes_eval``; the mask
IoU is the found mask's IoU with the true mask dilated by one latent cell (a pixel: the scenes
model is pixel space). The true mask is ``scenes_eval.edit_mask``: both objects for object and
colour edits, all but the object for background edits.

Candidate B (attention of image tokens to the source prompt's differing words, read in the
inversion, the only pass seen before the first blend) is measured for its mask IoU only: it is
not the chosen method (see the README's "Automatic masks").

Writes ``OUT/automask.json`` and ``OUT/automask.md``.
"""

from __future__ import annotations

import argparse
import difflib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fireflow import automask as A
from fireflow._io import atomic_write
from fireflow.bench import _io
from fireflow.features import FeatureReuse
from fireflow.models.base import Geometry
from fireflow.settings import KNOBS
from research.bundled import scenes_eval as E

EDIT_NFE = 18  # FireFlow, 8 steps: inversion + denoising


def dilate(masks: np.ndarray, cells: int = 1) -> np.ndarray:
    t = torch.from_numpy(masks)[:, None].float()
    return (F.max_pool2d(t, 2 * cells + 1, 1, cells)[:, 0] > 0.5).numpy()


def mask_iou(found: np.ndarray, true: np.ndarray) -> np.ndarray:
    inter = (found & true).sum((1, 2))
    union = (found | true).sum((1, 2))
    return inter / np.maximum(union, 1)


def by_type(values: np.ndarray, types: list[str]) -> dict:
    out = {"overall": float(np.mean(values))}
    for t in E.TYPE_NAMES.values():
        out[t] = float(np.mean([v for v, ty in zip(values, types, strict=True) if ty == t]))
    return out


class _AttentionProbe(FeatureReuse):
    """Records, in every inversion call and block, the attention of image tokens to chosen text
    positions (Q, K as the processors hand them: before RoPE, so an approximation)."""

    def __init__(self, num_steps: int, blocks, text_len: int, words: torch.Tensor):
        super().__init__(num_steps, num_steps, "replace_v", blocks)
        self.text_len, self.words = text_len, words  # words: [B, text_len] 0/1
        self.total: torch.Tensor | None = None

    def __call__(self, block, q, k, v):
        if self._mode != "record" or block not in self.blocks:
            return q, k, v
        n = self.text_len
        qi = q[:, n:].transpose(1, 2)  # [B, H, L, D]
        kt = k.transpose(1, 2)
        att = torch.softmax(qi @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)[..., :n]  # to the text
        mass = (att * self.words[:, None, None, :]).sum(-1).mean(1)  # [B, L]
        self.total = mass if self.total is None else self.total + mass
        return q, k, v


def attention_masks(bench: E.Bench, threshold: float, dilation: int) -> np.ndarray:
    """Candidate B on the scenes model: attention to the source's differing words in the inversion."""
    editor, a = bench.editor, bench.adapter
    tok = a.text_encoder._tokenizer
    n = bench.src_emb["prompt_embeds"].shape[1]
    words = torch.zeros(len(bench.cases), n)
    for i, c in enumerate(bench.cases):
        s = tok(c.source.prompt, truncation=True, max_length=n)["input_ids"]
        t = tok(c.target.prompt, truncation=True, max_length=n)["input_ids"]
        for op, i0, i1, _, _ in difflib.SequenceMatcher(a=s, b=t, autojunk=False).get_opcodes():
            if op != "equal":
                words[i, i0:i1] = 1
    g = Geometry(bench.side, bench.side)
    s = editor.resolve(None)
    blocks = tuple(dict.fromkeys(a.layers.values()))
    probe = _AttentionProbe(s.num_steps, blocks, n, words)
    cond = a.conditioning(bench.src_emb, g, 1.0)
    ts = a.timesteps(s.num_steps, g).flip(0)
    with torch.no_grad(), a.processors.installed(blocks):
        editor._solve(bench.latents, cond, ts, s.solver, probe, probe.recording)
    side = int(round(math.sqrt(probe.total.shape[1])))
    cells, _ = A.threshold_cells(probe.total.reshape(-1, side, side), threshold, 0)
    pix = cells.numpy().repeat(bench.side // side, 1).repeat(bench.side // side, 2)
    return dilate(pix, dilation) if dilation else pix


def run(weights: str, out: Path | None, data: Path = E.SET_DIR, threshold: float | None = None) -> dict:
    threshold = KNOBS["mask_threshold"].default if threshold is None else threshold
    dilation = KNOBS["mask_dilation"].default
    bench = E.Bench(weights, data)
    editor, a, side = bench.editor, bench.adapter, bench.side
    g = Geometry(side, side)
    types = [E.TYPE_NAMES[c.type_id] for c in bench.cases]
    true = np.stack([E.edit_mask(c) for c in bench.cases])
    true_d = dilate(true)
    found = A.find(a, bench.latents, g, bench.src_emb, bench.tgt_emb, threshold=threshold, dilation=dilation)
    auto_nfe = found.nfe  # per source image: the batch of 140 counts as one image would
    rows: dict[str, dict] = {}
    timings: dict[str, float] = {}
    latent_true = torch.stack([a.latent_mask(m[None], g) for m in true])
    for name, lm, pix, nfe in (
        ("mask-free", None, None, EDIT_NFE),
        ("true mask", latent_true, true, EDIT_NFE),
        ("auto mask (A: velocity difference)", found.latent, found.pixels, EDIT_NFE + auto_nfe),
    ):
        t0 = time.perf_counter()
        latents = []
        for sl in bench._chunks(len(bench.cases)):
            latents.append(
                editor.edit_latents(
                    bench.latents[sl],
                    side,
                    side,
                    mask=None if lm is None else lm[sl],
                    **{f"source_{k}": v[sl] for k, v in bench.src_emb.items()},
                    **{f"target_{k}": v[sl] for k, v in bench.tgt_emb.items()},
                )
            )
        images = bench._decode(torch.cat(latents))
        timings[name] = time.perf_counter() - t0
        res = E.summarize(E.layout_metrics(bench.cases, images))
        iou = by_type(mask_iou(pix, true_d), types) if pix is not None else None
        area = by_type(pix.mean((1, 2)), types) if pix is not None else None
        rows[name] = {"nfe": nfe, "metrics": res, "mask_iou": iou, "mask_area": area}
        print(f"{name}: {timings[name]:.0f} s", flush=True)
    t0 = time.perf_counter()
    b_masks = attention_masks(bench, threshold, dilation)
    timings["B"] = time.perf_counter() - t0
    rows["B: attention to the source's differing words (mask only)"] = {
        "nfe": EDIT_NFE,
        "metrics": None,
        "mask_iou": by_type(mask_iou(b_masks, true_d), types),
        "mask_area": by_type(b_masks.mean((1, 2)), types),
    }
    report = {
        "weights": weights,
        "cases": len(bench.cases),
        "threshold": threshold,
        "dilation": dilation,
        "times": list(A.TIMES),
        "rows": rows,
        "seconds": timings,
    }
    table = markdown(report)
    print(table)
    if out is not None:
        _io.write_json(Path(out) / "automask.json", report)
        atomic_write(Path(out) / "automask.md", lambda f: f.write(table.encode() + b"\n"))
    return report


def _f(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(report: dict) -> str:
    head = "| masks | edits | NFE | target hit | placement IoU | PSNR outside true mask | mask IoU |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in report["rows"].items():
        for part in ("overall", *E.TYPE_NAMES.values()):
            m = (r["metrics"] or {}).get(part, {})
            hit = m.get("target_hit")
            lines.append(
                f"| {name} | {part} | {r['nfe']} | {_f(None if hit is None else 100 * hit, '.1f')}"
                f"{'%' if hit is not None else ''} | {_f(m.get('object_iou'), '.2f')} | "
                f"{_f(m.get('kept_psnr'), '.1f')} | {_f((r['mask_iou'] or {}).get(part), '.2f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m research.automask", description=__doc__)
    p.add_argument("--weights", default="scenes", help="model: 'scenes' or a weights folder")
    p.add_argument("--data", type=Path, default=E.SET_DIR)
    p.add_argument("--threshold", type=float, default=None, help="mask threshold (default: the settings table's)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    run(a.weights, a.out, a.data, a.threshold)


if __name__ == "__main__":
    main()
