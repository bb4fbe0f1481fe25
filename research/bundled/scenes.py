"""Scenes: one emoji composited at a random position and size on a plain background, 32x32.

The bundled emoji model saw one picture per prompt, so an edit on it regenerates the target and
there is no layout or background to keep. A scene carries information its prompt does not: the
prompt names the object and the background colour (``"cat face, sky blue background"``), never
where the object is or how big it is. An edit that keeps the layout is then something a model
must get from the source image, which is what FireFlow's inversion and V injection claim to do.

The sprites (premultiplied RGB and alpha, one per object and size) are rendered once from Debian's
``fonts-noto-color-emoji`` by ``python -m research.bundled.scenes`` and committed as ``scenes32.npz``
beside this file, so training, tests and evaluation need no font. Compositing is exact and
deterministic: every scene comes with its placement box and its object mask.

Choices, made for what one CPU thread can learn in about two hours (see the model card):
20 objects in 3 families with distinct shapes or colours, 2 sizes (16 and 22 px), 6 plain
background colours, integer positions. A fixed tenth of all scenes (by a hash of the scene) is
never drawn in training; the evaluation set comes from that tenth only.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fireflow._io import atomic_write

SPRITE_FILE = Path(__file__).with_name("scenes32.npz")
FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109
RESOLUTION = 32

#: (prompt name, character, family). The prompt names are the CLDR short names, lower-cased.
OBJECTS: list[tuple[str, str, str]] = [
    ("red heart", "\u2764\ufe0f", "hearts"),
    ("orange heart", "\U0001f9e1", "hearts"),
    ("yellow heart", "\U0001f49b", "hearts"),
    ("green heart", "\U0001f49a", "hearts"),
    ("blue heart", "\U0001f499", "hearts"),
    ("purple heart", "\U0001f49c", "hearts"),
    ("pink heart", "\U0001fa77", "hearts"),
    ("cat face", "\U0001f431", "animal faces"),
    ("dog face", "\U0001f436", "animal faces"),
    ("fox", "\U0001f98a", "animal faces"),
    ("panda", "\U0001f43c", "animal faces"),
    ("pig face", "\U0001f437", "animal faces"),
    ("frog", "\U0001f438", "animal faces"),
    ("red apple", "\U0001f34e", "fruit"),
    ("green apple", "\U0001f34f", "fruit"),
    ("lemon", "\U0001f34b", "fruit"),
    ("tangerine", "\U0001f34a", "fruit"),
    ("grapes", "\U0001f347", "fruit"),
    ("strawberry", "\U0001f353", "fruit"),
    ("banana", "\U0001f34c", "fruit"),
]
OBJECT_NAMES = [o[0] for o in OBJECTS]
FAMILIES = [o[2] for o in OBJECTS]

#: Background palette: name -> sRGB. Pastels and neutrals, so every object stands out on each.
BACKGROUNDS: list[tuple[str, tuple[int, int, int]]] = [
    ("white", (255, 255, 255)),
    ("black", (24, 24, 24)),
    ("gray", (128, 128, 128)),
    ("beige", (232, 214, 170)),
    ("sky blue", (140, 200, 240)),
    ("mint green", (170, 230, 190)),
]
BACKGROUND_NAMES = [b[0] for b in BACKGROUNDS]
#: Object sides in pixels (the sprite is the glyph's bounding square at that side).
SIZES: tuple[int, ...] = (16, 22)
#: One scene in ``HOLDOUT_MOD`` (by hash) is reserved for evaluation.
HOLDOUT_MOD = 10


def prompt(obj: int, bg: int) -> str:
    """The scene's prompt: object and background, never the layout."""
    return f"{OBJECT_NAMES[obj]}, {BACKGROUND_NAMES[bg]} background"


#: Every prompt, in the order ``obj * len(BACKGROUNDS) + bg``.
PROMPTS: list[str] = [prompt(o, b) for o in range(len(OBJECTS)) for b in range(len(BACKGROUNDS))]


def prompt_index(obj, bg):
    return obj * len(BACKGROUNDS) + bg


@dataclass(frozen=True)
class Scene:
    """One scene: object, background, size index into :data:`SIZES`, top-left corner (x, y)."""

    obj: int
    bg: int
    size: int
    x: int
    y: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The placement square ``(x0, y0, x1, y1)``, exclusive ends."""
        return (self.x, self.y, self.x + self.side, self.y + self.side)

    @property
    def prompt(self) -> str:
        return prompt(self.obj, self.bg)

    def replace(self, **kw) -> Scene:
        d = dict(obj=self.obj, bg=self.bg, size=self.size, x=self.x, y=self.y)
        d.update(kw)
        return Scene(**d)


def scene_key(obj, bg, size, x, y):
    """A unique integer per scene (works on ints and int64 tensors alike)."""
    return (((obj * len(BACKGROUNDS) + bg) * len(SIZES) + size) * RESOLUTION + y) * RESOLUTION + x


def _mix(key):
    # A 31-bit integer hash (multiply, xor-shift), the same on Python ints and int64 tensors:
    # every product stays below 2**62, so int64 never overflows.
    m = 0x7FFFFFFF
    h = (key * 0x5BD1E995) & m
    h = h ^ (h >> 15)
    h = (h * 0x1B873593) & m
    h = h ^ (h >> 13)
    return h


def is_held_out(obj, bg, size, x, y):
    """Whether the scene is reserved for evaluation (never drawn in training)."""
    return _mix(scene_key(obj, bg, size, x, y)) % HOLDOUT_MOD == 0


# --- sprites ---------------------------------------------------------------------------------


@dataclass
class Sprites:
    """Per size: premultiplied RGB ``[N, 3, s, s]`` and alpha ``[N, 1, s, s]``, float in [0, 1]."""

    rgb: dict[int, torch.Tensor]
    alpha: dict[int, torch.Tensor]

    def mask(self, obj: int, size: int, opaque: bool = False) -> np.ndarray:
        """The object's mask in its placement square: every pixel it touches (alpha > 0, or a
        colour channel > 0: Pillow's 8-bit premultiplication leaves a few 1/255 colours where
        alpha rounds to 0), or with ``opaque`` only the pixels it covers entirely (alpha = 1)."""
        a = self.alpha[SIZES[size]][obj, 0]
        if opaque:
            return (a >= 1.0).numpy()
        return ((a > 0) | (self.rgb[SIZES[size]][obj].amax(0) > 0)).numpy()


def render_sprites(font_path: str = FONT_PATH) -> dict[str, np.ndarray]:
    """Render every object at every size: glyph bounding square, premultiplied LANCZOS resize."""
    from PIL import Image, ImageFont

    from research.bundled.emoji import square_glyph

    font = ImageFont.truetype(font_path, FONT_SIZE)
    out: dict[str, np.ndarray] = {}
    for side in SIZES:
        tiles = []
        for _, char, _ in OBJECTS:
            square = square_glyph(char, font, clear=(0, 0, 0, 0))
            # "RGBa" is premultiplied: resizing it does not bleed transparent black into edges.
            small = square.convert("RGBa").resize((side, side), Image.Resampling.LANCZOS)
            tiles.append(np.asarray(small, dtype=np.uint8))
        out[f"sprites{side}"] = np.stack(tiles)  # [N, s, s, 4]: premultiplied RGB, alpha
    out["names"] = np.array(OBJECT_NAMES)
    return out


def load_sprites(path: str | os.PathLike = SPRITE_FILE) -> Sprites:
    rgb, alpha = {}, {}
    with np.load(path, allow_pickle=False) as z:
        if [str(s) for s in z["names"]] != OBJECT_NAMES:
            raise ValueError(f"{path} holds other objects than research.bundled.scenes.OBJECTS; re-render it")
        for side in SIZES:
            a = torch.from_numpy(z[f"sprites{side}"]).permute(0, 3, 1, 2).float() / 255
            rgb[side], alpha[side] = a[:, :3].contiguous(), a[:, 3:].contiguous()
    return Sprites(rgb, alpha)


_SPRITES: Sprites | None = None


def sprites() -> Sprites:
    """The committed sprites, loaded once."""
    global _SPRITES
    if _SPRITES is None:
        _SPRITES = load_sprites()
    return _SPRITES


def background_rgb(bg: int) -> torch.Tensor:
    return torch.tensor(BACKGROUNDS[bg][1], dtype=torch.float32) / 255


def composite(scene: Scene, spr: Sprites | None = None) -> torch.Tensor:
    """The scene as float ``[3, H, W]`` in [0, 1], on the 8-bit grid (what a PNG of it holds):
    ``premultiplied object + (1 - alpha) * background`` inside the box, the background outside."""
    spr = spr or sprites()
    side = scene.side
    img = background_rgb(scene.bg)[:, None, None].expand(3, RESOLUTION, RESOLUTION).clone()
    x0, y0, x1, y1 = scene.box
    a = spr.alpha[side][scene.obj]
    img[:, y0:y1, x0:x1] = spr.rgb[side][scene.obj] + (1 - a) * img[:, y0:y1, x0:x1]
    return (img * 255).round().clamp(0, 255) / 255


def object_mask(scene: Scene, spr: Sprites | None = None, opaque: bool = False) -> np.ndarray:
    """Boolean ``[H, W]``: every pixel the object touches (alpha > 0); outside it the scene is
    exactly the background. With ``opaque``: the pixels it covers entirely (alpha = 1), which
    show no background at all."""
    spr = spr or sprites()
    m = np.zeros((RESOLUTION, RESOLUTION), dtype=bool)
    x0, y0, x1, y1 = scene.box
    m[y0:y1, x0:x1] = spr.mask(scene.obj, scene.size, opaque)
    return m


def box_mask(scene: Scene) -> np.ndarray:
    m = np.zeros((RESOLUTION, RESOLUTION), dtype=bool)
    x0, y0, x1, y1 = scene.box
    m[y0:y1, x0:x1] = True
    return m


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8."""
    return (img.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


# --- random draws ----------------------------------------------------------------------------


def draw_scenes(n: int, gen: torch.Generator, held_out: bool = False) -> list[Scene]:
    """``n`` uniform scenes from the training split (or, with ``held_out``, the evaluation split),
    by rejection: candidates are drawn in blocks from ``gen``, so a run is deterministic."""
    found: list[Scene] = []
    while len(found) < n:
        m = 2 * n if not held_out else 16 * n
        obj = torch.randint(len(OBJECTS), (m,), generator=gen)
        bg = torch.randint(len(BACKGROUNDS), (m,), generator=gen)
        size = torch.randint(len(SIZES), (m,), generator=gen)
        u = torch.rand(m, 2, generator=gen)
        span = RESOLUTION - torch.tensor(SIZES)[size] + 1  # positions 0 .. 32 - side
        x = (u[:, 0] * span).long().clamp(max=span - 1)
        y = (u[:, 1] * span).long().clamp(max=span - 1)
        keep = is_held_out(obj, bg, size, x, y) == held_out
        for i in torch.nonzero(keep).flatten().tolist():
            found.append(Scene(int(obj[i]), int(bg[i]), int(size[i]), int(x[i]), int(y[i])))
            if len(found) == n:
                break
    return found


class SceneSource:
    """Training batches for :mod:`research.bundled.train`: pixels in [-1, 1] and prompt indices."""

    prompts = PROMPTS

    def __init__(self, spr: Sprites | None = None):
        self.spr = spr or sprites()

    def batch(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = draw_scenes(b, gen)
        pixels = torch.stack([composite(s, self.spr) for s in scenes]) * 2 - 1
        idx = torch.tensor([prompt_index(s.obj, s.bg) for s in scenes])
        return pixels, idx


def main() -> None:
    p = argparse.ArgumentParser(description="Render the scene sprites from Noto Color Emoji.")
    p.add_argument("--out", type=Path, default=SPRITE_FILE)
    args = p.parse_args()
    arrays = render_sprites()
    atomic_write(args.out, lambda f: np.savez_compressed(f, **arrays))
    print(f"{len(OBJECTS)} objects x sizes {SIZES} -> {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
