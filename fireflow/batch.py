"""Edit a whole dataset: ``fireflow batch MANIFEST --out DIR``, resumable and sharded.

The manifest is JSONL (one JSON object a line) or CSV with a header row. Fields of one edit:

- ``image``, ``source``, ``target`` (a string, or a list: JSON list; in CSV a cell ``["a", "b"]``);
- optional ``mask`` (white = edit), ``paste_pixels`` (with a mask), ``id`` (names the outputs;
  default ``line-NNNNNN``, the line number: the file's line for JSONL, the row after the header
  for CSV), ``output`` (a path under DIR, or a list of one per target; default
  ``images/ID.png``, ``images/ID-I.png`` for several targets);
- any edit knob by its API name (``num_steps``, ``inject``, ``guidance``, ``solver``, ``blocks``,
  ...: ``fireflow.settings.KNOBS``), overriding the command's flags for that line.

Paths are relative to the manifest's folder. Every line is checked before any model loads (files
exist and their headers decode, masks load, knob types and ranges, ids and outputs distinct);
block specs are checked against the model's blocks right after it loads, before the first edit.
A bad line is recorded with its error and skipped; the run goes on (``--strict``: it stops at the
first) and exits 1 at the end if any line failed.

Lines sharing an image, a source prompt, a mask and knobs are one inversion with their targets
batched, up to ``--max-batch`` targets a call: 9 + 9k NFE for k targets at the defaults
(``--max-batch 1``: one call a line). ``nfe``, ``transformer_calls`` and ``seconds`` in a result
are those of the line's call, i.e. of its group (``group``, ``group_lines``, ``group_targets``
say which); the run's total is the sum over distinct groups.

Results: ``DIR/results.jsonl``, one JSON object per manifest line in manifest order: ``id``,
``line``, ``status`` (``ok`` / ``error``), ``outputs`` (paths relative to DIR), ``seconds``,
``nfe``, ``transformer_calls``, ``settings`` (resolved), ``error`` (null when ok), ``stage``
(``check``, ``model`` or ``edit`` for errors), ``group``, ``rank``, ``run_id``, ``hash``. While
running, process ``r`` appends to ``DIR/results.rank{r}.jsonl`` (flush + fsync a line, after the
line's outputs were written atomically); the merged file is written (atomically) when every line
is accounted for, and :func:`read_results` merges shards at any time. A rerun skips lines done and
redoes the rest (failed lines too); the same folder refuses other model, knobs or ``--max-batch``
(``DIR/run.json``), and a manifest line changed since it was done.

Under ``torchrun`` / ``accelerate launch`` (RANK, WORLD_SIZE, LOCAL_RANK), process r of N takes
the groups r, r + N, ... (groups are the unit: the same calls run whatever N is, so the outputs do
not depend on it). On CPU each process runs on ``--threads`` threads (default: OMP_NUM_THREADS,
else 1, which torchrun sets as well) so that a 1-process and an N-process run compute the same.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fireflow.settings import KNOBS, EditSettings, SettingError

RESULTS = "results.jsonl"
RUN_FILE = "run.json"
IMAGES_DIR = "images"
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FIELDS = ("id", "image", "source", "target", "mask", "paste_pixels", "output")
DEFAULT_MAX_BATCH = 4
_ID = re.compile(r"[\w.-]+")
#: Bundled manifests by name: ``scenes`` is the held-out scenes set (``fireflow bench pie --data
#: scenes``) as 140 mask-free edits for ``--model scenes``, its outputs laid out as ``eval pie`` reads.
BUNDLED = {"scenes": Path(__file__).with_name("bench") / "scenes_pie" / "manifest.jsonl"}


class BatchError(ValueError):
    """Bad input for the whole run (not one line's): one line on stderr, exit status 2."""


class LineError(ValueError):
    """One manifest line is bad."""


class StrictStop(RuntimeError):
    """``--strict``: a line failed."""


# ---- the manifest --------------------------------------------------------------------------------


@dataclass
class Line:
    """One manifest line, parsed. ``error`` is set (with ``stage``) when the line is bad."""

    line: int
    id: str
    raw: dict[str, Any]
    image: Path | None = None
    source: str = ""
    targets: list[str] = field(default_factory=list)
    mask: Path | Any | None = None  # a file, or (lines built in memory) a bool array [H, W]
    paste_pixels: bool = False
    outputs: list[str] = field(default_factory=list)
    settings: EditSettings | None = None
    error: str | None = None
    stage: str | None = None

    @property
    def hash(self) -> str:
        """What the line asks for, as written (a rerun refuses a done line whose hash changed)."""
        text = json.dumps(self.raw, sort_keys=True, default=_json_key)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def group_key(self) -> tuple:
        return (str(self.image), self.source, _json_key(self.mask), self.paste_pixels, self.settings)


def _json_key(value: Any) -> str:
    """A value as text for hashes and group keys: a path as itself, an array by its content."""
    if hasattr(value, "shape") and hasattr(value, "tobytes"):
        import numpy as np

        arr = np.ascontiguousarray(value)
        digest = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
        return f"array{list(arr.shape)}:{arr.dtype}:{digest}"
    return str(value)


def _csv_value(name: str, text: str) -> Any:
    """A CSV cell as the JSON value it stands for (knobs by their CLI types; lists as JSON)."""
    from fireflow.settings import KNOBS, parse_knob

    text = text.strip()
    if text.startswith("[") and name in ("target", "output", "ratios", "blocks"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    if name == "paste_pixels":
        return text.lower() in ("1", "true", "yes", "y")
    return parse_knob(name, text) if name in KNOBS else text


def read_rows(manifest: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """``(line number, fields)`` per line, or ``(line number, why it does not parse)``."""
    manifest = BUNDLED.get(str(manifest), Path(manifest))
    if not manifest.is_file():
        raise BatchError(f"manifest {str(manifest)!r} not found")
    text = manifest.read_text(encoding="utf-8-sig")
    rows: list[tuple[int, dict[str, Any] | str]] = []
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"image", "source", "target"} <= set(reader.fieldnames):
            raise BatchError(f"{manifest}: the CSV header must name at least image, source, target")
        for n, row in enumerate(reader, 1):
            if None in row:
                rows.append(
                    (n, f"{len(row[None]) + len(reader.fieldnames)} cells for a header of {len(reader.fieldnames)}")
                )
                continue
            rows.append((n, {k: _csv_value(k, v) for k, v in row.items() if v is not None and v.strip() != ""}))
        return rows
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((n, f"not JSON: {e}"))
            continue
        rows.append((n, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"))
    if not rows:
        raise BatchError(f"manifest {manifest} has no lines")
    return rows


def _rel_output(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise LineError(f"output must be a path under --out, got {text!r}")
    rel = PurePosixPath(text.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise LineError(f"output {text!r} must be a relative path inside --out")
    if rel.suffix.lower() not in OUTPUT_SUFFIXES:
        raise LineError(f"output {text!r} must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    return str(rel)


def _check_image(path: Path, max_pixels: int | None) -> tuple[int, int]:
    """The image exists and its header decodes; its (w, h)."""
    import warnings

    from PIL import Image

    from fireflow.image import check_pixels

    if not path.is_file():
        raise LineError(f"image {str(path)!r} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
    except Exception as e:  # noqa: BLE001 - any decoder failure is this line's error
        raise LineError(f"image {str(path)!r} is not a readable image: {e}") from None
    try:
        check_pixels(size, max_pixels, f"image {str(path)!r}")
    except ValueError as e:
        raise LineError(str(e)) from None
    return size


def parse_line(
    n: int, raw: dict[str, Any], base: EditSettings, root: Path, max_pixels: int | None, paste_default: bool = False
) -> Line:
    """One line checked without a model; a bad one comes back with ``error`` set."""
    given_id = raw.get("id")
    ident = f"line-{n:06d}" if given_id in (None, "") else str(given_id)
    line = Line(n, ident, raw)
    try:
        _fill(line, raw, base, root, max_pixels, paste_default)
    except (LineError, ValueError, TypeError) as e:
        line.error = e.worded("name") if isinstance(e, SettingError) else str(e)
        line.stage = "check"
    return line


def _fill(line: Line, raw: dict[str, Any], base: EditSettings, root: Path, max_pixels, paste_default) -> None:
    unknown = sorted(set(raw) - set(FIELDS) - set(KNOBS))
    if unknown:
        raise LineError(f"unknown field {unknown[0]!r}; fields: {', '.join(FIELDS)} and the knobs {', '.join(KNOBS)}")
    if not _ID.fullmatch(line.id) or line.id.startswith("."):
        raise LineError(f"id {line.id!r} is not a plain name (letters, digits, _ . -)")
    for name in ("image", "source", "target"):
        if name not in raw:
            raise LineError(f"no {name!r} field")
    if not isinstance(raw["source"], str) or not raw["source"].strip():
        raise LineError(f"source must be a non-empty prompt, got {raw['source']!r}")
    line.source = raw["source"]
    targets = [raw["target"]] if isinstance(raw["target"], str) else raw["target"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise LineError(f"target must be a non-empty prompt or a list of them, got {raw['target']!r}")
    line.targets = list(targets)
    knobs = {k: raw[k] for k in KNOBS if k in raw}
    line.settings = EditSettings.build(base, knobs)  # SettingError names the knob by its API name
    out = raw.get("output")
    if out is None:
        stem = f"{IMAGES_DIR}/{line.id}"
        line.outputs = [f"{stem}.png"] if len(targets) == 1 else [f"{stem}-{i}.png" for i in range(len(targets))]
    elif isinstance(out, list):
        if len(out) != len(targets):
            raise LineError(f"output has {len(out)} paths for {len(targets)} targets")
        line.outputs = [_rel_output(o) for o in out]
    else:
        o = PurePosixPath(_rel_output(out))
        line.outputs = (
            [str(o)]
            if len(targets) == 1
            else [str(o.with_name(f"{o.stem}-{i}{o.suffix}")) for i in range(len(targets))]
        )
    if not isinstance(raw["image"], str) or not raw["image"].strip():
        raise LineError(f"image must be a path, got {raw['image']!r}")
    line.image = root / raw["image"]
    size = _check_image(line.image, max_pixels)
    paste = raw.get("paste_pixels", paste_default)
    if not isinstance(paste, bool):
        raise LineError(f"paste_pixels must be true or false, got {paste!r}")
    mask = raw.get("mask")
    if mask is not None and not (isinstance(mask, str) and mask == ""):
        from fireflow.masks import load_mask

        if hasattr(mask, "shape"):  # a mask array (lines built in memory, e.g. PIE-Bench's decoded masks)
            line.mask = mask
        elif not isinstance(mask, str):
            raise LineError(f"mask must be a path, got {mask!r}")
        else:
            line.mask = root / mask
        try:
            load_mask(line.mask, size)
        except ValueError as e:
            raise LineError(str(e)) from None
    elif "paste_pixels" in raw and paste:
        raise LineError("paste_pixels needs a mask: the pixels outside the mask are pasted")
    line.paste_pixels = bool(paste and line.mask is not None)


def read_manifest(
    manifest: Path, base: EditSettings | None = None, max_pixels: int | None = None, paste_pixels: bool = False
) -> list[Line]:
    """Every line, checked without a model (a bad one has ``error``); ids and outputs distinct."""
    from fireflow.image import MAX_PIXELS

    manifest = BUNDLED.get(str(manifest), Path(manifest))
    base = (base or EditSettings()).check()
    root = manifest.parent
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    lines = []
    for n, raw in read_rows(manifest):
        if isinstance(raw, str):
            lines.append(Line(n, f"line-{n:06d}", {"unparsed": raw}, error=raw, stage="check"))
        else:
            lines.append(parse_line(n, raw, base, root, limit, paste_pixels))
    ids: dict[str, int] = {}
    outs: dict[str, int] = {}
    for ln in lines:
        if ln.id in ids:
            ln.error, ln.stage = f"id {ln.id!r} is also line {ids[ln.id]}'s; ids must be distinct", "check"
            ln.id = f"line-{ln.line:06d}"  # recorded under its line number
            if ln.id in ids:
                ln.id = f"line-{ln.line:06d}-dup"
            ids[ln.id] = ln.line
            continue
        ids[ln.id] = ln.line
        if ln.error is None:
            clash = next((o for o in ln.outputs if o in outs), None)
            if clash is not None:
                ln.error, ln.stage = f"output {clash!r} is also line {outs[clash]}'s", "check"
                continue
            outs.update(dict.fromkeys(ln.outputs, ln.line))
    return lines


def chunks(lines: list[Line], max_batch: int) -> list[list[Line]]:
    """Good lines grouped by (image, source, mask, knobs), each group cut into calls of at most
    ``max_batch`` targets (a line is never split), in order of their first line."""
    groups: dict[tuple, list[Line]] = {}
    for ln in lines:
        if ln.error is None:
            groups.setdefault(ln.group_key(), []).append(ln)
    out: list[list[Line]] = []
    for members in groups.values():
        cur: list[Line] = []
        for ln in members:
            if cur and sum(len(x.targets) for x in cur) + len(ln.targets) > max_batch:
                out.append(cur)
                cur = []
            cur.append(ln)
        out.append(cur)
    out.sort(key=lambda c: c[0].line)
    return out


# ---- results -------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; a torn last line (a killed write) is left out."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # only the torn tail can be bad: every line is written whole and fsynced
        if isinstance(rec, dict) and "id" in rec:
            out.append(rec)
    return out


def shard_path(out: Path, rank: int) -> Path:
    return Path(out) / f"results.rank{rank}.jsonl"


def all_records(out: Path) -> list[dict[str, Any]]:
    """Every result line of a run folder (``results.jsonl`` and the shards'), repeats included."""
    out = Path(out)
    files = [out / RESULTS, *sorted(out.glob("results.rank*.jsonl"))]
    return [r for f in files for r in _read_jsonl(f)]


def result_done(out: Path, rec: dict[str, Any]) -> bool:
    """Whether a result line stands for a finished edit: ``ok`` and every output file still there."""
    return rec.get("status") == "ok" and all((Path(out) / o).is_file() for o in rec.get("outputs", []))


def latest(out: Path, records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per id, the record that stands: the newest done one, else the newest."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r.get("finished", 0)):
        old = best.get(r["id"])
        if old is None or result_done(out, r) or not result_done(out, old):
            best[r["id"]] = r
    return best


def read_results(out: Path, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The results of a run folder, shards merged, one per id (in line order); ``ids``: only those."""
    best = latest(out, all_records(out))
    keep = list(best.values()) if ids is None else [best[i] for i in ids if i in best]
    return sorted(keep, key=lambda r: (r.get("line", 0), r["id"]))


def merge_results(out: Path, lines: list[Line]) -> int:
    """Write ``DIR/results.jsonl`` (atomic) from every shard; returns the number of records."""
    from fireflow.bench import _io

    recs = read_results(out, [ln.id for ln in lines])
    _io.write_text(Path(out) / RESULTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    return len(recs)


class Shard:
    """This process's results file: whole lines, each flushed and fsynced before the next edit."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # cut a torn last line (a killed write) so the next one starts clean
            data = self.path.read_bytes()
            keep = data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(len(keep))
        self.f = open(self.path, "ab")  # noqa: SIM115 - held for the run

    def append(self, rec: dict[str, Any]) -> None:
        from fireflow.bench._io import finite

        self.f.write((json.dumps(finite(rec), sort_keys=True, allow_nan=False) + "\n").encode())
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---- the run -------------------------------------------------------------------------------------


def settings_json(s: EditSettings) -> dict[str, Any]:
    """Command-level knobs as JSON (``feature_device`` left out: it moves memory, not results)."""
    s = s.check()
    kw = s.as_kwargs()
    kw.pop("feature_device", None)
    items = s.blocks.items
    kw["blocks"] = "default" if items is None else [list(i) for i in items]
    kw["ratios"] = list(s.ratios)
    return kw


def check_run_file(out: Path, run: dict[str, Any]) -> None:
    """``out`` holds no run with other settings (resuming it would mix two configurations)."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    flat_old = {k: v for k, v in old.items() if k != "settings"} | old.get("settings", {})
    flat_new = {k: v for k, v in run.items() if k != "settings"} | run.get("settings", {})
    diff = [k for k in dict.fromkeys([*flat_old, *flat_new]) if flat_old.get(k) != flat_new.get(k)]
    if diff:
        said = "; ".join(f"{k}: {flat_old.get(k)!r} there, {flat_new.get(k)!r} now" for k in diff)
        raise BatchError(f"--out {out} holds a run with other settings ({said}); use another --out")


def dist_env() -> tuple[int, int, int]:
    from fireflow.bench._editing import dist_env as env

    return env()


@dataclass
class Summary:
    lines: int = 0
    share: int = 0  # lines in this process's groups
    skipped: int = 0  # done before this run
    edited: int = 0  # lines edited now
    calls: int = 0  # edit calls (inversions) now
    failed: list[dict[str, Any]] = field(default_factory=list)  # this process's failures: id, line, error
    bad: list[Line] = field(default_factory=list)  # lines refused before the model (all processes see them)
    merged: int = 0
    failed_total: int = 0  # lines whose standing record is an error (known when merged)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if (self.failed or self.failed_total) else 0


def describe_bad(lines: list[Line]) -> str:
    return "\n".join(f"  line {ln.line} (id {ln.id}): {ln.error}" for ln in lines)


def _barrier(world: int) -> bool:
    """Wait for every process (gloo, when launched by torchrun / accelerate); False when there is none."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    dist.barrier()
    dist.destroy_process_group()
    return True


def run_batch(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    editor: Any,
    settings: EditSettings | None = None,
    *,
    model: str = "",
    max_batch: int = DEFAULT_MAX_BATCH,
    strict: bool = False,
    paste_pixels: bool = False,
    max_pixels: int | None = None,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    lines: list[Line] | None = None,
    limit: int | None = None,
    on_output: Callable[[Line, list[Any]], tuple[list[Any], dict[str, Any]]] | None = None,
    on_result: Callable[[Line, dict[str, Any]], None] | None = None,
    save: Callable[[Any, Path], None] | None = None,
    run_info: dict[str, Any] | None = None,
    desc: str = "batch",
) -> Summary:
    """Run a manifest into ``out``: see the module's docs. ``editor`` is a
    :class:`fireflow.FireFlowEditor`, or a function of no arguments returning one (called only
    after every line passed the model-free checks, and only when there is work). ``rank`` and
    ``world`` default to the launcher's environment. Returns this process's :class:`Summary`.

    Hooks for front ends built on this runner (``fireflow bench pie``): ``lines`` replaces the
    manifest (built in memory: :func:`parse_line`; a line's mask may be an array); ``limit`` caps the
    lines this call edits (this process's, in order); ``on_output(line, images)`` returns the images
    to write for a line and extra fields for its result (e.g. resized to the source's size);
    ``save(image, path)`` writes one output (default: :func:`fireflow.image.save_image_atomic`);
    ``on_result(line, record)`` runs after a line's ok result is written (fsynced); ``run_info``
    replaces what ``run.json`` records and compares (default: model, max_batch, settings)."""
    from fireflow.bench import _io

    t_start = time.perf_counter()
    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(out)
    if max_batch < 1:
        raise BatchError(f"--max-batch must be at least 1, got {max_batch}")
    if rank is None or world is None:
        rank, world, _ = dist_env()
    base = (settings or EditSettings()).check()
    if lines is None:
        lines = read_manifest(Path(manifest), base, max_pixels, paste_pixels)
    run = run_info
    if run is None:
        run = {"model": model, "max_batch": max_batch, "settings": settings_json(base)}
    check_run_file(out, run)
    records = latest(out, all_records(out))
    by_id = {ln.id: ln for ln in lines}
    changed = [
        (ln, r) for i, r in records.items() if (ln := by_id.get(i)) and result_done(out, r) and r.get("hash") != ln.hash
    ]
    if changed:
        ln, _ = changed[0]
        raise BatchError(
            f"--out {out}: {len(changed)} done line(s) changed in the manifest since, first line {ln.line} "
            f"(id {ln.id}); use another --out or remove their results"
        )
    summary = Summary(lines=len(lines), bad=[ln for ln in lines if ln.error])
    if summary.bad and rank == 0:
        log(f"{len(summary.bad)} bad line(s) of {len(lines)}, skipped:\n{describe_bad(summary.bad)}")
    if summary.bad and strict:
        raise BatchError(f"--strict: line {summary.bad[0].line} (id {summary.bad[0].id}): {summary.bad[0].error}")
    if not (out / RUN_FILE).is_file():
        _io.write_json(out / RUN_FILE, run)
    run_id = uuid.uuid4().hex[:12]
    shard = Shard(shard_path(out, rank))

    def record(ln: Line, **kw: Any) -> None:
        rec = {
            "id": ln.id,
            "line": ln.line,
            "hash": ln.hash,
            "image": ln.raw.get("image"),
            "source": ln.source,
            "targets": ln.targets,
            "outputs": [],
            "status": "ok",
            "error": None,
            "stage": None,
            "settings": None,
            "seconds": None,
            "nfe": None,
            "transformer_calls": None,
            "group": None,
            "model": model,
            "rank": rank,
            "world_size": world,
            "run_id": run_id,
            "finished": time.time(),
        }
        rec.update(kw)
        shard.append(rec)
        if on_result is not None and rec["status"] == "ok":
            on_result(ln, rec)

    try:
        if rank == 0:  # bad lines are recorded once, by process 0 (unless recorded as they are)
            for ln in summary.bad:
                old = records.get(ln.id)
                if old is None or old.get("error") != ln.error or old.get("hash") != ln.hash:
                    record(ln, status="error", error=ln.error, stage=ln.stage)
        calls = chunks(lines, max_batch)
        mine = [(gi, c) for gi, c in enumerate(calls) if gi % world == rank]
        summary.share = sum(len(c) for _, c in mine)
        todo = [(gi, [ln for ln in c if not result_done(out, records.get(ln.id, {}))]) for gi, c in mine]
        todo = [(gi, c) for gi, c in todo if c]
        summary.skipped = summary.share - sum(len(c) for _, c in todo)
        if limit is not None:  # the first `limit` lines still to do (a group may be cut)
            left, cut = max(limit, 0), []
            for gi, c in todo:
                if left <= 0:
                    break
                cut.append((gi, c[:left]))
                left -= len(cut[-1][1])
            todo = cut
        if todo:
            ed = editor if hasattr(editor, "edit") else editor()
            hooks = _Hooks(on_output, save, desc)
            _edit_all(ed, todo, out, record, summary, strict, rank, world, progress, max_pixels, log, hooks)
    finally:
        shard.close()
    waited = _barrier(world)
    if waited or world == 1 or _complete(out, lines):
        if rank == 0 or not waited:
            summary.merged = merge_results(out, lines) if _complete(out, lines) else 0
        final = read_results(out, [ln.id for ln in lines])
        summary.failed_total = sum(r.get("status") != "ok" for r in final)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _complete(out: Path, lines: list[Line]) -> bool:
    got = latest(out, all_records(out))
    return all(ln.id in got for ln in lines)


@dataclass
class _Hooks:
    on_output: Callable[[Line, list[Any]], tuple[list[Any], dict[str, Any]]] | None = None
    save: Callable[[Any, Path], None] | None = None
    desc: str = "batch"


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _edit_all(editor, todo, out, record, summary, strict, rank, world, progress, max_pixels, log, hooks=None) -> None:
    from tqdm.auto import tqdm

    from fireflow.image import MAX_PIXELS, load_image, save_image_atomic

    hooks = hooks or _Hooks()
    save = hooks.save or save_image_atomic

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    # Model-dependent checks (blocks against this model's), for every line of this share, before any edit.
    resolved: dict[EditSettings, Any] = {}
    refused: list[Line] = []
    for _, c in todo:
        for ln in c:
            if ln.settings not in resolved:
                try:
                    resolved[ln.settings] = editor.resolve(ln.settings)
                except SettingError as e:
                    resolved[ln.settings] = e
            if isinstance(resolved[ln.settings], SettingError):
                ln.error, ln.stage = resolved[ln.settings].worded("name"), "model"
                refused.append(ln)
    if refused:
        log(f"[rank {rank}] {len(refused)} line(s) refused by the model:\n{describe_bad(refused)}")
        for ln in refused:
            record(ln, status="error", error=ln.error, stage="model")
            summary.failed.append({"id": ln.id, "line": ln.line, "error": ln.error})
        if strict:
            raise StrictStop(f"line {refused[0].line} (id {refused[0].id}): {refused[0].error}")
    work = [(gi, [ln for ln in c if ln.error is None]) for gi, c in todo]
    work = [(gi, c) for gi, c in work if c]
    bar = tqdm(
        total=summary.share,
        initial=summary.skipped + len(refused),
        desc=hooks.desc,
        unit="edit",
        disable=not progress or rank != 0,
    )

    def call(gi: int, group: list[Line]) -> None:
        first = group[0]
        image = load_image(first.image, limit)
        targets = [t for ln in group for t in ln.targets]
        s = resolved[first.settings]
        res = editor.edit(image, first.source, targets, s, mask=first.mask, paste_pixels=first.paste_pixels)
        images = list(res.images)
        if len(images) != len(targets):
            raise RuntimeError(f"the edit returned {len(images)} images for {len(targets)} targets")
        k, extras = 0, {}
        for ln in group:  # outputs first (atomic), then the line's result
            mine, extras[ln.id] = images[k : k + len(ln.outputs)], {}
            k += len(ln.outputs)
            if hooks.on_output is not None:
                mine, extras[ln.id] = hooks.on_output(ln, mine)
            for img, rel in zip(mine, ln.outputs, strict=True):
                save(img, out / rel)
        for ln in group:
            record(
                ln,
                outputs=ln.outputs,
                settings=res.settings.to_dict() if res.settings is not None else None,
                seconds=round(float(res.seconds), 4),
                nfe=int(res.nfe),
                transformer_calls=_count(getattr(res, "transformer_calls", None)),
                group=f"g{gi:06d}",
                group_lines=len(group),
                group_targets=len(targets),
                **extras[ln.id],
            )
        summary.calls += 1
        summary.edited += len(group)

    for gi, group in work:
        try:
            call(gi, group)
        except Exception as e:  # noqa: BLE001 - one group's failure is recorded; the run goes on
            if len(group) > 1:  # find the line(s) at fault: each alone
                for ln in group:
                    _one(call, gi, ln, record, summary, strict)
            else:
                _fail(group[0], e, record, summary, strict)
        bar.update(len(group))
    bar.close()


def _one(call, gi, ln, record, summary, strict) -> None:
    try:
        call(gi, [ln])
    except Exception as e:  # noqa: BLE001
        _fail(ln, e, record, summary, strict)


def _fail(ln: Line, e: Exception, record, summary: Summary, strict: bool) -> None:
    if isinstance(e, SettingError):
        msg = e.worded("name")
    else:
        first = str(e).strip().splitlines()
        msg = first[0] if first else type(e).__name__
    record(ln, status="error", error=msg, stage="edit")
    summary.failed.append({"id": ln.id, "line": ln.line, "error": msg})
    if strict:
        raise StrictStop(f"line {ln.line} (id {ln.id}): {msg}") from e


# ---- the command ---------------------------------------------------------------------------------


def pin_threads(device: str | None, threads: int | None) -> int | None:
    """On CPU, the thread count every process uses (1 unless OMP_NUM_THREADS or --threads says)."""
    import torch

    if device is not None and not str(device).startswith("cpu"):
        return None
    if device is None and torch.cuda.is_available():
        return None
    n = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(max(n, 1))
    return n


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``batch`` under ``fireflow``."""
    from fireflow.cli import add_edit_options, add_max_pixels, add_model_options

    p = subparsers.add_parser(
        "batch",
        help="edit a manifest of images and prompts (resumable; shards under torchrun / accelerate launch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "manifest",
        type=Path,
        help="JSONL or CSV (header: image,source,target[,mask,id,output,knobs]); `scenes`: the bundled set",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (resumes what is there)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="targets per inversion (default 4)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line")
    p.add_argument("--paste-pixels", action="store_true", help="lines with a mask: paste source pixels outside it")
    add_max_pixels(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads a process (default OMP_NUM_THREADS, else 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_options(p)
    add_edit_options(p)
    p.set_defaults(func=batch_cli)
    return p


def batch_cli(args: argparse.Namespace) -> Summary:
    """``fireflow batch``. Bad input raises ValueError (exit 2); failed lines exit 1."""
    from fireflow.bench import _editing
    from fireflow.cli import check_edit_options, check_model_options

    settings = check_edit_options(args)
    check_model_options(args)
    rank, world, local = dist_env()
    pin_threads(args.device, args.threads)

    def load():
        return _editing.load_editor(args, local)

    try:
        s = run_batch(
            args.manifest,
            args.out,
            load,
            settings,
            model=str(args.model),
            max_batch=args.max_batch,
            strict=args.strict,
            paste_pixels=args.paste_pixels,
            max_pixels=args.max_pixels,
            rank=rank,
            world=world,
            progress=not args.quiet,
        )
    except StrictStop as e:
        print(f"fireflow batch: --strict: stopped at {e}", file=sys.stderr)
        raise SystemExit(1) from None
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    msg = f"{tag}edited {s.edited} line(s) in {s.calls} call(s), earlier {s.skipped}, of {s.share}"
    if s.failed:
        msg += f"; {len(s.failed)} failed:\n" + "\n".join(
            f"  line {f['line']} (id {f['id']}): {f['error']}" for f in s.failed
        )
    print(msg)
    if s.merged and rank == 0:
        print(
            f"all {s.merged} lines in {args.out / RESULTS}" + (f"; {s.failed_total} failed" if s.failed_total else "")
        )
    if s.exit_code:
        raise SystemExit(1)
    return s


def main(argv: list[str] | None = None) -> int:
    from fireflow.cli import main as cli_main

    return cli_main(["batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
