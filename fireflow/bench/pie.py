"""PIE-Bench: edit every image (``bench pie``) and score the edits (``eval pie``).

``bench pie`` turns the mapping file into manifest lines (in memory) and runs them with the
``fireflow batch`` runner (:func:`fireflow.batch.run_batch`, one image a call), which writes
``OUT/annotation_images/<image_path>`` (the data folder's layout) and ``OUT/results.jsonl``; bench
pie adds one JSON record per image. It is resumable and shards across processes:

- an image is done when its result is ok and its image exists; the image is written before the
  result, then the record ``OUT/records/<id>.json``, all atomic, so a killed run loses nothing and
  a rerun repeats nothing that was done (a record lost to the kill is written from the result;
  folders of older bench pie runs, records only, resume from their records);
- under ``torchrun`` / ``accelerate launch`` process ``RANK`` of ``WORLD_SIZE`` takes the images
  ``RANK, RANK + WORLD_SIZE, ...`` of the sorted id list: disjoint shares;
- a process that finishes with every image done merges all records into ``OUT/records.jsonl``
  (sorted by id, atomic), so the complete file is left at the end.

``eval pie`` follows docs/evaluation.md: per-image CSV, per-type and overall means (NaN rows
dropped) in PnPInversion's scaling, and the same as JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fireflow.bench import _editing, _io
from fireflow.bench._main import run_main
from fireflow.bench.synthetic import PIE_TYPES

RECORDS_DIR = "records"
MERGED = "records.jsonl"
RUN_FILE = "run.json"
#: How a masked run is labelled in its settings and in every table that shows it.
MASK_LABEL = "ground-truth masks"
IMAGES_DIR = "annotation_images"
#: The demo benchmark set, installed with the package: 140 PIE-Bench-format edits of held-out 32x32
#: scenes for the bundled ``scenes`` model (written by ``python -m research.bundled.scenes_eval write-set``).
#: ``--data scenes`` names it.
SCENES_PIE = Path(__file__).with_name("scenes_pie")
BUNDLED_SETS = {"scenes": SCENES_PIE}


class BenchError(ValueError):
    """Bad input: reported as one line, exit status 2."""


# ---- the dataset ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PieItem:
    key: str
    image_path: str
    type_id: str
    original_prompt: str
    editing_prompt: str
    mask: list[int]

    @property
    def source_prompt(self) -> str:
        return clean_prompt(self.original_prompt)

    @property
    def target_prompt(self) -> str:
        return clean_prompt(self.editing_prompt)


def clean_prompt(prompt: str) -> str:
    """Remove PIE-Bench's ``[`` ``]`` edit markers (nothing else, as the reference runners do)."""
    return prompt.replace("[", "").replace("]", "")


def parse_types(values: Iterable[str] | None) -> set[str] | None:
    """Type ids ``0``-``9`` or folder names (``6_change_attribute_color_40``); None: all."""
    if not values:
        return None
    by_folder = {v: k for k, v in PIE_TYPES.items()}
    out = set()
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if part in PIE_TYPES:
                out.add(part)
            elif part in by_folder:
                out.add(by_folder[part])
            elif part:
                raise BenchError(
                    f"--types {part!r} is not an editing type; use 0-9 or a folder name (1_change_object_80)"
                )
    return out


def data_folder(data: str | Path) -> Path:
    """``--data``: a bundled set's name (``scenes``: :data:`SCENES_PIE`) or a PIE-Bench folder."""
    return BUNDLED_SETS.get(str(data), Path(data))


def load_pie(data: Path, types: set[str] | None = None) -> list[PieItem]:
    """The entries of ``DATA/mapping_file.json``, sorted by id, optionally of some types only."""
    data = Path(data)
    mapping_file = data / "mapping_file.json"
    if not mapping_file.is_file():
        raise BenchError(
            f"--data {data}: no mapping_file.json there; expected PIE-Bench's folder "
            "(mapping_file.json and annotation_images/)"
        )
    try:
        mapping = json.loads(mapping_file.read_text())
    except json.JSONDecodeError as e:
        raise BenchError(f"{mapping_file} is not valid JSON: {e}") from None
    if not isinstance(mapping, dict):
        raise BenchError(f"{mapping_file}: expected an object keyed by image id, got {type(mapping).__name__}")
    items = []
    for key in sorted(mapping):
        e = mapping[key]
        # Ids name record files and image paths name outputs: neither may leave the output folder.
        if not re.fullmatch(r"[\w.-]+", key) or key.startswith("."):
            raise BenchError(f"{mapping_file}: image id {key!r} is not a plain name like 000000000000")
        try:
            item = PieItem(
                key,
                e["image_path"],
                str(e["editing_type_id"]),
                e["original_prompt"],
                e["editing_prompt"],
                list(e["mask"]),
            )
        except (KeyError, TypeError) as err:
            raise BenchError(f"{mapping_file}: entry {key} lacks field {err}") from None
        rel = PurePosixPath(item.image_path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise BenchError(f"{mapping_file}: entry {key} image_path {item.image_path!r} must be a relative path")
        if types is None or item.type_id in types:
            items.append(item)
    if not items:
        raise BenchError(f"{mapping_file}: no images of types {sorted(types or [])}")
    return items


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def manifest_rows(data: Path, types: set[str] | None = None, absolute: bool = True) -> list[dict[str, Any]]:
    """PIE-Bench's mapping file as ``fireflow batch`` manifest lines (mask-free edits): ids kept,
    prompts without brackets, outputs laid out as ``eval pie`` reads them (``annotation_images/``).
    Image paths are absolute, or (``absolute=False``) relative to ``data``."""
    data = Path(data)
    return [
        {
            "id": it.key,
            "image": str((data / IMAGES_DIR / it.image_path).resolve())
            if absolute
            else f"{IMAGES_DIR}/{it.image_path}",
            "source": it.source_prompt,
            "target": it.target_prompt,
            "output": f"{IMAGES_DIR}/{it.image_path}",
        }
        for it in load_pie(data, types)
    ]


def write_manifest(data: Path, path: Path, types: set[str] | None = None) -> Path:
    """:func:`manifest_rows` written as JSONL (atomic)."""
    _io.write_text(path, "".join(json.dumps(r) + "\n" for r in manifest_rows(data, types)))
    return Path(path)


# ---- bench pie -----------------------------------------------------------------------------------


def record_path(out: Path, key: str) -> Path:
    return out / RECORDS_DIR / f"{key}.json"


def is_done(out: Path, item: PieItem) -> bool:
    return record_path(out, item.key).is_file() and (out / IMAGES_DIR / item.image_path).is_file()


def merge_records(out: Path) -> int:
    """Write every per-image record into ``OUT/records.jsonl``, sorted by id. Returns the count."""
    files = sorted((out / RECORDS_DIR).glob("*.json"))
    lines = [json.dumps(json.loads(f.read_text()), sort_keys=True) for f in files]
    _io.write_text(out / MERGED, "".join(line + "\n" for line in lines))
    return len(lines)


def check_inputs(data: Path, out: Path, types: set[str] | None, run: dict[str, Any]) -> list[PieItem]:
    """Everything checkable before a model is loaded: the dataset, its source images, and that
    ``out`` holds no run with other settings (resuming it would mix two configurations)."""
    items = load_pie(data, types)
    missing = [it.image_path for it in items if not (Path(data) / IMAGES_DIR / it.image_path).is_file()]
    if missing:
        raise BenchError(f"{len(missing)} source images missing under {Path(data) / IMAGES_DIR}, first: {missing[0]}")
    path = Path(out) / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        flat_old = {"model": old.get("model"), **old.get("settings", {})}
        flat_new = {"model": run["model"], **run["settings"]}
        diff = [k for k in dict.fromkeys([*flat_old, *flat_new]) if flat_old.get(k) != flat_new.get(k)]
        if diff:
            said = "; ".join(f"{k}: {flat_old.get(k)!r} there, {flat_new.get(k)!r} now" for k in diff)
            raise BenchError(f"--out {out} holds a run with other settings ({said}); use another --out")
    return items


class _EditFnEditor:
    """An :data:`_editing.EditFn` (one image, one target) as the editor :func:`fireflow.batch.run_batch`
    calls: the knobs live in the function, so settings pass through."""

    def __init__(self, edit: _editing.EditFn):
        self.fn = edit

    def resolve(self, settings: Any) -> Any:
        return settings

    def edit(self, image, source, targets, settings=None, mask=None, paste_pixels=False) -> SimpleNamespace:
        extra = {} if mask is None else {"mask": mask}  # paste_pixels: the function's own setting
        outs = [self.fn(image, source, t, **extra) for t in targets]
        return SimpleNamespace(
            images=[o.image for o in outs],
            settings=None,
            nfe=sum(o.nfe for o in outs),
            seconds=sum(o.seconds for o in outs),
            transformer_calls=None,
        )


def pie_lines(data: Path, items: list[PieItem], use_mask: bool = False, paste_pixels: bool = False) -> list[Any]:
    """The items as :func:`fireflow.batch.run_batch` lines, built in memory (:func:`manifest_rows`,
    image paths relative to ``data``); with ``use_mask`` each carries its ground-truth mask, decoded
    at its image's size."""
    from fireflow import batch
    from fireflow.settings import EditSettings

    base = EditSettings().check()
    keep = {it.key for it in items}
    rows = [r for r in manifest_rows(data, None, absolute=False) if r["id"] in keep]
    by_id = {it.key: it for it in items}
    lines = []
    for n, row in enumerate(rows, 1):
        if use_mask:
            from fireflow.metrics import decode_pie_mask

            with Image.open(Path(data) / row["image"]) as im:
                w, h = im.size
            row["mask"] = decode_pie_mask(by_id[row["id"]].mask, (h, w)).astype(bool)
            row["paste_pixels"] = bool(paste_pixels)
        lines.append(batch.parse_line(n, row, base, Path(data), None))
    return lines


def _pie_record(it: PieItem, rec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Today's ``records/<id>.json`` from the runner's result of the item."""
    return {
        "id": it.key,
        "image_path": it.image_path,
        "editing_type_id": it.type_id,
        "source_prompt": it.source_prompt,
        "target_prompt": it.target_prompt,
        "model": rec.get("model"),
        "settings": settings,
        "nfe": rec.get("nfe"),
        "seconds": rec.get("seconds"),
        "size": rec.get("size"),
        "model_size": rec.get("model_size"),
        "rank": rec.get("rank"),
        "world_size": rec.get("world_size"),
        "run_id": rec.get("run_id"),
    }


def _adopt_records(out: Path, items: list[PieItem], lines: list[Any], rank: int) -> None:
    """Images done by an earlier bench pie (a record, no runner result: runs before bench pie used the
    runner) get a runner result, so that they are not edited again."""
    from fireflow import batch

    done = batch.latest(out, batch.all_records(out))
    by_id = {ln.id: ln for ln in lines}
    old = [
        it
        for it in items
        if is_done(out, it) and not batch.result_done(out, done.get(it.key, {})) and by_id[it.key].error is None
    ]
    if not old:
        return
    shard = batch.Shard(batch.shard_path(out, rank))
    try:
        for it in old:
            r = json.loads(record_path(out, it.key).read_text())
            ln = by_id[it.key]
            shard.append(
                {
                    "id": ln.id,
                    "line": ln.line,
                    "hash": ln.hash,
                    "image": ln.raw.get("image"),
                    "source": ln.source,
                    "targets": ln.targets,
                    "outputs": ln.outputs,
                    "status": "ok",
                    "error": None,
                    "stage": None,
                    "settings": None,
                    "seconds": r.get("seconds"),
                    "nfe": r.get("nfe"),
                    "transformer_calls": None,
                    "group": None,
                    "model": r.get("model"),
                    "rank": r.get("rank"),
                    "world_size": r.get("world_size"),
                    "run_id": r.get("run_id"),
                    "size": r.get("size"),
                    "model_size": r.get("model_size"),
                    "finished": 0,
                }
            )
    finally:
        shard.close()


def run_pie(
    data: Path,
    out: Path,
    edit: _editing.EditFn,
    settings: dict[str, Any],
    model: str,
    types: set[str] | None = None,
    limit: int | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict[str, int]:
    """Edit this process's share of the images not yet done, through the ``fireflow batch`` runner
    (:func:`fireflow.batch.run_batch`, one image a call), writing ``records/<id>.json`` per image and
    ``records.jsonl`` once all are done. ``limit`` caps the edits of this call. Returns counts:
    ``share``, ``skipped`` (already done), ``edited``, ``resized``, ``merged`` (records in the merged
    file, or 0 when other shares are still running). A failed edit stops the run
    (:class:`fireflow.batch.StrictStop`), recorded in ``results.jsonl``."""
    from fireflow import batch

    data, out = Path(data), Path(out)
    run = {"model": model, "settings": settings}
    items = check_inputs(data, out, types, run)
    by_id = {it.key: it for it in items}
    lines = pie_lines(data, items, bool(settings.get("mask")), bool(settings.get("paste_pixels")))
    bad = next((ln for ln in lines if ln.error), None)
    if bad is not None:
        raise BenchError(f"image {by_id[bad.id].image_path}: {bad.error}")
    if (out / RUN_FILE).is_file():
        _adopt_records(out, items, lines, rank)
    resized = 0

    def on_output(ln, images):
        # The model works at another size (the demo model at 32x32; FLUX crops to a multiple of 16):
        # PIE-Bench scores an edit against its source pixel for pixel, so it is brought back to the
        # source's size, and the record keeps the size the model made.
        nonlocal resized
        with Image.open(ln.image) as im:
            size = im.size
        made = images[0].size
        if made != size:
            images = [im.resize(size, Image.Resampling.LANCZOS) for im in images]
            resized += 1
        return images, {"size": list(size), "model_size": list(made)}

    def on_result(ln, rec):
        _io.write_json(record_path(out, ln.id), _pie_record(by_id[ln.id], rec, settings))

    summary = batch.run_batch(
        None,
        out,
        _EditFnEditor(edit),
        model=model,
        max_batch=1,  # one image a call: process r takes the images r, r + N, ... of the sorted ids
        strict=True,
        max_pixels=None,
        rank=rank,
        world=world,
        progress=progress,
        lines=lines,
        limit=limit,
        on_output=on_output,
        on_result=on_result,
        save=_io.save_image,
        run_info=run,
        desc=f"pie {rank}/{world}" if world > 1 else "pie",
    )
    # A record lost to a kill between the result and its record file is written from the result.
    for rec in batch.read_results(out, list(by_id)):
        if batch.result_done(out, rec) and not record_path(out, rec["id"]).is_file():
            _io.write_json(record_path(out, rec["id"]), _pie_record(by_id[rec["id"]], rec, settings))
    all_done = all(is_done(out, it) for it in items)
    merged = merge_records(out) if all_done else 0
    return {
        "share": summary.share,
        "skipped": summary.skipped,
        "edited": summary.edited,
        "resized": resized,
        "merged": merged,
    }


DATA_HELP = "PIE-Bench folder (mapping_file.json, annotation_images/), or `scenes`: the bundled demo set"


def add_bench_parser(subparsers: argparse._SubParsersAction, name: str = "pie") -> argparse.ArgumentParser:
    """Register ``pie`` under ``fireflow bench``."""
    from fireflow.cli import add_edit_options, add_model_options

    p = subparsers.add_parser(
        name,
        help="edit PIE-Bench (resumable; shards under torchrun / accelerate launch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder (resumes what is there)")
    p.add_argument("--types", nargs="+", default=None, help="editing types: ids 0-9 or folder names (default all)")
    p.add_argument("--limit", type=int, default=None, help="edit at most this many images (per process) in this run")
    p.add_argument(
        "--use-mask",
        action="store_true",
        help="edit inside each image's ground-truth mask only (a masked run: scored apart from mask-free ones)",
    )
    p.add_argument("--paste-pixels", action="store_true", help="with --use-mask: paste the source pixels outside")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    add_edit_options(p)
    p.set_defaults(func=bench_cli)
    return p


def bench_cli(args: argparse.Namespace) -> dict[str, int]:
    """``fireflow bench pie``. Bad input raises ValueError (the CLI prints it, exit status 2)."""
    settings = _editing.settings_from_args(args)
    if args.paste_pixels and not args.use_mask:
        raise BenchError("--paste-pixels needs --use-mask: the pixels outside the mask are pasted")
    if args.use_mask:  # recorded in run.json: a masked run never resumes into a mask-free one
        settings["mask"] = MASK_LABEL
        settings["paste_pixels"] = bool(args.paste_pixels)
    rank, world, local = _editing.dist_env()
    types = parse_types(args.types)
    args.data = data_folder(args.data)
    check_inputs(args.data, args.out, types, {"model": str(args.model), "settings": settings})  # before the model
    editor = _editing.load_editor(args, local)
    edit = _editing.edit_fn(editor, settings, args.feature_device)
    from fireflow.batch import StrictStop

    try:
        counts = run_pie(
            args.data,
            args.out,
            edit,
            settings,
            str(args.model),
            types,
            args.limit,
            rank,
            world,
            progress=not args.quiet,
        )
    except StrictStop as e:
        print(f"fireflow bench pie: stopped at {e} (recorded in {args.out / 'results.jsonl'})", file=sys.stderr)
        raise SystemExit(1) from None
    msg = f"[rank {rank}/{world}] edited {counts['edited']}, earlier {counts['skipped']} of {counts['share']}"
    if counts["resized"]:
        msg += f" ({counts['resized']} made at the model's own size, resized to their source's)"
    if counts["merged"]:
        msg += f"; all done: {counts['merged']} records in {args.out / MERGED}"
    print(msg)
    return counts


# ---- eval pie ------------------------------------------------------------------------------------

#: metric -> (column title, scale in PnPInversion's tables)
COLUMNS = {
    "structure_distance": ("Structure x1e3", 1e3),
    "psnr": ("PSNR", 1.0),
    "lpips": ("LPIPS x1e3", 1e3),
    "mse": ("MSE x1e4", 1e4),
    "ssim": ("SSIM x1e2", 1e2),
    "clip_whole": ("CLIP whole", 1.0),
    "clip_edited": ("CLIP edited", 1.0),
}


@dataclass
class MetricModels:
    """The learned metrics' models; None skips the metrics that need it."""

    structure: Any = None  # fireflow.metrics.StructureDistance
    lpips: Any = None  # fireflow.metrics.SqueezeLPIPS
    clip: Any = None  # fireflow.metrics.ClipScore


def load_metric_models(
    dino: str | None,
    clip: str | None,
    squeezenet: str | None,
    lpips_heads: str | None,
    device: str,
    skip: Iterable[str] = (),
) -> tuple[MetricModels, list[str]]:
    """Load what is on this machine; return the models and one message per metric skipped."""
    from fireflow import metrics as M

    models, notes = MetricModels(), []
    loaders = {
        "structure": lambda: M.load_structure_distance(dino or M.DINO_MODEL, device),
        "lpips": lambda: M.load_lpips(squeezenet, lpips_heads, device),
        "clip": lambda: M.load_clip_score(clip or M.CLIP_MODEL, device),
    }
    for name, load in loaders.items():
        if name in skip:
            notes.append(f"{name}: skipped (--skip)")
            continue
        try:
            setattr(models, name, load())
        except M.MissingWeightsError as e:
            notes.append(f"{name}: skipped: {e}")
    return models, notes


def evaluate_image(item: PieItem, source: np.ndarray, edited: np.ndarray, models: MetricModels) -> dict[str, float]:
    from fireflow import metrics as M

    if edited.shape != source.shape:
        raise BenchError(
            f"{item.image_path}: edited image is {edited.shape[1]}x{edited.shape[0]}, the source "
            f"{source.shape[1]}x{source.shape[0]}; PIE-Bench compares images of equal size"
        )
    mask = M.decode_pie_mask(item.mask, size=source.shape[:2])
    row: dict[str, float] = {}
    if models.structure is not None:
        row["structure_distance"] = models.structure(source, edited)
    row.update(M.background_metrics(source, edited, mask, lpips=models.lpips))
    if models.clip is not None:
        row["clip_whole"], row["clip_edited"] = models.clip.whole_and_edited(edited, mask, item.target_prompt)
    return row


def summarize(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """Means per editing type and overall, NaN rows dropped per metric; raw and scaled."""

    def means(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(rs), "raw": {}, "scaled": {}}
        for m in metrics:
            vals = [r[m] for r in rs if not math.isnan(r[m])]
            # inf PSNR (an untouched background) is kept: it is what the metric says.
            mean = float(np.mean(vals)) if vals else math.nan
            out["raw"][m] = mean
            out["scaled"][m] = mean * COLUMNS[m][1]
            out.setdefault("dropped_nan", {})[m] = len(rs) - len(vals)
        return out

    per_type = {}
    for t in sorted({r["editing_type_id"] for r in rows}):
        per_type[PIE_TYPES.get(t, t)] = means([r for r in rows if r["editing_type_id"] == t])
    return {"per_type": per_type, "overall": means(rows)}


def format_table(summary: dict[str, Any], metrics: list[str]) -> str:
    head = ["Type", "N"] + [COLUMNS[m][0] for m in metrics]
    body = [[name, str(s["n"])] + [f"{s['scaled'][m]:.2f}" for m in metrics] for name, s in summary["per_type"].items()]
    o = summary["overall"]
    body.append(["overall", str(o["n"])] + [f"{o['scaled'][m]:.2f}" for m in metrics])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join(
        [
            line(head),
            "  ".join("-" * w for w in widths),
            *map(line, body[:-1]),
            "  ".join("-" * w for w in widths),
            line(body[-1]),
        ]
    )


def check_edits(data: Path, edits: Path, types: set[str] | None = None) -> list[PieItem]:
    """The dataset's items, after checking that every one has its edited image."""
    items = load_pie(data, types)
    missing = [it.image_path for it in items if not (Path(edits) / IMAGES_DIR / it.image_path).is_file()]
    if missing:
        raise BenchError(
            f"{len(missing)} of {len(items)} edited images missing under {Path(edits) / IMAGES_DIR} "
            f"(first: {missing[0]}); finish `fireflow bench pie` first or pass --types"
        )
    return items


def evaluate_pie(
    data: Path,
    edits: Path,
    out: Path | None,
    models: MetricModels,
    types: set[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``EDITS/annotation_images/<image_path>`` against the sources. Writes
    ``OUT/eval_per_image.csv`` and ``OUT/eval_summary.json`` (OUT defaults to EDITS) once all images
    are scored, and returns the summary."""
    data, edits = Path(data), Path(edits)
    out = Path(out) if out is not None else edits
    items = check_edits(data, edits, types)
    rows = []
    for it in tqdm(items, desc="eval pie", disable=not progress):
        src = np.asarray(load_rgb(data / IMAGES_DIR / it.image_path))
        edt = np.asarray(load_rgb(edits / IMAGES_DIR / it.image_path))
        rows.append(
            {
                "id": it.key,
                "image_path": it.image_path,
                "editing_type_id": it.type_id,
                **evaluate_image(it, src, edt, models),
            }
        )
    metrics = [m for m in COLUMNS if m in rows[0]]
    summary = summarize(rows, metrics)
    records = edits / MERGED
    batch_results = edits / "results.jsonl"  # a `fireflow batch` run of a PIE-format manifest
    if records.is_file() or batch_results.is_file():
        ids = {it.key for it in items}
        if records.is_file():
            recs = [r for r in map(json.loads, records.read_text().splitlines()) if r["id"] in ids]
        else:
            from fireflow.batch import read_results

            recs = [r for r in read_results(edits, sorted(ids)) if r.get("status") == "ok"]
        if recs:
            summary["model"], summary["settings"] = recs[0].get("model"), recs[0].get("settings")
            summary["nfe"] = float(np.mean([r["nfe"] for r in recs]))
            summary["seconds"] = float(np.mean([r["seconds"] for r in recs]))
    summary["metrics"] = metrics
    summary["scale"] = {m: COLUMNS[m][1] for m in metrics}
    run_file = edits / RUN_FILE
    run_settings = json.loads(run_file.read_text()).get("settings", {}) if run_file.is_file() else {}
    summary["masked"] = bool(run_settings.get("mask") or (summary.get("settings") or {}).get("mask"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "image_path", "editing_type_id", *metrics], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _io.write_text(out / "eval_per_image.csv", buf.getvalue())
    _io.write_json(out / "eval_summary.json", summary)
    summary["table"] = format_table(summary, metrics)
    if summary["masked"]:
        summary["table"] = (
            f"MASKED run (edits confined to the {MASK_LABEL}; not comparable to mask-free runs)\n" + (summary["table"])
        )
    return summary


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """One overall row per edits folder, side by side (the paper's table layout). Masked runs get
    a table of their own, labelled: their background numbers measure the mask, not the method."""
    free = {k: s for k, s in summaries.items() if not s.get("masked")}
    masked = {k: s for k, s in summaries.items() if s.get("masked")}
    parts = []
    if free:
        parts.append(("mask-free runs\n" if masked else "") + _comparison(free))
    if masked:
        parts.append(f"MASKED runs ({MASK_LABEL}; not comparable to mask-free runs)\n" + _comparison(masked))
    return "\n\n".join(parts)


def _comparison(summaries: dict[str, dict[str, Any]]) -> str:
    metrics = [m for m in COLUMNS if all(m in s["metrics"] for s in summaries.values())]
    head = ["edits", "N", "NFE", *[COLUMNS[m][0] for m in metrics]]
    body = []
    for name, s in summaries.items():
        nfe = f"{s['nfe']:.0f}" if "nfe" in s else "-"
        body.append([name, str(s["overall"]["n"]), nfe, *[f"{s['overall']['scaled'][m]:.2f}" for m in metrics]])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_eval_parser(subparsers: argparse._SubParsersAction, name: str = "pie") -> argparse.ArgumentParser:
    """Register ``pie`` under ``fireflow eval``."""
    p = subparsers.add_parser(name, help="score PIE-Bench edits (structure, background, CLIP)")
    p.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    p.add_argument(
        "--edits", required=True, type=Path, nargs="+", help="--out folder(s) of `fireflow bench pie`; several compare"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write CSV and JSON (default: each --edits; OUT/<name> for several)",
    )
    p.add_argument("--types", nargs="+", default=None, help="editing types: ids 0-9 or folder names (default all)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    w = p.add_argument_group("metric weights (local files / HF cache only, never downloaded)")
    w.add_argument("--dino", default=None, help="DINO ViT-B/8: folder or hub id in the cache (facebook/dino-vitb8)")
    w.add_argument("--clip", default=None, help="CLIP ViT-L/14: folder or hub id (openai/clip-vit-large-patch14)")
    w.add_argument("--squeezenet", default=None, help="torchvision squeezenet1_1 state dict (.pth)")
    w.add_argument("--lpips-heads", default=None, help="LPIPS v0.1 squeeze.pth (default: lpips/torchmetrics copy)")
    w.add_argument("--skip", nargs="+", default=[], choices=["structure", "lpips", "clip"], help="metrics to skip")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=eval_cli)
    return p


def eval_cli(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``fireflow eval pie``. Bad input raises ValueError (the CLI prints it, exit status 2)."""
    types = parse_types(args.types)
    args.data = data_folder(args.data)
    edits = list(dict.fromkeys(args.edits))
    names = [e.resolve().name for e in edits]
    if len(set(names)) != len(names):
        raise BenchError(f"--edits folders must have distinct names to be compared, got {', '.join(names)}")
    for e in edits:
        check_edits(args.data, e, types)  # before loading any model
    device = args.device or _editing.default_device(0)
    models, notes = load_metric_models(args.dino, args.clip, args.squeezenet, args.lpips_heads, device, args.skip)
    for n in notes:
        print(n, file=sys.stderr)
    summaries = {}
    for name, e in zip(names, edits, strict=True):
        out = e if args.out is None else (args.out / name if len(edits) > 1 else args.out)
        summaries[name] = evaluate_pie(args.data, e, out, models, types, progress=not args.quiet)
        print(f"\n{e}\n{summaries[name]['table']}\nwrote {out / 'eval_per_image.csv'} and eval_summary.json")
    if len(edits) > 1:
        table = format_comparison(summaries)
        print(f"\noverall\n{table}")
        if args.out is not None:
            _io.write_text(args.out / "comparison.txt", table + "\n")
    return summaries


def main(argv: list[str] | None = None) -> int:
    """``python -m fireflow.bench.pie bench ...`` or ``python -m fireflow.bench.pie eval ...``."""
    parser = argparse.ArgumentParser(prog="python -m fireflow.bench.pie")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub, "bench")
    add_eval_parser(sub, "eval")
    return run_main(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
