"""Edit masks: any path, image or array to a boolean mask at the image's size, and the pixel paste.

White (or True, or nonzero) marks the region to edit; everything else is kept.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageFilter

from fireflow.image import ImageError, load_image

MaskInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def load_mask(mask: MaskInput, size: tuple[int, int]) -> np.ndarray:
    """``mask`` as a bool array ``[H, W]`` for an image of ``size = (width, height)``.

    Images are read as grayscale (alpha composited on white first, so a transparent background is
    not an edit region) and thresholded at half intensity; arrays at 0.5 (floats) or nonzero
    (integers, bools). A mask of another size is resized (nearest). An all-black mask edits
    nothing and is refused; an all-white one is the unmasked edit.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        arr = mask.squeeze()
        if arr.ndim != 2:
            raise ImageError(f"mask array of shape {mask.shape} is not a mask; accepted: HxW (or 1xHxW)")
        if arr.dtype == bool:
            m = arr
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ImageError("mask array has NaN or infinite values; accepted: 0..1 floats, ints or bools")
            m = arr >= 0.5
        elif np.issubdtype(arr.dtype, np.integer):
            m = arr != 0
        else:
            raise ImageError(f"mask dtype {arr.dtype} not supported; accepted: bool, integer, float in [0, 1]")
    else:
        # A path's errors (not found, a folder, not an image) name the mask, not "image".
        name = f"mask {str(mask)!r}" if isinstance(mask, (str, os.PathLike)) else "mask"
        gray = np.asarray(load_image(mask, max_pixels=None, name=name).convert("L"))
        m = gray >= 128
    w, h = size
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) >= 128
    if not m.any():
        raise ImageError("mask selects nothing (all black); white marks the region to edit")
    return m


def paste_pixels(edited: Image.Image, source: Image.Image, mask: np.ndarray, feather: int | None = None) -> Image.Image:
    """The source's pixels outside ``mask``, the edit inside, blended over a feathered edge that
    lies inside the mask, so every pixel outside it is the source's exactly."""
    if edited.size != source.size or mask.shape != (source.height, source.width):
        raise ValueError(f"sizes differ: edit {edited.size}, source {source.size}, mask {mask.shape[::-1]}")
    radius = max(1, min(source.size) // 64) if feather is None else feather
    hard = Image.fromarray(mask.astype(np.uint8) * 255)
    soft = np.asarray(hard.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255 if radius else 1.0
    alpha = (mask * np.minimum(1.0, 2 * soft))[..., None]  # 0 outside the mask, ramping up inside it
    out = np.asarray(edited, dtype=np.float32) * alpha + np.asarray(source, dtype=np.float32) * (1 - alpha)
    out = np.where(mask[..., None], out, np.asarray(source, dtype=np.float32))
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
