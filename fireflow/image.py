"""Image input and output: any path, PIL image or array to RGB; atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fireflow._io import atomic_write

#: Default guard on input size: 4096 x 4096 pixels. FLUX at that size needs far more memory than a card has.
MAX_PIXELS = 4096 * 4096

ImageInput = str | os.PathLike | Image.Image | np.ndarray


class ImageError(ValueError):
    """The input is not a usable image."""


def load_image(image: ImageInput, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open ``image`` as an 8-bit RGB PIL image with its EXIF orientation applied.

    RGBA and LA are composited on white; palette, grayscale, CMYK and 16-bit modes are converted.
    Arrays may be HxW or HxWxC (C = 1, 3, 4), uint8, uint16, or float in [0, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image {str(path)!r} not found")
        try:
            with Image.open(path) as im:
                pil = ImageOps.exif_transpose(im)  # a loaded copy, upright
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{str(path)!r} is not a readable image: {e}") from None
    elif isinstance(image, Image.Image):
        pil = ImageOps.exif_transpose(image)
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; accepted: path, PIL.Image, numpy array")
    w, h = pil.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"image {w}x{h} has {w * h} pixels, more than the limit of {max_pixels}")
    return to_rgb(pil)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency goes on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"array of shape {arr.shape} is not an image; accepted: HxW or HxWxC with C in 1, 3, 4")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 65535.0 * 255 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"array dtype {arr.dtype} not supported; accepted: uint8, uint16, float in [0, 1]")
    return Image.fromarray(arr)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL to ``[1, 3, H, W]`` float32 in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [-1, 1] to RGB PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Write ``image`` to ``path`` through a temporary file and a rename: never a partial file."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"cannot tell the image format from {str(path)!r}; use .png, .jpg or .webp")
    atomic_write(path, lambda f: image.save(f, format=fmt))
