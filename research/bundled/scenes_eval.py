"""Layout-aware evaluation on held-out scenes: FireFlow's editing table in miniature.

    python -m research.bundled.scenes_eval write-set [--out fireflow/bench/scenes_pie]
    python -m research.bundled.scenes_eval table --weights DIR --out docs/scenes
    python -m research.bundled.scenes_eval layout --data fireflow/bench/scenes_pie --edits OUT   # a bench pie run

**The set** (``write-set``; committed as ``fireflow/bench/scenes_pie``): 140 source scenes drawn
only from the held-out tenth of all scenes (never seen in training), each with one edit, in
PIE-Bench's format (``mapping_file.json`` + ``annotation_images/<type folder>/<id>.png``, masks as
PIE-Bench's flat ``[start, length, ...]`` runs over the 32x32 image), so ``fireflow bench pie`` and
``fireflow eval pie`` run on it unchanged:

- ``1_change_object_80``: 60 object swaps within a family (animal faces, fruit);
- ``6_change_attribute_color_40``: 40 colour changes (a heart to a heart of another colour,
  red apple to green apple and back);
- ``8_change_background_80``: 40 background colour changes.

Every entry also holds the exact ``scene`` and ``target_scene`` (object, background, size, x, y).
The edit mask is what an ideal edit changes: for object edits every pixel either object touches
(alpha > 0) at the source's placement; for background edits everything but the source object's
opaque pixels (alpha = 1).

**Layout metrics**, computed from the known compositing:

- *detection*: the background is the palette colour nearest the median of the border pixels;
  the object, its size and position are the best least-squares fit of every sprite at every size
  and integer position composited on that background (an exhaustive template match);
- *target hit*: object edits: the detected object is the target; background edits: the detected
  background is the target;
- *object IoU*: IoU of the detected placement square with the source's;
- *kept PSNR*: PSNR (dB, images in [0, 1]) over the pixels outside the edit mask only, not
  PIE-Bench's masked full image: the background for object edits, the object for background edits;
- *PSNR to ideal*: whole-image PSNR against the target scene composited at the source's layout.

``table`` measures generation (every prompt, 2 noises, FireFlow 8 steps: detected object and
background against the prompt's), reconstruction of the 140 sources at equal NFE, and the edits
for each solver, inject 0..3 and strategy, and writes ``scenes_eval.json``, ``scenes_table.md`` and
``scenes_grid.png``. Threads default to 1 (see research.bundled.train).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fireflow._io import atomic_write
from fireflow.bench._io import pyplot
from fireflow.bench.pie import SCENES_PIE
from fireflow.metrics import encode_pie_mask
from fireflow.models.base import Geometry
from research.bundled import scenes as S
from research.bundled.quality import to_grid

SET_DIR = SCENES_PIE
TYPE_FOLDERS = {"1": "1_change_object_80", "6": "6_change_attribute_color_40", "8": "8_change_background_80"}
TYPE_NAMES = {"1": "object", "6": "colour", "8": "background"}
SET_SEED = 2025
COUNTS = {"1": 60, "6": 40, "8": 40}
#: Colour changes among fruit: these two pairs count as colour, not object, edits.
APPLES = ("red apple", "green apple")


@dataclass(frozen=True)
class EditCase:
    key: str
    type_id: str
    source: S.Scene
    target: S.Scene

    @property
    def image_path(self) -> str:
        return f"{TYPE_FOLDERS[self.type_id]}/{self.key}.png"


def _family_members(family: str) -> list[int]:
    return [i for i, f in enumerate(S.FAMILIES) if f == family]


def build_set(seed: int = SET_SEED, counts: dict[str, int] = COUNTS) -> list[EditCase]:
    """The held-out edit set: distinct held-out source scenes, one edit each, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    apples = [S.OBJECT_NAMES.index(a) for a in APPLES]
    hearts = _family_members("hearts")
    swap_pool = {
        fam: [i for i in _family_members(fam) if i not in apples or fam != "fruit"] for fam in ("animal faces", "fruit")
    }
    used: set[S.Scene] = set()
    cases: list[EditCase] = []

    def source_with(objs: list[int]) -> S.Scene:
        while True:
            s = S.draw_scenes(1, gen, held_out=True)[0]
            s = s.replace(obj=int(rng.choice(objs)))
            if S.is_held_out(s.obj, s.bg, s.size, s.x, s.y) and s not in used:
                used.add(s)
                return s

    def add(type_id: str, src: S.Scene, tgt: S.Scene) -> None:
        cases.append(EditCase(f"{len(cases):012d}", type_id, src, tgt))

    for i in range(counts["1"]):
        pool = swap_pool["animal faces" if i % 2 == 0 else "fruit"]
        src = source_with(pool)
        add("1", src, src.replace(obj=int(rng.choice([o for o in pool if o != src.obj]))))
    for i in range(counts["6"]):
        if i % 5 == 4:  # one in five: the apples
            src = source_with(apples)
            add("6", src, src.replace(obj=apples[1 - apples.index(src.obj)]))
        else:
            src = source_with(hearts)
            add("6", src, src.replace(obj=int(rng.choice([o for o in hearts if o != src.obj]))))
    for _ in range(counts["8"]):
        src = source_with(list(range(len(S.OBJECTS))))
        add("8", src, src.replace(bg=int(rng.choice([b for b in range(len(S.BACKGROUNDS)) if b != src.bg]))))
    return cases


def edit_mask(case: EditCase) -> np.ndarray:
    """Boolean ``[H, W]``, True where an ideal edit changes pixels (see the module docstring)."""
    if case.type_id == "8":
        return ~S.object_mask(case.source, opaque=True)
    return S.object_mask(case.source) | S.object_mask(case.target)


def editing_prompt(case: EditCase) -> str:
    """The target prompt with PIE-Bench's ``[`` ``]`` around the changed words."""
    o, b = S.OBJECT_NAMES[case.target.obj], S.BACKGROUND_NAMES[case.target.bg]
    if case.type_id == "8":
        return f"{o}, [{b}] background"
    return f"[{o}], {b} background"


def instruction(case: EditCase) -> str:
    a, b = case.source, case.target
    if case.type_id == "8":
        return f"make the background {S.BACKGROUND_NAMES[b.bg]}"
    return f"turn the {S.OBJECT_NAMES[a.obj]} into a {S.OBJECT_NAMES[b.obj]}"


#: The README's and the web page's example edits: (source scene, target object, target background),
#: objects off-centre so that a kept layout shows. Each is nudged to the nearest held-out scene.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "scenes"
_EXAMPLE_SPECS = [
    (("cat face", "sky blue", 1, 2, 3), "dog face", None),
    (("red heart", "white", 0, 14, 13), "blue heart", None),
    (("red apple", "beige", 1, 9, 1), "green apple", None),
    (("fox", "mint green", 0, 3, 15), "panda", None),
    (("lemon", "gray", 1, 10, 9), "tangerine", None),
    (("yellow heart", "black", 0, 2, 2), None, "sky blue"),
    (("frog", "white", 1, 0, 10), "pig face", None),
    (("strawberry", "sky blue", 0, 15, 4), None, "beige"),
]


def example_cases() -> list[EditCase]:
    out = []
    for (name, bg, size, x, y), t_obj, t_bg in _EXAMPLE_SPECS:
        src = S.Scene(S.OBJECT_NAMES.index(name), S.BACKGROUND_NAMES.index(bg), size, x, y)
        span = S.RESOLUTION - src.side
        for d in range(S.RESOLUTION):  # nearest held-out position, scanning outwards along x
            cand = [src.replace(x=xx) for xx in (x + d, x - d) if 0 <= xx <= span]
            held = [c for c in cand if S.is_held_out(c.obj, c.bg, c.size, c.x, c.y)]
            if held:
                src = held[0]
                break
        tgt = src.replace(obj=S.OBJECT_NAMES.index(t_obj)) if t_obj else src.replace(bg=S.BACKGROUND_NAMES.index(t_bg))
        type_id = "8" if t_bg else ("6" if S.FAMILIES[src.obj] == "hearts" or name in APPLES else "1")
        stem = f"{name}_{bg}".replace(" ", "_")
        out.append(EditCase(stem, type_id, src, tgt))
    return out


def example_command(c: EditCase, model: str = "scenes") -> str:
    out = c.target.prompt.split(",")[0].replace(" ", "_") if c.type_id != "8" else f"{c.key}_to_{c.target.bg}"
    if c.type_id == "8":
        out = f"{S.OBJECT_NAMES[c.target.obj]}_{S.BACKGROUND_NAMES[c.target.bg]}".replace(" ", "_")
    return (
        f'fireflow edit examples/scenes/{c.key}.png -s "{c.source.prompt}" -t "{c.target.prompt}" '
        f"-o {out}.png --model {model}"
    )


def write_examples(folder: Path = EXAMPLES_DIR) -> list[EditCase]:
    cases = example_cases()
    folder.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for c in cases:
        img = Image.fromarray(S.to_uint8(S.composite(c.source)))
        atomic_write(folder / f"{c.key}.png", lambda f, img=img: img.save(f, format="PNG"))
        prompts[f"{c.key}.png"] = {"source": c.source.prompt, "target": c.target.prompt, "scene": asdict(c.source)}
    text = json.dumps(prompts, indent=1) + "\n"
    atomic_write(folder / "prompts.json", lambda f: f.write(text.encode()))
    return cases


def write_set(out: Path = SET_DIR, cases: list[EditCase] | None = None) -> list[EditCase]:
    cases = cases if cases is not None else build_set()
    mapping = {}
    for c in cases:
        path = out / "annotation_images" / c.image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(S.to_uint8(S.composite(c.source)))
        atomic_write(path, lambda f, img=img: img.save(f, format="PNG"))
        changed = S.BACKGROUND_NAMES[c.target.bg] if c.type_id == "8" else S.OBJECT_NAMES[c.target.obj]
        mapping[c.key] = {
            "image_path": c.image_path,
            "original_prompt": c.source.prompt,
            "editing_prompt": editing_prompt(c),
            "editing_instruction": instruction(c),
            "editing_type_id": c.type_id,
            "blended_word": changed,
            "mask": encode_pie_mask(edit_mask(c)),
            "scene": asdict(c.source),
            "target_scene": asdict(c.target),
        }
    text = json.dumps(mapping, indent=1) + "\n"
    atomic_write(out / "mapping_file.json", lambda f: f.write(text.encode()))
    return cases


def load_set(data: Path = SET_DIR) -> list[EditCase]:
    mapping = json.loads((Path(data) / "mapping_file.json").read_text())
    return [
        EditCase(k, str(e["editing_type_id"]), S.Scene(**e["scene"]), S.Scene(**e["target_scene"]))
        for k, e in sorted(mapping.items())
    ]


# --- detection and layout metrics -----------------------------------------------------------


@dataclass
class Detection:
    """Per image: object, background, size index, x, y (tensors ``[B]``)."""

    obj: torch.Tensor
    bg: torch.Tensor
    size: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def scene(self, i: int) -> S.Scene:
        return S.Scene(int(self.obj[i]), int(self.bg[i]), int(self.size[i]), int(self.x[i]), int(self.y[i]))


def _palette() -> torch.Tensor:
    return torch.stack([S.background_rgb(b) for b in range(len(S.BACKGROUNDS))])


def detect_background(images: torch.Tensor) -> torch.Tensor:
    """Palette index nearest the per-channel median of the border pixels; images ``[B, 3, H, W]``
    in [0, 1]. An object covers at most 2 x 22 of the 124 border pixels, under half."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1
    )  # [B, 3, 124]
    med = border.median(dim=-1).values
    return torch.cdist(med.double(), _palette().double()).argmin(1)


def detect(images: torch.Tensor, spr: S.Sprites | None = None) -> Detection:
    """Exhaustive least-squares fit of every object, size and integer position on the detected
    background. With ``d = image - background`` and ``w = alpha * (object - background)`` (the
    sprite's change to the background), placing ``w`` lowers the squared error by
    ``2 <d, w> - |w|^2`` over its square: one correlation per sprite and size."""
    spr = spr or S.sprites()
    images = images.float()
    b = images.shape[0]
    bg = detect_background(images)
    best = torch.full((b,), -math.inf)
    out = {k: torch.zeros(b, dtype=torch.long) for k in ("obj", "size", "x", "y")}
    palette = _palette()
    for k in bg.unique().tolist():
        sel = torch.nonzero(bg == k).flatten()
        col = palette[k][None, :, None, None]
        d = images[sel] - col
        for si, side in enumerate(S.SIZES):
            w = spr.rgb[side] - spr.alpha[side] * col  # [N, 3, s, s]
            score = 2 * F.conv2d(d, w) - w.pow(2).flatten(1).sum(1)[None, :, None, None]  # [n, N, P, P]
            p = score.shape[-1]
            val, flat = score.flatten(1).max(1)
            better = val > best[sel]
            idx = sel[better]
            best[idx] = val[better]
            f = flat[better]
            out["obj"][idx] = f // (p * p)
            out["y"][idx] = (f % (p * p)) // p
            out["x"][idx] = f % p
            out["size"][idx] = si
    return Detection(out["obj"], bg, out["size"], out["x"], out["y"])


def box_iou(a: S.Scene, b: S.Scene) -> float:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    iw = max(0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    return inter / (a.side**2 + b.side**2 - inter)


def masked_psnr(a: torch.Tensor, b: torch.Tensor, keep: np.ndarray, cap: float = 100.0) -> float:
    """PSNR (data range 1) over the pixels where ``keep`` is True only; ``cap`` for identical."""
    m = torch.from_numpy(keep)
    if not m.any():
        return math.nan
    mse = (a - b).pow(2)[:, m].mean().item()
    return cap if mse <= 10 ** (-cap / 10) else 10 * math.log10(1 / mse)


def layout_metrics(cases: list[EditCase], edited: torch.Tensor) -> list[dict]:
    """Per-case metrics for edited images ``[B, 3, H, W]`` in [0, 1], in the order of ``cases``."""
    det = detect(edited)
    rows = []
    for i, c in enumerate(cases):
        found = det.scene(i)
        src = S.composite(c.source)
        ideal = S.composite(c.target)
        hit = found.bg == c.target.bg if c.type_id == "8" else found.obj == c.target.obj
        rows.append(
            {
                "id": c.key,
                "type": TYPE_NAMES[c.type_id],
                "source": c.source.prompt,
                "target": c.target.prompt,
                "detected": found.prompt,
                "target_hit": bool(hit),
                "object_iou": box_iou(found, c.source),
                "kept_psnr": masked_psnr(edited[i], src, ~edit_mask(c)),
                "psnr_to_ideal": masked_psnr(edited[i], ideal, np.ones(src.shape[1:], bool)),
            }
        )
    return rows


METRICS = ("target_hit", "object_iou", "kept_psnr", "psnr_to_ideal")


def summarize(rows: list[dict]) -> dict:
    """Means overall and per edit type."""

    def mean(rs: list[dict]) -> dict:
        out = {"n": len(rs)}
        for m in METRICS:
            vals = [float(r[m]) for r in rs if not (isinstance(r[m], float) and math.isnan(r[m]))]
            out[m] = float(np.mean(vals)) if vals else math.nan
        return out

    by_type = {t: mean([r for r in rows if r["type"] == t]) for t in TYPE_NAMES.values()}
    return {"overall": mean(rows), **by_type}


def load_images(folder: Path, cases: list[EditCase]) -> torch.Tensor:
    imgs = []
    for c in cases:
        with Image.open(Path(folder) / "annotation_images" / c.image_path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        imgs.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(imgs)


# --- the miniature editing table --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    solver: str
    steps: int
    inject: int
    strategy: str = "replace_v"

    @property
    def label(self) -> str:
        s = f"{self.solver}-{self.steps} inject {self.inject}"
        return s if self.strategy == "replace_v" else f"{s} {self.strategy}"


def nfe(solver: str, steps: int) -> int:
    """Transformer calls of one edit (inversion + denoising)."""
    return 2 * {"fireflow": steps + 1, "euler": steps, "midpoint": 2 * steps}[solver]


#: The paper's PIE-Bench setting: FireFlow 8 steps (18 NFE), inject 1, replace_v.
DEFAULT = Setting("fireflow", 8, 1)
SOLVERS = [("fireflow", 8), ("euler", 9), ("midpoint", 4), ("midpoint", 5), ("fireflow", 15)]
STRATEGIES = ["replace_v", "add_k", "add_q", "replace_v add_k"]
RECON = [("fireflow", 8), ("euler", 9), ("midpoint", 4), ("midpoint", 5), ("fireflow", 15), ("euler", 16)]


def all_settings(quick: bool = False) -> list[Setting]:
    injects = [1] if quick else [0, 1, 2, 3]
    out = [Setting(s, n, k) for s, n in SOLVERS for k in injects]
    out += [Setting("fireflow", 8, k, st) for st in STRATEGIES[1:] for k in injects if k in (1, 2)]
    return out


class Bench:
    """One model on the held-out set: batched passes, one per setting."""

    def __init__(self, weights: str, data: Path = SET_DIR, batch_size: int = 256):
        from fireflow.editor import FireFlowEditor

        self.editor = FireFlowEditor.from_pretrained(weights, device="cpu")
        self.adapter = self.editor.adapter
        self.cases = load_set(data)
        self.batch_size = batch_size
        self.side = S.RESOLUTION
        self.sources = torch.stack([S.composite(c.source) for c in self.cases])  # [B, 3, H, W] in [0, 1]
        self.latents = self.adapter.encode_image(self.sources[:, None] * 2 - 1)
        self.src_emb = self.adapter.encode_prompt([c.source.prompt for c in self.cases])  # {name: tensor}
        self.tgt_emb = self.adapter.encode_prompt([c.target.prompt for c in self.cases])

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        img = (self.adapter.decode(latents, Geometry(self.side, self.side))[:, 0].cpu().float() + 1) / 2
        return (img * 255).round() / 255  # what a saved PNG would hold

    def _chunks(self, n: int):
        for i in range(0, n, self.batch_size):
            yield slice(i, min(n, i + self.batch_size))

    def edit(self, s: Setting) -> torch.Tensor:
        out = []
        for sl in self._chunks(len(self.cases)):
            out.append(
                self.editor.edit_latents(
                    self.latents[sl],
                    self.side,
                    self.side,
                    **{f"source_{k}": v[sl] for k, v in self.src_emb.items()},
                    **{f"target_{k}": v[sl] for k, v in self.tgt_emb.items()},
                    num_steps=s.steps,
                    inject=s.inject,
                    solver=s.solver,
                    strategy=s.strategy,
                )
            )
        return self._decode(torch.cat(out))

    def reconstruct(self, solver: str, steps: int) -> dict:
        out = []
        for sl in self._chunks(len(self.cases)):
            kw = {k: v[sl] for k, v in self.src_emb.items()}
            noise = self.editor.invert_latents(
                self.latents[sl], self.side, self.side, num_steps=steps, solver=solver, **kw
            )
            out.append(self.editor.sample_latents(noise, self.side, self.side, num_steps=steps, solver=solver, **kw))
        rec = self._decode(torch.cat(out))
        mse = (rec - self.sources).pow(2).flatten(1).mean(1).clamp(min=1e-10)
        p = 10 * torch.log10(1 / mse)
        return {"solver": solver, "steps": steps, "nfe": nfe(solver, steps), "psnr": p.mean().item(),
                "psnr_min": p.min().item()}  # fmt: skip

    def generate(self, seeds: int = 2, steps: int = 8) -> tuple[dict, torch.Tensor]:
        prompts = [p for _ in range(seeds) for p in S.PROMPTS]
        emb = self.adapter.encode_prompt(prompts)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn((len(prompts), *self.latents.shape[1:]), generator=g)
        out = []
        for sl in self._chunks(len(prompts)):
            kw = {k: v[sl] for k, v in emb.items()}
            out.append(self.editor.sample_latents(noise[sl], self.side, self.side, num_steps=steps, **kw))
        images = self._decode(torch.cat(out))
        det = detect(images)
        want_obj = torch.tensor([o for _ in range(seeds) for o in range(len(S.OBJECTS)) for _ in S.BACKGROUNDS])
        want_bg = torch.tensor([b for _ in range(seeds) for _ in S.OBJECTS for b in range(len(S.BACKGROUNDS))])
        obj_ok, bg_ok = det.obj == want_obj, det.bg == want_bg
        fam = {f: obj_ok[torch.tensor([S.FAMILIES[o] == f for o in want_obj.tolist()])].float().mean().item()
               for f in dict.fromkeys(S.FAMILIES)}  # fmt: skip
        misses = {}
        for i in torch.nonzero(~obj_ok).flatten().tolist():
            key = f"{S.OBJECT_NAMES[want_obj[i]]} -> {S.OBJECT_NAMES[det.obj[i]]}"
            misses[key] = misses.get(key, 0) + 1
        result = {
            "n": len(prompts),
            "steps": steps,
            "object_top1": obj_ok.float().mean().item(),
            "background": bg_ok.float().mean().item(),
            "both": (obj_ok & bg_ok).float().mean().item(),
            "object_top1_by_family": fam,
            "object_confusions": dict(sorted(misses.items(), key=lambda kv: -kv[1])),
        }
        return result, images


def run_examples(bench: Bench, folder: Path = EXAMPLES_DIR, model: str = "scenes") -> tuple[list[dict], list]:
    """The example edits from their PNG files through ``editor.edit`` at its defaults, as the CLI
    runs them; layout metrics of each result."""
    from fireflow.image import to_tensor

    rows, images = [], []
    for c in example_cases():
        out = bench.editor.edit(folder / f"{c.key}.png", c.source.prompt, c.target.prompt)
        img = (to_tensor(out.images[0])[0] + 1) / 2
        m = layout_metrics([c], img[None])[0]
        rows.append({"command": example_command(c, model), "seconds": round(out.seconds, 2), **m})
        images.append(img)
    return rows, images


#: Rows of the picture grid: ids of the set, a few per type.
GRID_ROWS = 4
#: Columns of the picture grid after source and ideal edit.
GRID_SETTINGS = [
    Setting("fireflow", 8, 0),
    Setting("fireflow", 8, 1),
    Setting("fireflow", 8, 2),
    Setting("fireflow", 8, 3),
    Setting("euler", 9, 1),
    Setting("midpoint", 4, 1),
    Setting("fireflow", 15, 2),
    Setting("fireflow", 8, 1, "add_k"),
    Setting("fireflow", 8, 1, "add_q"),
]


def _fmt(v: float, pct: bool = False) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.2f}"


def markdown(report: dict) -> str:
    g = report["generation"]
    lines = [
        f"Model: `{report['weights']}`; held-out set: {report['n_cases']} edits "
        f"({', '.join(f'{v} {k}' for k, v in report['counts'].items())}).",
        "",
        f"**Generation** (FireFlow 8 steps, {g['n']} images: every prompt, 2 noises): object top-1 "
        f"**{100 * g['object_top1']:.1f}%**, background **{100 * g['background']:.1f}%**, both "
        f"{100 * g['both']:.1f}%.",
        "",
        "**Reconstruction** of the held-out sources (own prompt, no injection):",
        "",
        "| solver | steps | NFE | PSNR (dB) | worst |",
        "|---|---|---|---|---|",
    ]
    for r in report["reconstruction"]:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['psnr']:.2f} | {r['psnr_min']:.1f} |")
    lines += [
        "",
        "**Edits** (target hit / object IoU with the source / kept-region PSNR dB; overall and per type):",
        "",
        "| setting | NFE | hit | IoU | kept dB | to ideal dB | object hit / IoU / bg dB "
        "| colour hit / IoU / bg dB | background hit / IoU / object dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["editing"]:
        o = row["summary"]["overall"]
        per = [row["summary"][t] for t in ("object", "colour", "background")]
        cells = [f"{_fmt(p['target_hit'], True)} / {_fmt(p['object_iou'])} / {_fmt(p['kept_psnr'])}" for p in per]
        lines.append(
            f"| {row['label']} | {row['nfe']} | {_fmt(o['target_hit'], True)} | {_fmt(o['object_iou'])} "
            f"| {_fmt(o['kept_psnr'])} | {_fmt(o['psnr_to_ideal'])} | " + " | ".join(cells) + " |"
        )
    if "examples" in report:
        lines += [
            "",
            "**Examples** (`examples/scenes/`, through `editor.edit` at its defaults, as the CLI runs them):",
            "",
            "| command | detected | hit | IoU | kept dB |",
            "|---|---|---|---|---|",
        ]
        for r in report["examples"]:
            lines.append(
                f"| `{r['command']}` | {r['detected']} | {'yes' if r['target_hit'] else 'no'} "
                f"| {r['object_iou']:.2f} | {r['kept_psnr']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def run_table(weights: str, out: Path, data: Path = SET_DIR, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = Bench(weights, data)
    counts = {TYPE_NAMES[t]: sum(c.type_id == t for c in bench.cases) for t in TYPE_NAMES}
    report: dict = {"weights": str(weights), "n_cases": len(bench.cases), "counts": counts}
    report["generation"], generated = bench.generate()
    g = report["generation"]
    print(f"generation: object top-1 {g['object_top1']:.1%}, background {g['background']:.1%}", flush=True)
    report["reconstruction"] = []
    for solver, steps in RECON if not quick else RECON[:3]:
        r = bench.reconstruct(solver, steps)
        report["reconstruction"].append(r)
        print(f"reconstruction {solver}-{steps} ({r['nfe']} NFE): {r['psnr']:.2f} dB", flush=True)
    report["editing"] = []
    grid_imgs = {}
    for s in all_settings(quick):
        edited = bench.edit(s)
        rows = layout_metrics(bench.cases, edited)
        summ = summarize(rows)
        entry = {**asdict(s), "label": s.label, "nfe": nfe(s.solver, s.steps), "summary": summ}
        if s == DEFAULT:  # per-edit rows for the default setting only, to keep the file small
            entry["rows"] = rows
        report["editing"].append(entry)
        grid_imgs[s] = edited
        o = summ["overall"]
        print(f"{s.label:<32} hit {o['target_hit']:.0%}  IoU {o['object_iou']:.2f}  kept {o['kept_psnr']:.2f} dB",
              flush=True)  # fmt: skip
    # Grid: a few cases of each type; source | ideal | the grid settings that were run.
    pick = []
    for t in TYPE_NAMES:
        pick += [i for i, c in enumerate(bench.cases) if c.type_id == t][:GRID_ROWS]
    idx = torch.tensor(pick)
    ideal = torch.stack([S.composite(bench.cases[i].target) for i in pick])
    cols = [bench.sources[idx], ideal] + [grid_imgs[s][idx] for s in GRID_SETTINGS if s in grid_imgs]
    report["grid"] = {
        "rows": [f"{bench.cases[i].source.prompt} -> {bench.cases[i].target.prompt}" for i in pick],
        "columns": ["source", "ideal edit"] + [s.label for s in GRID_SETTINGS if s in grid_imgs],
    }
    grid = to_grid(cols)
    atomic_write(out / "scenes_grid.png", lambda f: grid.save(f, format="PNG"))
    gen_grid = to_grid([generated[i :: len(S.BACKGROUNDS)][:20] for i in range(len(S.BACKGROUNDS))], scale=2)
    atomic_write(out / "scenes_generated.png", lambda f: gen_grid.save(f, format="PNG"))
    if not quick and EXAMPLES_DIR.is_dir():
        from fireflow.models.demo import BUNDLED

        bundled = str(weights) == "scenes" or Path(weights).resolve() == BUNDLED["scenes"].resolve()
        rows, images = run_examples(bench, model="scenes" if bundled else str(weights))
        report["examples"] = rows
        ex = example_cases()
        cols = [torch.stack([S.composite(c.source) for c in ex]), torch.stack(images)]
        cols.append(torch.stack([S.composite(c.target) for c in ex]))
        grid = to_grid(cols)
        atomic_write(out / "scenes_examples.png", lambda f: grid.save(f, format="PNG"))
        hits = sum(r["target_hit"] for r in rows)
        print(f"examples: {hits}/{len(rows)} hit the target")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    md = markdown(report)
    atomic_write(out / "scenes_table.md", lambda f: f.write(md.encode()))
    text = json.dumps(report, indent=1, default=float)
    atomic_write(out / "scenes_eval.json", lambda f: f.write(text.encode()))
    print(md)
    print(f"wrote {out}/scenes_eval.json, scenes_table.md, scenes_grid.png ({report['seconds']} s)")
    return report


def run_probe(weights: str, data: Path = SET_DIR) -> dict:
    """The cheap subset for a training curve: generation (one noise per prompt), FireFlow-8
    reconstruction, and the FireFlow-8 edits at inject 0 and 1."""
    bench = Bench(weights, data)
    gen, _ = bench.generate(seeds=1)
    row = {"weights": str(weights), "object_top1": gen["object_top1"], "background": gen["background"]}
    row["recon_fireflow8"] = bench.reconstruct("fireflow", 8)["psnr"]
    for k in (0, 1):
        o = summarize(layout_metrics(bench.cases, bench.edit(Setting("fireflow", 8, k))))["overall"]
        row[f"inject{k}"] = {m: round(o[m], 4) for m in METRICS}
    print(json.dumps(row), flush=True)
    return row


def plot_curve(log: Path, out: Path, probes: Path | None = None) -> None:
    """The training loss from ``log.jsonl`` (and probe results, if given) as a PNG."""
    plt = pyplot()
    if plt is None:
        raise SystemExit("the training curve needs matplotlib: pip install matplotlib")
    recs = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in recs}  # a resumed run may log a step twice: keep the last
    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 3 if probes else 1, figsize=(14 if probes else 5, 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [by_step[s]["loss"] for s in steps], lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of 50 batches)")
    lr = ax.twinx()
    lr.plot(steps, [by_step[s]["lr"] for s in steps], color="gray", lw=0.8, ls="--")
    lr.set_ylabel("learning rate", color="gray")
    if probes:
        rows = [json.loads(line) for line in Path(probes).read_text().splitlines() if line.strip()]
        xs = [r["step"] for r in rows]
        ax2 = axes[0, 1]
        ax2.plot(xs, [r["object_top1"] for r in rows], "o-", label="generation object top-1")
        ax2.plot(xs, [r["inject1"]["target_hit"] for r in rows], "s-", label="edit target hit (inject 1)")
        ax2.plot(xs, [r["inject1"]["object_iou"] for r in rows], "^-", label="edit object IoU (inject 1)")
        ax2.set_xlabel("step")
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7)
        ax3 = axes[0, 2]
        ax3.plot(xs, [r["recon_fireflow8"] for r in rows], "o-", label="reconstruction FireFlow-8 (dB)")
        ax3.plot(xs, [r["inject1"]["kept_psnr"] for r in rows], "s-", label="edit kept-region PSNR, inject 1 (dB)")
        ax3.plot(xs, [r["inject0"]["kept_psnr"] for r in rows], "v--", label="edit kept-region PSNR, inject 0 (dB)")
        ax3.set_xlabel("step")
        ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def run_layout(data: Path, edits: Path) -> dict:
    """Layout metrics of a ``fireflow bench pie`` output folder on this set."""
    cases = load_set(data)
    rows = layout_metrics(cases, load_images(edits, cases))
    summ = summarize(rows)
    text = json.dumps({"summary": summ, "rows": rows}, indent=1)
    atomic_write(Path(edits) / "layout_metrics.json", lambda f: f.write(text.encode()))
    for k, v in summ.items():
        print(f"{k:<11} n {v['n']:>3}  hit {_fmt(v['target_hit'], True):>4}  IoU {_fmt(v['object_iou'])}  "
              f"kept {_fmt(v['kept_psnr'])} dB  to ideal {_fmt(v['psnr_to_ideal'])} dB")  # fmt: skip
    print(f"wrote {Path(edits) / 'layout_metrics.json'}")
    return summ


def main() -> None:
    p = argparse.ArgumentParser(description="Layout-aware evaluation of FireFlow edits on held-out scenes.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-set", help="write the held-out edit set in PIE-Bench format")
    w.add_argument("--out", type=Path, default=SET_DIR)
    t = sub.add_parser("table", help="generation, reconstruction and the editing table with a picture grid")
    t.add_argument("--weights", required=True, help="a demo-architecture weights folder (config.json + safetensors)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--data", type=Path, default=SET_DIR)
    t.add_argument("--quick", action="store_true", help="inject 1 only, three reconstructions")
    t.add_argument("--threads", type=int, default=1)
    pr = sub.add_parser("probe", help="the cheap subset of `table`, one JSON line (for a training curve)")
    pr.add_argument("--weights", required=True)
    pr.add_argument("--threads", type=int, default=1)
    cu = sub.add_parser("curve", help="plot a run's log.jsonl (and probe lines) to a PNG")
    cu.add_argument("--log", type=Path, required=True)
    cu.add_argument("--probes", type=Path, default=None, help="JSON lines from `probe`, each with a step")
    cu.add_argument("--out", type=Path, required=True)
    ex = sub.add_parser("write-examples", help="write the example scenes (32x32 PNGs) and prompts.json")
    ex.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    lay = sub.add_parser("layout", help="layout metrics of a `fireflow bench pie` run on this set")
    lay.add_argument("--data", type=Path, default=SET_DIR)
    lay.add_argument("--edits", type=Path, required=True)
    args = p.parse_args()
    if args.command == "write-set":
        cases = write_set(args.out)
        print(f"{len(cases)} edits -> {args.out}")
    elif args.command == "write-examples":
        for c in write_examples(args.out):
            print(example_command(c))
    elif args.command == "probe":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        run_probe(args.weights)
    elif args.command == "curve":
        plot_curve(args.log, args.out, args.probes)
    elif args.command == "table":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        run_table(args.weights, args.out, args.data, args.quick)
    else:
        run_layout(args.data, args.edits)


if __name__ == "__main__":
    main()
