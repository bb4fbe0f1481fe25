"""``fireflow bench batch``: throughput of ``fireflow batch`` on the scenes set (not a timed test).

The manifest: the first ``--images`` held-out scenes, each with ``--targets`` target prompts (its own
edit's and the next scenes' edits'), one line each: lines sharing an image and a source prompt, which
grouping batches. Four runs, each a fresh subprocess into a fresh folder: ``--max-batch 1`` (no
grouping) and ``--max-batch T``, one process and two (``torchrun --standalone``). Items/s counts
manifest lines over the edit phase (from the first edit's start to the last result, read from the
results: model loading and imports left out); the wall time with them is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fireflow.bench import _io


def write_manifest(path: Path, images: int, targets: int) -> int:
    """The benchmark's manifest (paths to the installed scenes set); returns its line count."""
    from fireflow.bench.pie import IMAGES_DIR, SCENES_PIE, load_pie

    items = load_pie(SCENES_PIE)
    rows = []
    for i, it in enumerate(items[:images]):
        for j in range(targets):
            other = items[(i + j) % len(items)]
            rows.append(
                {
                    "id": f"{it.key}-{j}",
                    "image": str(SCENES_PIE / IMAGES_DIR / it.image_path),
                    "source": it.source_prompt,
                    "target": other.target_prompt,
                }
            )
    _io.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def measure(manifest: Path, out: Path, procs: int, max_batch: int, model: str, device: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fireflow", "batch", str(manifest), "--out", str(out)]
    cmd += ["--model", model, "--device", device, "--max-batch", str(max_batch), "-q"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *cmd[1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    start = min(r["finished"] - r["seconds"] for r in recs)
    span = max(r["finished"] for r in recs) - start
    calls = len({r["group"] for r in recs})
    return {
        "processes": procs,
        "max_batch": max_batch,
        "lines": len(recs),
        "calls": calls,
        "nfe": sum({r["group"]: r["nfe"] for r in recs}.values()),
        "edit_seconds": round(span, 2),
        "items_per_s": round(len(recs) / span, 3),
        "wall_seconds": round(wall, 2),
    }


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("batch", help="items/s of `fireflow batch` with and without grouping, 1 and 2 processes")
    p.add_argument("--images", type=int, default=24, help="scenes (default 24)")
    p.add_argument("--targets", type=int, default=3, help="targets per scene, one line each (default 3)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--model", default="scenes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench_batch.json"), help="the JSON written")
    p.set_defaults(func=bench_cli)
    return p


def bench_cli(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.images < 1 or args.targets < 1:
        raise ValueError("--images and --targets must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        manifest = Path(tmp) / "manifest.jsonl"
        write_manifest(manifest, args.images, args.targets)
        for procs in args.processes:
            for mb in dict.fromkeys([1, args.targets]):
                rows.append(measure(manifest, Path(tmp) / f"p{procs}-b{mb}", procs, mb, args.model, args.device))
                print(json.dumps(rows[-1]), file=sys.stderr)
    head = ["processes", "max_batch", "lines", "calls", "nfe", "edit_seconds", "items_per_s", "wall_seconds"]
    table = [head] + [[str(r[h]) for h in head] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    meta = {"images": args.images, "targets": args.targets, "model": args.model, "device": args.device}
    meta["cpus"] = os.cpu_count()
    _io.write_json(args.out, {"settings": meta, "runs": rows})
    print(f"wrote {args.out}")
    return rows
