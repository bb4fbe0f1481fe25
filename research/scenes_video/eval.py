"""Video edits on held-out moving-scenes clips: does the edit keep the motion?

    python -m research.scenes_video.eval --weights DIR --clips 96 --split validation --choose --out RUN
    python -m research.scenes_video.eval --weights DIR --clips 48 --out docs/scenes_video

The first run chooses the model's default injection count on validation clips (held-out clips
other than the table's) and writes it into the weights' marker; the second makes the table.

Each of N held-out clips (``clips.draw_clips(N, seed 2026, held_out=True)``) gets one edit that
swaps its object for another of the same family (animal face for animal face, fruit for fruit,
a heart for a heart of another colour), keeping the background: source prompt
``"<object>, <colour> background"``, target ``"<other object>, <colour> background"``. Nothing in
either prompt says where the object is or how it moves, so a kept track comes from the source clip.

Per edited frame, the scenes template matcher (``research.bundled.scenes_eval.detect``: exhaustive
least-squares fit of every sprite, size and position) finds the object; the metrics are

- *target hit*: the detected object is the target (share of frames);
- *placement IoU*: IoU of the detected placement square with the source's in that frame, so
  against the source trajectory;
- *consistent*: per clip, every frame holds the same detected object (share of clips);
  *consistent hit*: every frame holds the target;
- *kept PSNR*: PSNR (dB) over the pixels outside the object's track, the union of the source
  object's masks (every pixel it touches) over the clip's frames: what must not change.

Settings: FireFlow 8 steps (18 NFE) against Euler 9 (18 NFE, the same calls) and midpoint 4
(16 NFE), each at inject 0, 1, 2 and 3; the default is FireFlow 8 at the model's inject. Writes
``video_eval.json``, ``video_table.md`` and ``video_sheet.png`` (for the first clips: a row of
source frames, then a row per shown setting of edited frames). One CPU thread by default.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fireflow._io import atomic_write
from research.bundled import scenes as S
from research.bundled.quality import to_grid
from research.bundled.scenes_eval import box_iou, detect, masked_psnr
from research.scenes_video import clips as C

EVAL_SEED = 2026
SPLITS = ("heldout", "validation")
VALIDATION_SEED_OFFSET = 1000
#: Validation clips avoid the table's first this many clips (``--clips`` of the table stays at most this).
TABLE_MAX = 256


@dataclass(frozen=True)
class Setting:
    solver: str
    steps: int
    inject: int

    @property
    def label(self) -> str:
        return f"{self.solver}-{self.steps} inject {self.inject}"

    @property
    def nfe(self) -> int:
        return 2 * {"fireflow": self.steps + 1, "euler": self.steps, "midpoint": 2 * self.steps}[self.solver]


SOLVERS = [("fireflow", 8), ("euler", 9), ("midpoint", 4)]
INJECTS = (0, 1, 2, 3)
SETTINGS = [Setting(s, n, k) for s, n in SOLVERS for k in INJECTS]


def sheet_settings(default: Setting) -> list[Setting]:
    """Edit rows of the contact sheet, under each clip's source row: the default and its rivals."""
    return [default, Setting("euler", 9, default.inject), Setting("midpoint", 4, default.inject)]


def choice_score(summary: dict) -> float:
    """What :func:`choose` maximises: the mean of the three barred figures, each in [0, 1]."""
    return (summary["frame_hit"] + summary["frame_iou"] + summary["consistent"]) / 3


def family_swap(obj: int, rng: np.random.Generator) -> int:
    """Another object of ``obj``'s family (the hearts: another colour)."""
    pool = [i for i, f in enumerate(S.FAMILIES) if f == S.FAMILIES[obj] and i != obj]
    return int(rng.choice(pool))


def edit_cases(n: int, seed: int = EVAL_SEED, split: str = "heldout") -> list[tuple[C.Clip, int]]:
    """``n`` clips of ``split``, each with its target object (deterministic).

    ``"heldout"``: clips of the evaluation split, never trained on, for the table. ``"validation"``:
    other clips of that same split (another seed, none of the table's first :data:`TABLE_MAX`
    clips), on which the model's default is chosen (:func:`choose`). Validation clips must be as
    unseen as the table's: training-split clips may have been trained on, and a default chosen
    on them favours reconstruction over the edit.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
    if split == "heldout":
        clips = C.draw_clips(n, torch.Generator().manual_seed(seed), held_out=True)
    else:
        table = {_key(c) for c in C.draw_clips(TABLE_MAX, torch.Generator().manual_seed(seed), held_out=True)}
        seed += VALIDATION_SEED_OFFSET
        pool = C.draw_clips(n + TABLE_MAX, torch.Generator().manual_seed(seed), held_out=True)
        clips = [c for c in pool if _key(c) not in table][:n]
    rng = np.random.default_rng(seed)
    return [(c, family_swap(c.obj, rng)) for c in clips]


def _key(c: C.Clip) -> tuple[int, ...]:
    return (c.obj, c.bg, c.size, c.x, c.y, c.vx, c.vy)


def target_prompt(clip: C.Clip, obj: int) -> str:
    return S.prompt(obj, clip.bg)


def score_clip(clip: C.Clip, target: int, edited: torch.Tensor, source: torch.Tensor | None = None) -> dict:
    """Metrics of one edited clip ``[F, 3, H, W]`` in [0, 1] (see the module docstring)."""
    source = C.composite(clip) if source is None else source
    det = detect(edited)
    found = [det.scene(f) for f in range(len(edited))]
    src = clip.scenes()
    track = C.object_masks(clip).any(0)  # the object's track: every pixel it touches in any frame
    objs = [s.obj for s in found]
    return {
        "source": clip.prompt,
        "target": target_prompt(clip, target),
        "clip": [clip.obj, clip.bg, clip.size, clip.x, clip.y, clip.vx, clip.vy],
        "detected": [S.OBJECT_NAMES[o] for o in objs],
        "hit": [o == target for o in objs],
        "iou": [round(box_iou(a, b), 4) for a, b in zip(found, src, strict=True)],
        "consistent": len(set(objs)) == 1,
        "consistent_hit": all(o == target for o in objs),
        "kept_psnr": masked_psnr(edited.flatten(0, 1), source.flatten(0, 1), ~track),
    }


def summarize(rows: list[dict]) -> dict:
    psnr = [r["kept_psnr"] for r in rows if not math.isnan(r["kept_psnr"])]
    return {
        "clips": len(rows),
        "frame_hit": float(np.mean([h for r in rows for h in r["hit"]])),
        "frame_iou": float(np.mean([v for r in rows for v in r["iou"]])),
        "consistent": float(np.mean([r["consistent"] for r in rows])),
        "consistent_hit": float(np.mean([r["consistent_hit"] for r in rows])),
        "kept_psnr": float(np.mean(psnr)) if psnr else math.nan,
    }


class VideoBench:
    """One model on the held-out clips: one batched edit per setting."""

    def __init__(self, weights: str, n: int, batch_size: int = 32, split: str = "heldout"):
        from fireflow.editor import FireFlowEditor

        self.editor = FireFlowEditor.from_pretrained(weights, device="cpu")
        a = self.editor.adapter
        if a.frames != C.FRAMES:
            raise SystemExit(f"{weights}: a {a.frames}-frame model; the clips have {C.FRAMES} frames")
        r = self.editor.resolve(None)
        #: The model's default edit (its marker's defaults over the family's), as the CLI runs it.
        self.default = Setting(r.solver, r.num_steps, r.inject)
        self.cases = edit_cases(n, split=split)
        self.batch_size = batch_size
        self.sources = torch.stack([C.composite(c) for c, _ in self.cases])  # [N, F, 3, H, W] in [0, 1]
        self.latents = a.encode_image(self.sources * 2 - 1)
        self.src_emb = a.encode_prompt([c.prompt for c, _ in self.cases])
        self.tgt_emb = a.encode_prompt([target_prompt(c, t) for c, t in self.cases])

    def edit(self, s: Setting) -> torch.Tensor:
        """Edited clips ``[N, F, 3, H, W]`` in [0, 1], on the 8-bit grid (what a saved file holds)."""
        from fireflow.models.base import Geometry

        a, side, out = self.editor.adapter, C.RESOLUTION, []
        for i in range(0, len(self.cases), self.batch_size):
            sl = slice(i, i + self.batch_size)
            out.append(
                self.editor.edit_latents(
                    self.latents[sl],
                    side,
                    side,
                    num_frames=C.FRAMES,
                    **{f"source_{k}": v[sl] for k, v in self.src_emb.items()},
                    **{f"target_{k}": v[sl] for k, v in self.tgt_emb.items()},
                    num_steps=s.steps,
                    inject=s.inject,
                    solver=s.solver,
                )
            )
        video = (a.decode(torch.cat(out), Geometry(side, side, C.FRAMES)).cpu().float() + 1) / 2
        return (video.clamp(0, 1) * 255).round() / 255


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def markdown(report: dict) -> str:
    lines = [
        f"Model: `{report['weights']}`{report.get('step_note', '')}; {report['clips']} held-out clips of "
        f"{C.FRAMES} frames (32×32), one object swap each; {report['seconds'] / 60:.1f} min on one CPU thread.",
        "",
        "| setting | NFE | target hit (frames) | placement IoU | consistent object (clips) | consistent target "
        "| kept PSNR outside the track (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["editing"]:
        o = row["summary"]
        name = f"**{row['label']}** (default)" if row["label"] == report["default"] else row["label"]
        lines.append(
            f"| {name} | {row['nfe']} | {_pct(o['frame_hit'])} | {o['frame_iou']:.2f} | {_pct(o['consistent'])} "
            f"| {_pct(o['consistent_hit'])} | {o['kept_psnr']:.1f} |"
        )
    b = report["bars"]
    lines += ["", "Bars (issue 25), at the default: " + "; ".join(
        f"{k} {v['value']} (bar {v['bar']}): {'reached' if v['reached'] else 'NOT reached'}" for k, v in b.items()
    ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


#: Issue 25's bars on one setting's summary (at least these): key -> (name, bar, written as a percentage).
BARS = {
    "frame_hit": ("target hit", 0.75, True),
    "frame_iou": ("placement IoU", 0.6, False),
    "consistent": ("consistent object", 0.8, True),
}


def all_bars(summary: dict) -> bool:
    """Whether one setting's figures clear all of :data:`BARS`."""
    return all(summary[k] >= bar for k, (_, bar, _) in BARS.items())


def d_inject(report: dict) -> int:
    return next(r["inject"] for r in report["editing"] if r["label"] == report["default"])


def bars(report: dict) -> dict:
    by = {r["label"]: r["summary"] for r in report["editing"]}
    d = by[report["default"]]
    euler = by[Setting("euler", 9, d_inject(report)).label]
    out = {
        name: {
            "value": _pct(d[k]) if pct else f"{d[k]:.2f}",
            "bar": ">= " + (_pct(bar) if pct else f"{bar:g}"),
            "reached": d[k] >= bar,
        }
        for k, (name, bar, pct) in BARS.items()
    }
    return {
        **out,
        "FireFlow 8 IoU over Euler 9": {
            "value": f"{d['frame_iou']:.2f} vs {euler['frame_iou']:.2f}",
            "bar": "higher",
            "reached": d["frame_iou"] > euler["frame_iou"],
        },
    }


def contact_sheet(sources: torch.Tensor, edits: list[torch.Tensor], k: int) -> Image.Image:
    """Per clip: a row of source frames, then one row per edit; columns are frames."""
    rows = []
    for i in range(min(k, len(sources))):
        rows.append(sources[i])
        rows += [e[i] for e in edits]
    block = torch.stack(rows)  # [R, F, 3, H, W]
    return to_grid([block[:, f] for f in range(block.shape[1])])


def run(
    weights: str,
    n: int,
    out: Path,
    sheet_clips: int = 6,
    step: int | None = None,
    split: str = "heldout",
    settings: list[Setting] | None = None,
    tag: str = "",
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = VideoBench(weights, n, split=split)
    default = bench.default
    settings = list(settings or SETTINGS)
    sheet = sheet_settings(default) if split == "heldout" else []
    for s in [default, *sheet]:
        if s not in settings:
            settings.append(s)
    report: dict = {"weights": str(weights), "split": split, "clips": n, "seed": EVAL_SEED, "editing": []}
    report["default"] = default.label
    if step is not None:
        report["step"], report["step_note"] = step, f" (step {step:,})"
    shown = {}
    for s in settings:
        t1 = time.perf_counter()
        edited = bench.edit(s)
        rows = [score_clip(c, t, edited[i], bench.sources[i]) for i, (c, t) in enumerate(bench.cases)]
        summ = summarize(rows)
        entry = {"label": s.label, "solver": s.solver, "steps": s.steps, "inject": s.inject, "nfe": s.nfe,
                 "summary": summ, "seconds": round(time.perf_counter() - t1, 1)}  # fmt: skip
        if s == default:
            entry["rows"] = rows
        report["editing"].append(entry)
        if s in sheet:
            shown[s] = edited
        line = f"{s.label:<22} hit {summ['frame_hit']:.0%}  IoU {summ['frame_iou']:.2f}  "
        line += f"consistent {summ['consistent']:.0%}  kept {summ['kept_psnr']:.1f} dB  ({entry['seconds']} s)"
        print(line, flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    suffix = f"_{tag}" if tag else ""
    name = ("video" if split == "heldout" else "validation") + suffix
    if sheet:
        report["bars"] = bars(report)
        report["sheet"] = {
            "clips": [f"{c.prompt} -> {target_prompt(c, t)}" for c, t in bench.cases[:sheet_clips]],
            "rows per clip": ["source"] + [s.label for s in sheet],
            "columns": [f"frame {f}" for f in range(C.FRAMES)],
        }
        image = contact_sheet(bench.sources, [shown[s] for s in sheet], sheet_clips)
        atomic_write(out / f"video_sheet{suffix}.png", lambda f: image.save(f, format="PNG"))
        md = markdown(report)
        atomic_write(out / f"{name}_table.md", lambda f: f.write(md.encode()))
        print(md)
    text = json.dumps(report, indent=1, default=float)
    atomic_write(out / f"{name}_eval.json", lambda f: f.write(text.encode()))
    print(f"wrote {out}/{name}_eval.json ({report['seconds']} s)")
    return report


def choose(report: dict) -> int:
    """The FireFlow-8 injection count with the best :func:`choice_score` on a validation report."""
    rows = [r for r in report["editing"] if r["solver"] == "fireflow" and r["steps"] == 8]
    best = max(rows, key=lambda r: (round(choice_score(r["summary"]), 6), -r["inject"]))
    return int(best["inject"])


def write_default_inject(weights: Path, inject: int) -> None:
    """Record ``inject`` as the model's default in its folder's marker (``defaults``)."""
    from fireflow.models.demo import MARKER

    file = Path(weights) / MARKER
    marker = json.loads(file.read_text())
    marker.setdefault("defaults", {})["inject"] = inject
    text = json.dumps(marker, indent=2) + "\n"
    atomic_write(file, lambda f: f.write(text.encode()))


def parse_settings(spec: str) -> list[Setting]:
    """``"fireflow-16:0,2,4"`` -> FireFlow 16 steps at inject 0, 2 and 4."""
    try:
        head, injects = spec.split(":")
        solver, steps = head.rsplit("-", 1)
        if solver not in dict(SOLVERS):
            raise ValueError
        out = [Setting(solver, int(steps), int(k)) for k in injects.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: accepted SOLVER-STEPS:INJECT[,INJECT...] with SOLVER one of {', '.join(dict(SOLVERS))}"
        ) from None
    if any(x.steps < 1 or not 0 <= x.inject <= x.steps for x in out):
        raise argparse.ArgumentTypeError(f"{spec!r}: steps at least 1, each inject between 0 and the steps")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Video edits on moving-scenes clips: the held-out table, or the choice.")
    p.add_argument("--weights", default="scenes-video", help="a scenes-video weights folder (or the bundled name)")
    p.add_argument("--clips", type=int, default=24, help="clips (one edit each)")
    p.add_argument("--out", type=Path, default=Path("docs/scenes_video"))
    p.add_argument("--split", choices=SPLITS, default="heldout", help="heldout: the table; validation: the choice")
    p.add_argument(
        "--choose",
        action="store_true",
        help="with --split validation: write the FireFlow-8 inject count scoring best into the weights' marker",
    )
    p.add_argument("--sheet-clips", type=int, default=6, help="clips shown in the contact sheet")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's training step, for the table's header")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--settings",
        type=parse_settings,
        nargs="+",
        help="edit settings to score instead of the table's (e.g. fireflow-16:0,2,4,6); not with --choose",
    )
    p.add_argument("--tag", default="", help="written as <split>_<tag>_eval.json (other settings, other file)")
    args = p.parse_args()
    if args.choose and args.split != "validation":
        p.error("--choose looks at validation clips only: add --split validation")
    if args.split == "heldout" and not 1 <= args.clips <= TABLE_MAX:
        p.error(f"--clips {args.clips}: the table takes 1 to {TABLE_MAX} clips (validation avoids that many)")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.settings and (args.choose or not args.tag):
        p.error("--settings writes a report of its own: give it a --tag, and no --choose")
    settings = [Setting("fireflow", 8, k) for k in INJECTS] if args.split == "validation" else None
    if args.settings:
        settings = [x for group in args.settings for x in group]
    report = run(args.weights, args.clips, args.out, args.sheet_clips, args.step, args.split, settings, args.tag)
    if args.choose:
        k = choose(report)
        for r in report["editing"]:
            print(f"{r['label']:<22} score {choice_score(r['summary']):.3f}")
        write_default_inject(Path(args.weights), k)
        print(f"chose inject {k}; wrote it to {Path(args.weights) / 'fireflow_demo.json'}")


if __name__ == "__main__":
    main()
