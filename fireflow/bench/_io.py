"""Atomic file writes: a killed run leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from fireflow._io import atomic_write


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def finite(obj: Any) -> Any:
    """NaN and inf to None, recursively, so the JSON is standard (null: the metric is undefined)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image(image: Image.Image, path: Path) -> None:
    """PNG for ``.png``; JPEG at quality 95 without chroma subsampling otherwise (as BFL's flux CLI,
    which the FireFlow reference code derives from, saves its outputs)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        atomic_write(path, lambda f: image.save(f, format="PNG"))
    else:
        atomic_write(path, lambda f: image.convert("RGB").save(f, format="JPEG", quality=95, subsampling=0))
