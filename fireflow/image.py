"""Image input and output: any path, PIL image or array to RGB; atomic writes."""

from __future__ import annotations

import os
import re
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


class ImageTooLarge(ImageError):
    """The image has more pixels than the limit (refused from the file's header when it is a file)."""


def load_image(image: ImageInput, max_pixels: int | None = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open ``image`` as an 8-bit RGB PIL image with its EXIF orientation applied.

    RGBA and LA are composited on white; palette, grayscale, CMYK, 16-bit and float modes are
    converted (see :func:`to_rgb`). Arrays may be HxW or HxWxC (C = 1, 3, 4), uint8, uint16, or
    float in [0, 1] (a float array outside it is refused: give 0..255 as uint8). An empty image, or
    one with NaN or infinite values, is refused.

    A file is sized from its header and refused before any pixel is decoded when it has more than
    ``max_pixels`` pixels (None: no limit of ours; Pillow's decompression-bomb limit still holds).
    Every refusal, whatever the size, is one :class:`ImageTooLarge` of the same wording. ``name``
    replaces "image '<path>'" in messages (a server does not show its paths).
    """
    is_path = isinstance(image, (str, os.PathLike))
    what = name or (f"image {str(image)!r}" if is_path else "image")
    if is_path:
        pil = _open_file(Path(image), max_pixels, name)
    elif isinstance(image, Image.Image):
        check_pixels(image.size, max_pixels, what)
        pil = ImageOps.exif_transpose(image)
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; accepted: path, PIL.Image, numpy array")
    check_pixels(pil.size, max_pixels, what)
    if 0 in pil.size:
        raise ImageError(f"{what} is {pil.width}x{pil.height}: empty; an image needs at least 1x1 pixels")
    return to_rgb(pil, what)


#: Largest number of frames a clip may have (a guard like ``max_pixels``, counted before decoding).
MAX_FRAMES = 1024


def load_frames(media, max_pixels: int | None = MAX_PIXELS) -> list[Image.Image]:
    """One image, or a clip given as a sequence of frames (paths, PIL images or arrays), or a video
    path (mp4, webm, animated gif, ...; a folder of frames), as a list of RGB frames. ``max_pixels``
    bounds each frame and frames x pixels together. A video is read by :func:`fireflow.video.read_video`
    (all its frames; its frame rate is dropped here: call ``read_video`` to keep it)."""
    if isinstance(media, (str, os.PathLike)):
        from fireflow import video

        if video.is_video_path(media):
            return video.read_video(media, max_pixels=max_pixels)[0]
    if isinstance(media, (list, tuple)):
        if not media:
            raise ImageError("the clip has no frames; give at least one image")
        if len(media) > MAX_FRAMES:
            raise ImageError(f"{len(media)} frames is more than the {MAX_FRAMES} accepted")
        frames = [load_image(f, max_pixels) for f in media]
        w, h = frames[0].size
        if max_pixels is not None and len(frames) * w * h > max_pixels * 16:
            raise ImageError(f"{len(frames)} frames of {w}x{h} are more than 16 x max_pixels ({max_pixels}) in all")
        return frames
    return [load_image(media, max_pixels)]


def check_pixels(size: tuple[int, int], max_pixels: int | None, what: str = "image") -> None:
    """Raise :class:`ImageError` when ``size`` (w, h) has more than ``max_pixels`` pixels."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise too_large(w, h, max_pixels, what)


def too_large(
    w: int | None, h: int | None, limit: int, what: str = "image", pixels: int | None = None
) -> ImageTooLarge:
    """The one message for an image over a pixel limit."""
    n = pixels if w is None or h is None else w * h
    dims = f"{w}x{h} = " if w is not None and h is not None else ""
    return ImageTooLarge(f"{what} is {dims}{n} pixels, more than the limit of {limit}; use a smaller image")


def _open_file(path: Path, max_pixels: int | None, name: str | None = None) -> Image.Image:
    """Decode ``path`` only after its header says it is small enough."""
    what = name or f"image {str(path)!r}"
    if path.is_dir():
        raise ImageError(f"{what} is a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"{what} not found")
    # Pillow's own guard sits at 2 x Image.MAX_IMAGE_PIXELS; ours is usually far lower, and the
    # warning Pillow prints between its two thresholds would be a second line for one refusal.
    bomb_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    # Sized from the header first: an image over our limit is refused before Pillow's own checks,
    # so Pillow's decompression-bomb warning (between its two thresholds) is never reached for it,
    # with no process-wide warning filter (``warnings.catch_warnings`` is not thread-safe).
    size = _header_size(path)
    if size is not None:
        check_pixels(size, max_pixels, what)
    try:
        im = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        limit = min(x for x in (max_pixels, bomb_limit) if x is not None)
        size = _header_size(path)
        if size is not None:
            raise too_large(*size, limit, what) from None
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(None, None, limit, what, int(m.group(1)) if m else None) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{what} is not a readable image: {e}") from None
    with im:
        check_pixels(im.size, max_pixels, what)
        try:
            return ImageOps.exif_transpose(im)  # decodes: a loaded copy, upright
        except Image.DecompressionBombError:  # a frame larger than the header said
            raise too_large(*im.size, bomb_limit or 0, what) from None
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
            raise ImageError(f"{what} is not a readable image: {e}") from None


def header_size(source: str | os.PathLike | bytes) -> tuple[int, int] | None:
    """(w, h) of an image file or its bytes from the header alone, never decoding a pixel (None:
    not an image Pillow knows). What a server checks against its pixel limit before decoding."""
    import io

    if isinstance(source, (bytes, bytearray, memoryview)):
        return _header_size(io.BytesIO(bytes(source)))
    return _header_size(Path(source))


def _header_size(path) -> tuple[int, int] | None:
    """(w, h) from the header of a file Pillow refused as a decompression bomb, without decoding.

    Runs the format plugins' header readers the way ``Image.open`` does, minus its size check.
    ``path``: a path, or an open binary file.
    """
    import contextlib

    Image.init()
    opened = open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)
    with opened as fp:
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            try:
                ok = accept(prefix) if accept is not None else True
            except Exception:  # noqa: BLE001 - a prefix too short for this format's test
                continue
            if not ok or isinstance(ok, str):  # a str is Pillow's "almost this format" warning
                continue
            fp.seek(0)
            try:
                return factory(fp, str(path) if isinstance(path, (str, os.PathLike)) else "").size
            except Exception:  # noqa: BLE001 - not this format
                continue
    return None


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency goes on white.

    Wide grayscale modes are scaled by the range they hold: 16-bit ("I;16*") by 65535; 32-bit
    integer ("I") by 255 when every value fits 8 bits, else by 65535; float ("F", e.g. a float
    TIFF) by 1 when its values lie in [0, 1], else as "I". Values below 0 or above 65535, NaN and
    infinities are refused (:class:`ImageError`, ``what`` naming the image).
    """
    if image.mode in ("F", "I") or image.mode.startswith("I;16"):
        image = Image.fromarray(_wide_to_8bit(image, what), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_8bit(image: Image.Image, what: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image as uint8, scaled as :func:`to_rgb` says."""
    arr = np.asarray(image, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ImageError(f"{what} contains NaN or infinite values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        peak = 65535.0  # its bit depth says the range; a dark 16-bit image stays dark
    elif lo < 0 or hi > 65535:
        kind = "float" if image.mode == "F" else "32-bit integer"
        raise ImageError(f"{what} has {kind} values from {lo:g} to {hi:g}; accepted: 0..1 (float), 0..255 or 0..65535")
    elif image.mode == "F" and hi <= 1:
        peak = 1.0
    else:
        peak = 255.0 if hi <= 255 else 65535.0
    return np.clip(arr / peak * 255 + 0.5, 0, 255).astype(np.uint8)


#: Float arrays may stray this far outside [0, 1] (rounding in the caller's arithmetic) and are
#: clipped: less than half an 8-bit level, so the clipped value is the level it would round to.
_FLOAT_SLACK = 0.5 / 255


def _from_array(arr: np.ndarray) -> Image.Image:
    shape = arr.shape
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"array of shape {shape} is not an image; accepted: HxW or HxWxC with C in 1, 3, 4")
    if arr.size == 0:
        raise ImageError(f"array of shape {shape} is empty; an image needs at least 1x1 pixels")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 65535.0 * 255 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
            raise ImageError(
                f"float array values span {lo:g}..{hi:g}; float arrays must be in [0, 1] (uint8 for 0..255)"
            )
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
