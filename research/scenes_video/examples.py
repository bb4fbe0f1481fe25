"""The README's video examples: held-out moving-scenes clips as GIFs, their edits run and scored.

    python -m research.scenes_video.examples write            # examples/video/*.gif + README.md
    python -m research.scenes_video.examples run --out docs/scenes_video   # each README command, timed

``write`` picks the clips deterministically: for each spec below, the first clip of
``clips.draw_clips(400, seed 25, held_out=True)`` with that object that moves on both axes, at
least 3 px a frame in all. ``run`` runs each example's README command (``fireflow edit ... -o
OUT.gif``, a subprocess, timed whole: start-up, model load and the edit), reads the GIF back and
scores it as the table does (``research.scenes_video.eval.score_clip``: target hit and placement
IoU per frame, the same object in every frame, PSNR outside the track), and writes
``examples_sheet.png`` (per example a row of source frames above a row of edited frames) and
``examples.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fireflow._io import atomic_write
from research.bundled import scenes as S
from research.scenes_video import clips as C
from research.scenes_video.eval import contact_sheet, score_clip, target_prompt

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "examples" / "video"
SEED = 25
#: (source object, target object): an animal face, a fruit, a colour change.
SPECS = [("banana", "red apple"), ("fox", "panda"), ("red heart", "blue heart")]
FPS = 4


def example_clips() -> list[tuple[C.Clip, int]]:
    pool = C.draw_clips(400, torch.Generator().manual_seed(SEED), held_out=True)
    out = []
    for src, tgt in SPECS:
        o = S.OBJECT_NAMES.index(src)
        clip = next(c for c in pool if c.obj == o and c.vx and c.vy and abs(c.vx) + abs(c.vy) >= 3)
        out.append((clip, S.OBJECT_NAMES.index(tgt)))
    return out


def stem(clip: C.Clip) -> str:
    return f"{S.OBJECT_NAMES[clip.obj]}_{S.BACKGROUND_NAMES[clip.bg]}".replace(" ", "_")


def command(clip: C.Clip, target: int) -> str:
    out = S.OBJECT_NAMES[target].replace(" ", "_")
    return (
        f'fireflow edit examples/video/{stem(clip)}.gif -s "{clip.prompt}" -t "{target_prompt(clip, target)}" '
        f"--model scenes-video -o {out}.gif"
    )


def write(folder: Path = FOLDER) -> None:
    from fireflow.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Video examples: held-out moving scenes for the bundled `scenes-video` model",
        "",
        "Six frames of 32×32 at 4 fps, each a clip of the moving-scenes set's held-out split (never",
        "seen in training; `research/scenes_video/clips.py`), written by",
        "`python -m research.scenes_video.examples write`. The prompt names the object and the",
        "background, never the motion: an edit that keeps the track took it from the clip.",
        "",
        "| clip | source prompt | start (x, y) | velocity px/frame | size | edit |",
        "|---|---|---|---|---|---|",
    ]
    for clip, target in example_clips():
        frames = [Image.fromarray(S.to_uint8(f)) for f in C.composite(clip)]
        write_video(frames, folder / f"{stem(clip)}.gif", FPS)
        lines.append(
            f"| `{stem(clip)}.gif` | {clip.prompt} | ({clip.x}, {clip.y}) | ({clip.vx}, {clip.vy}) "
            f"| {clip.side} px | `{command(clip, target)}` |"
        )
    lines += [
        "",
        "Each runs offline on a CPU (see the README's section Video demo model); "
        "`python -m research.scenes_video.examples run` runs and scores them all.",
    ]
    atomic_write(folder / "README.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n".join(command(c, t) for c, t in example_clips()))


def _read(path: Path) -> torch.Tensor:
    from fireflow.video import read_video

    frames, _ = read_video(str(path))
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) / 255 for f in frames])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def run(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows, sources, edits = [], [], []
    exe = [shutil.which("fireflow")] if shutil.which("fireflow") else [sys.executable, "-m", "fireflow.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        for clip, target in example_clips():
            cmd = command(clip, target)
            argv = shlex.split(cmd)
            result = Path(tmp) / argv[-1]
            argv = exe + argv[1:-2] + ["-q", "-o", str(result)]  # the README command, its output in a temporary folder
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            seconds = time.perf_counter() - t0
            edited = _read(result)
            source = _read(FOLDER / f"{stem(clip)}.gif")
            row = score_clip(clip, target, edited)
            row.update({"command": cmd, "seconds": round(seconds, 1), "frames": len(edited)})
            rows.append(row)
            sources.append(source)
            edits.append(edited)
            print(f"{cmd}\n  {seconds:.1f} s; detected {row['detected']}; IoU {row['iou']}; "
                  f"kept {row['kept_psnr']:.1f} dB", flush=True)  # fmt: skip
    sheet = contact_sheet(torch.stack(sources), [torch.stack(edits)], len(sources))
    atomic_write(out / "examples_sheet.png", lambda f: sheet.save(f, format="PNG"))
    text = json.dumps(rows, indent=1, default=float)
    atomic_write(out / "examples.json", lambda f: f.write(text.encode()))
    print(f"wrote {out}/examples_sheet.png, examples.json")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description="The README's video examples: write the GIFs, or run and score them.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("write", help="write examples/video/*.gif and README.md")
    r = sub.add_parser("run", help="run each example's README command, timed, and score the result")
    r.add_argument("--out", type=Path, default=Path("docs/scenes_video"))
    args = p.parse_args()
    if args.command == "write":
        write()
    else:
        run(args.out)


if __name__ == "__main__":
    main()
