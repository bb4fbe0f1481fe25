"""The demo model's training set: colour emoji from Noto Color Emoji, rendered small on white.

``python -m research.bundled.emoji`` renders the set from Debian's ``fonts-noto-color-emoji`` and
writes ``emoji32.npz`` beside this file. That file is committed, so that training, tests and the
quality script need neither the font nor the renderer. Noto Color Emoji (googlefonts/noto-emoji,
(c) Google) ships its font under the SIL Open Font Licence 1.1, which does not extend to documents
made with the font such as these bitmaps, and its artwork under Apache-2.0.

Prompts are the CLDR short names, as the ``emoji`` package spells them (``:red_heart:`` ->
``"red heart"``), lower-cased.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fireflow._io import atomic_write

DATA_FILE = Path(__file__).with_name("emoji32.npz")
FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
#: The only size a CBDT bitmap font renders at; Pillow refuses others.
FONT_SIZE = 109

# Families as code-point ranges (inclusive). Only single-code-point emoji are used (an optional
# U+FE0F presentation selector aside): no skin tones, no ZWJ sequences, so each prompt names one
# picture. Ranges also catch a few non-members; the name filters in FAMILIES drop them.
_FACE_RANGES = [
    (0x1F600, 0x1F644),  # emoticons block: faces and cat faces
    (0x1F910, 0x1F92F),
    (0x1F970, 0x1F97A),
    (0x1F9D0, 0x1F9D0),
    (0x1FAE0, 0x1FAE8),
    (0x263A, 0x263A),
    (0x2639, 0x2639),
]
_ANIMAL_FACES = [
    0x1F436, 0x1F431, 0x1F42D, 0x1F439, 0x1F430, 0x1F98A, 0x1F43B, 0x1F43C, 0x1F428, 0x1F42F,
    0x1F981, 0x1F42E, 0x1F437, 0x1F438, 0x1F435, 0x1F434, 0x1F984, 0x1F43A, 0x1F432, 0x1F993,
    0x1F99D, 0x1F417, 0x1F989, 0x1F414, 0x1F427, 0x1F424, 0x1F425, 0x1F41D, 0x1F41E, 0x1F422,
]  # fmt: skip
_HEARTS = [
    0x2764, 0x1F9E1, 0x1F49B, 0x1F49A, 0x1F499, 0x1F49C, 0x1F5A4, 0x1F90D, 0x1F90E, 0x1FA75,
    0x1FA76, 0x1FA77, 0x1F494, 0x1F495, 0x1F496, 0x1F497, 0x1F498, 0x1F493, 0x1F49E, 0x1F49D,
    0x1F49F, 0x2763, 0x1F48C, 0x1F60D, 0x1F63B,
]  # fmt: skip
_FRUIT_VEG = [
    *range(0x1F347, 0x1F354),  # grapes .. strawberry
    0x1FAD0, 0x1F95D, 0x1F345, 0x1FAD2, 0x1F965, 0x1F951, 0x1F346, 0x1F954, 0x1F955, 0x1F33D,
    0x1F336, 0x1FAD1, 0x1F952, 0x1F96C, 0x1F966, 0x1F9C4, 0x1F9C5, 0x1F95C, 0x1FAD8, 0x1F330,
    0x1FADA, 0x1FADB, 0x1F344,
]  # fmt: skip
_WEATHER = [
    0x2600, 0x1F31E, 0x2601, 0x26C5, 0x26C8, *range(0x1F324, 0x1F32D), 0x1F308, 0x2614, 0x2602,
    0x2744, 0x2603, 0x26C4, 0x26A1, 0x1F321, 0x1F319, 0x1F31D, 0x1F31A, 0x2B50, 0x1F31F, 0x1F300,
    0x1F4A7, 0x1F30A, 0x2604, 0x1F525, 0x1F32B,
]  # fmt: skip


# Non-faces inside the face ranges: hand gestures, person facepalming, ninja, biting lip, bubbles.
_NOT_FACES = {*range(0x1F918, 0x1F920), 0x1F926, 0x1F977, 0x1FAE6, 0x1FAE7}


def _expand(ranges: list[tuple[int, int]]) -> list[int]:
    return [c for lo, hi in ranges for c in range(lo, hi + 1) if c not in _NOT_FACES]


#: family -> code points. A code point listed twice keeps its first family.
FAMILIES: dict[str, list[int]] = {
    "hearts": _HEARTS,
    "animal faces": _ANIMAL_FACES,
    "faces": _expand(_FACE_RANGES),
    "fruit and vegetables": _FRUIT_VEG,
    "weather": _WEATHER,
}


#: Source images shipped in ``examples/`` for the README's edit commands.
EXAMPLE_PROMPTS = ["red heart", "cat face", "grinning face", "red apple", "cloud", "yellow heart"]


@dataclass
class EmojiSet:
    """Rendered emoji: ``images`` uint8 ``[N, H, W, 3]`` on white, and one prompt per image."""

    images: np.ndarray
    prompts: list[str]
    chars: list[str]
    families: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, prompt: str) -> int:
        """Position of the emoji whose prompt is ``prompt``."""
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise KeyError(f"no emoji named {prompt!r} in the demo set ({len(self)} prompts)") from None

    def pixels(self) -> np.ndarray:
        """Images as float32 ``[N, 3, H, W]`` in [-1, 1], the model's input range."""
        return self.images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def load(path: str | os.PathLike = DATA_FILE) -> EmojiSet:
    """Load the committed rendered set (no font needed)."""
    with np.load(path, allow_pickle=False) as z:
        return EmojiSet(
            images=z["images"],
            prompts=[str(s) for s in z["prompts"]],
            chars=[str(s) for s in z["chars"]],
            families=[str(s) for s in z["families"]],
        )


def qualified(char: str) -> tuple[str, str] | None:
    """The fully-qualified spelling of ``char`` and its CLDR short name, lower-cased
    (``"\u2764"`` -> ``("\u2764\ufe0f", "red heart")``); None where it is no emoji."""
    import emoji

    for cand in (char, char + "\ufe0f"):
        data = emoji.EMOJI_DATA.get(cand)
        if data is not None and data.get("status") == emoji.STATUS["fully_qualified"]:
            return cand, data["en"].strip(":").replace("_", " ").lower()
    return None


def square_glyph(char: str, font, clear: tuple[int, int, int, int] = (255, 255, 255, 0)) -> Image.Image:
    """``char``'s glyph cropped to its ink and centred on a square of the transparent colour ``clear``."""
    from PIL import ImageDraw

    canvas = Image.new("RGBA", (160, 160), clear)
    ImageDraw.Draw(canvas).text((8, 8), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"the font has no glyph for {char!r} (U+{ord(char[0]):04X})")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), clear)
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square


def render(char: str, size: int, font=None) -> Image.Image:
    """One emoji, cropped to its glyph, padded square and centred on white, ``size`` pixels wide.

    Composites on white at full resolution before downscaling, so edges blend into white rather
    than into the transparent black of the glyph's background.
    """
    from PIL import ImageFont

    square = square_glyph(char, font or ImageFont.truetype(FONT_PATH, FONT_SIZE))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, square).convert("RGB")
    # A one-pixel white margin at 32 px keeps every emoji off the border.
    inner = size - 2 * max(1, size // 32)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(rgb.resize((inner, inner), Image.Resampling.LANCZOS), ((size - inner) // 2,) * 2)
    return out


def build(size: int = 32) -> EmojiSet:
    """Render every family's emoji that the font draws and that has a CLDR name."""
    from PIL import ImageFont

    font = ImageFont.truetype(FONT_PATH, FONT_SIZE)
    seen: set[int] = set()
    images, prompts, chars, families = [], [], [], []
    for family, codes in FAMILIES.items():
        for code in codes:
            if code in seen:
                continue
            seen.add(code)
            found = qualified(chr(code))
            if found is None or found[1] in prompts:
                continue
            char, name = found
            try:
                img = render(char, size, font)
            except ValueError:
                continue
            images.append(np.asarray(img, dtype=np.uint8))
            prompts.append(name)
            chars.append(char)
            families.append(family)
    return EmojiSet(np.stack(images), prompts, chars, families)


def save(data: EmojiSet, path: str | os.PathLike = DATA_FILE) -> None:
    """Write the set atomically (temp file + rename)."""
    arrays = dict(
        images=data.images,
        prompts=np.array(data.prompts),
        chars=np.array(data.chars),
        families=np.array(data.families),
    )
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def render_examples(prompts: list[str], folder: Path, size: int = 128) -> list[Path]:
    """Write ``<prompt with underscores>.png`` for each prompt, framed like the training set but
    ``size`` pixels wide (the editor resizes it to the model's 32x32)."""
    from PIL import ImageFont

    font = ImageFont.truetype(FONT_PATH, FONT_SIZE)
    chars = {p: c for c, p in (qualified(chr(code)) or ("", "") for codes in FAMILIES.values() for code in codes)}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for prompt in prompts:
        if prompt not in chars:
            raise KeyError(f"no emoji named {prompt!r} in the demo families")
        path = folder / (prompt.replace(" ", "_") + ".png")
        render(chars[prompt], size, font).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Render the demo model's emoji set from Noto Color Emoji.")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    parser.add_argument("--examples", type=Path, default=None, help="also write example PNGs here")
    args = parser.parse_args()
    if args.examples is not None:
        for path in render_examples(EXAMPLE_PROMPTS, args.examples):
            print(path)
        return
    data = build(args.size)
    save(data, args.out)
    counts = {f: data.families.count(f) for f in FAMILIES}
    print(f"{len(data)} emoji at {args.size}x{args.size} -> {args.out}: {counts}")


if __name__ == "__main__":
    main()
