"""The page's files: each edit's result (pruned by age) and the examples galleries."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Result files older than this are deleted from the app's folder on the next request.
KEEP_RESULTS_S = 3600


@dataclass(frozen=True)
class Example:
    """One row of the examples gallery: an image file and its two prompts."""

    image: str
    source: str
    target: str


def save_result(image: Any, workdir: Path) -> Path:
    """Write the edit to a fresh folder of its own (one per request, so concurrent edits never collide)."""
    from fireflow.image import save_image_atomic

    prune_results(workdir)
    folder = Path(tempfile.mkdtemp(dir=workdir, prefix="edit-"))
    path = folder / "fireflow-edit.png"
    save_image_atomic(image, path)
    return path


def prune_results(workdir: Path, max_age_s: float = KEEP_RESULTS_S) -> None:
    """Delete result folders older than ``max_age_s``: a long-running server does not fill the disk."""
    cutoff = time.time() - max_age_s
    for folder in workdir.glob("edit-*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # another request pruned it first
            pass


#: The gallery's edits of the bundled example emoji (``examples/<source prompt>.png``); the demo
#: model knows these names, and FLUX reads them as plain English.
EXAMPLE_EDITS = (
    ("red heart", "blue heart"),
    ("cat face", "tiger face"),
    ("grinning face", "smiling face with sunglasses"),
    ("red apple", "green apple"),
    ("cloud", "cloud with snow"),
    ("yellow heart", "green heart"),
)


#: The gallery of the scenes model (``--model scenes``): files in ``examples/scenes/`` whose edit
#: keeps the layout (measured by ``python -m research.bundled.scenes_eval table``; docs/scenes.md).
SCENE_GALLERY = (
    "lemon_gray",
    "frog_white",
    "strawberry_sky_blue",
    "red_apple_beige",
    "yellow_heart_black",
    "red_heart_white",
)


def _example_folders(*parts: str) -> tuple[Path, Path]:
    """``examples/<parts>`` as installed package data, and in a checkout."""
    package = Path(__file__).resolve().parents[1]
    return package.joinpath("examples", *parts), package.parent.joinpath("examples", *parts)


def scene_examples() -> list[Example]:
    """The scenes model's gallery from ``examples/scenes/prompts.json``; empty where not bundled."""
    for folder in _example_folders("scenes"):
        if (folder / "prompts.json").is_file():
            prompts = json.loads((folder / "prompts.json").read_text())
            return [
                Example(str(folder / f"{stem}.png"), prompts[f"{stem}.png"]["source"], prompts[f"{stem}.png"]["target"])
                for stem in SCENE_GALLERY
                if f"{stem}.png" in prompts and (folder / f"{stem}.png").is_file()
            ]
    return []


def default_examples(folder: Path, model: str = "demo") -> list[Example]:
    """The gallery: the bundled example images if present, else two pictures drawn into ``folder``.
    With the scenes model (``model == "scenes"``), its scene edits."""
    if model == "scenes":
        found = scene_examples()
        if found:
            return found
    for examples in _example_folders():
        found = [
            Example(str(examples / f"{source.replace(' ', '_')}.png"), source, target)
            for source, target in EXAMPLE_EDITS
            if (examples / f"{source.replace(' ', '_')}.png").is_file()
        ]
        if found:
            return found
    return _drawn_examples(folder)


def _drawn_examples(folder: Path) -> list[Example]:
    """Two simple pictures drawn with Pillow, for when no examples are bundled."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, bg, fg, shape, source, target in (
        ("red-circle", (40, 90, 200), (220, 40, 40), "ellipse", "a red circle on blue", "a yellow circle on blue"),
        ("green-square", (250, 250, 240), (40, 160, 60), "rectangle", "a green square", "a green triangle"),
    ):
        im = Image.new("RGB", (64, 64), bg)
        getattr(ImageDraw.Draw(im), shape)((14, 14, 50, 50), fill=fg)
        path = folder / f"{name}.png"
        im.save(path)
        out.append(Example(str(path), source, target))
    return out
