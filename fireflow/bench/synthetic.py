"""A small synthetic dataset in PIE-Bench's format, so the whole benchmark chain runs in CI.

Same layout (``mapping_file.json`` + ``annotation_images/<type folder>/[subfolders/]<id>.jpg``), the
same JSON fields and the same mask encoding (row-major ``[start, len, ...]`` runs) as the real
PIE-Bench; the images are coloured shapes drawn with PIL, the prompts describe them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fireflow.bench import _io
from fireflow.bench._main import run_command
from fireflow.metrics import encode_pie_mask

#: PIE-Bench's editing types: id -> folder under annotation_images/.
PIE_TYPES = {
    "0": "0_random_140",
    "1": "1_change_object_80",
    "2": "2_add_object_80",
    "3": "3_delete_object_80",
    "4": "4_change_attribute_content_40",
    "5": "5_change_attribute_pose_40",
    "6": "6_change_attribute_color_40",
    "7": "7_change_attribute_material_40",
    "8": "8_change_background_80",
    "9": "9_change_style_80",
}

_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
_BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
_SHAPES = ("circle", "square", "triangle")


def _edit(type_id: str, color: str, shape: str, bg: str, rng: random.Random) -> tuple[str, str, str]:
    """(editing prompt with [ ] markers, instruction, blended word) for one editing type."""
    other_color = rng.choice([c for c in _COLORS if c != color])
    other_shape = rng.choice([s for s in _SHAPES if s != shape])
    other_bg = rng.choice([b for b in _BACKGROUNDS if b != bg])
    return {
        "0": (f"a [{other_color}] {shape} on a {bg} background", f"make the {shape} {other_color}", shape),
        "1": (
            f"a {color} [{other_shape}] on a {bg} background",
            f"turn the {shape} into a {other_shape}",
            shape,
        ),
        "2": (f"a {color} {shape} [and a star] on a {bg} background", "add a star", "star"),
        "3": (f"[an empty] {bg} background", f"remove the {shape}", shape),
        "4": (f"a {color} {shape} [with a dot] on a {bg} background", "put a dot on it", shape),
        "5": (f"a [tilted] {color} {shape} on a {bg} background", f"tilt the {shape}", shape),
        "6": (f"a [{other_color}] {shape} on a {bg} background", f"make the {shape} {other_color}", shape),
        "7": (f"a {color} [wooden] {shape} on a {bg} background", f"make the {shape} wooden", shape),
        "8": (
            f"a {color} {shape} on a [{other_bg}] background",
            f"make the background {other_bg}",
            "background",
        ),
        "9": (
            f"[a watercolor painting of] a {color} {shape} on a {bg} background",
            "make it a painting",
            shape,
        ),
    }[type_id]


def _draw(size: int, color: str, shape: str, bg: str, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """The image and the shape's mask (1 on the shape's bounding box, like a coarse annotation)."""
    image = Image.new("RGB", (size, size), _BACKGROUNDS[bg])
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 6, size // 4)
    cx, cy = rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=_COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=_COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLORS[color])
    mask = np.zeros((size, size), np.uint8)
    mask[cy - r : cy + r + 1, cx - r : cx + r + 1] = 1
    return image, mask


def make_synthetic_pie(
    out: str | Path, per_type: int = 2, size: int = 64, types: list[str] | None = None, seed: int = 0
) -> Path:
    """Write a PIE-Bench-format dataset of ``per_type`` images for each editing type to ``out``.

    ``size`` is the square image side (PIE-Bench uses 512; a multiple of 16 suits FLUX's packing).
    Returns ``out``. The dataset is a pure function of the arguments.
    """
    types = sorted(types or PIE_TYPES)
    bad = [t for t in types if t not in PIE_TYPES]
    if bad:
        raise ValueError(f"unknown editing type {bad[0]!r}; expected one of {', '.join(PIE_TYPES)}")
    if per_type < 1 or size < 16:
        raise ValueError(f"per_type must be >= 1 and size >= 16, got {per_type} and {size}")
    out = Path(out)
    rng = random.Random(seed)
    mapping = {}
    for t in types:
        for i in range(per_type):
            sub = "" if t == "0" else f"{1 + i % 2}_{'artificial' if i % 2 == 0 else 'natural'}/1_shapes/"
            key = f"{t}{0 if t == '0' else 1 + i % 2}1{'0' * 6}{i:03d}"
            color, shape, bg = rng.choice(list(_COLORS)), rng.choice(_SHAPES), rng.choice(list(_BACKGROUNDS))
            image, mask = _draw(size, color, shape, bg, rng)
            if t == "8":
                mask = 1 - mask  # a background edit: the region to edit is everything but the shape
            editing_prompt, instruction, blended = _edit(t, color, shape, bg, rng)
            image_path = f"{PIE_TYPES[t]}/{sub}{key}.jpg"
            _io.save_image(image, out / "annotation_images" / image_path)
            mapping[key] = {
                "image_path": image_path,
                "original_prompt": f"a {color} {shape} on a {bg} background",
                "editing_prompt": editing_prompt,
                "editing_instruction": instruction,
                "editing_type_id": t,
                "blended_word": blended,
                "mask": encode_pie_mask(mask),
            }
    _io.write_text(out / "mapping_file.json", json.dumps(mapping, indent=1) + "\n")
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``synthetic``: ``fireflow bench synthetic --out DIR``."""
    p = subparsers.add_parser("synthetic", help="write a small synthetic dataset in PIE-Bench format")
    p.add_argument("--out", required=True, type=Path, help="folder to write (mapping_file.json, annotation_images/)")
    p.add_argument("--per-type", type=int, default=2, help="images per editing type (default 2)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64; PIE-Bench: 512)")
    p.add_argument("--types", nargs="+", default=None, help="editing type ids 0-9 (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> Path:
    """``fireflow bench synthetic``. Bad input raises ValueError (exit status 2)."""
    out = make_synthetic_pie(args.out, args.per_type, args.size, args.types, args.seed)
    n = len(json.loads((out / "mapping_file.json").read_text()))
    print(f"wrote {n} images to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fireflow.bench.synthetic --out DIR``."""
    return run_command("synthetic", add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
