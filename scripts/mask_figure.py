"""The README's masked-vs-unmasked figure: source | mask | edit | masked edit, from the CLI itself.

    python scripts/mask_figure.py --image examples/red_heart.png -s "red heart" -t "blue heart" \
        --mask examples/masks/left_half.png --out docs/mask_edit.png

Runs ``fireflow edit`` twice (without and with ``--mask``), prints both commands and the background
PSNR of each against the source (outside the mask), and writes the four panels side by side,
each scaled up with nearest-neighbour sampling so the demo's 32x32 pixels stay visible.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fireflow._io import atomic_write


def _psnr_outside(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    d = (a[keep].astype(np.float64) - b[keep].astype(np.float64)) / 255
    mse = float((d**2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("-s", "--source", required=True)
    p.add_argument("-t", "--target", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--model", default="demo")
    p.add_argument("--out", default="docs/mask_edit.png")
    p.add_argument("--scale", type=int, default=6)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, masked = Path(tmp) / "edit.png", Path(tmp) / "masked.png"
        base = ["fireflow", "edit", args.image, "-s", args.source, "-t", args.target, "--model", args.model, "-q"]
        for cmd in (base + ["-o", str(plain)], base + ["--mask", args.mask, "-o", str(masked)]):
            print("$ " + " ".join(f"'{c}'" if " " in c else c for c in cmd))
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
        edit, medit = Image.open(plain).convert("RGB"), Image.open(masked).convert("RGB")
    from fireflow import FireFlowEditor
    from fireflow.masks import load_mask

    source = FireFlowEditor.from_pretrained(args.model).adapter.prepare_image(Image.open(args.image))
    mask = load_mask(args.mask, source.size)
    keep = ~mask
    src = np.asarray(source)
    for name, img in (("edit", edit), ("masked edit", medit)):
        print(f"{name}: background PSNR outside the mask {_psnr_outside(np.asarray(img), src, keep):.2f} dB")
    panels = [source, Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"), edit, medit]
    w, h = source.size
    s = args.scale
    sheet = Image.new("RGB", (4 * w * s + 3 * 4, h * s), (128, 128, 128))
    for i, im in enumerate(panels):
        sheet.paste(im.resize((w * s, h * s), Image.Resampling.NEAREST), (i * (w * s + 4), 0))
    atomic_write(Path(args.out), lambda f: sheet.save(f, format="PNG"))
    print(f"wrote {args.out}: source | mask | edit | masked edit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
