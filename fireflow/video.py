"""Video input and output: mp4, webm, gif and a folder of frames in; mp4 (H.264), gif and a folder of
PNG frames out, the frame rate kept, every write atomic.

The library is PyAV (``av`` on PyPI): bindings to FFmpeg's own libraries, maintained alongside
FFmpeg's releases, whose binary wheels bundle those libraries with libx264 (H.264) and libvpx
(VP8/VP9), so ``pip install av`` is all it takes, on Linux, macOS and Windows, with no system
FFmpeg and no subprocess. It gives what the size guard needs without decoding a frame: the
container's frame count, width and height (``imageio-ffmpeg``, the other candidate, runs an ``ffmpeg``
binary and parses its log, and has no ffprobe). GIFs are written through FFmpeg's GIF encoder with
a palette per frame from Pillow (Pillow's own GIF writer merges identical frames, which would change
the frame count).

The API works on lists of RGB PIL frames: :func:`read_video` returns ``(frames, fps)``;
``FireFlowEditor.edit`` takes the frames (or the path: ``fireflow.image.load_frames`` reads it here)
and returns ``out.videos``, one list of PIL frames per target prompt. The editor does not carry
the frame rate: keep the ``fps`` from :func:`read_video` and give it to :func:`write_video`.

A folder of frames is read in natural order of the file names (``f2.png`` before ``f10.png``);
its frame rate is the number in its ``fps.txt`` when it has one (what :func:`write_video` writes),
else :data:`DEFAULT_FPS`. GIF delays are whole hundredths of a second: 8 fps is written as delays of
12 and 13 alternating, and read back as 8.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from fireflow._io import atomic_write
from fireflow.image import MAX_FRAMES, MAX_PIXELS, ImageError, load_image, to_rgb, too_large

#: Containers read through FFmpeg (a ``.gif`` too; one with a single frame is also an image).
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")
#: What :func:`write_video` writes; a path without a suffix is a folder of PNG frames.
WRITE_SUFFIXES = (".mp4", ".gif")
#: Frame rate of a folder without ``fps.txt``: Wan's (16 fps).
DEFAULT_FPS = 16.0
FPS_FILE = "fps.txt"
#: Frames times pixels may be at most this many times ``max_pixels`` (as for a list of frames).
TOTAL_FACTOR = 16
#: x264's constant rate factor: 18 is near visually lossless (its default, 23, is visibly softer).
H264_CRF = 18


class VideoError(ImageError):
    """The input is not a usable video, or the output cannot be written."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, read before any frame is decoded."""

    frames: int
    width: int
    height: int
    fps: float


def _av():
    try:
        import av
    except ModuleNotFoundError:  # a declared dependency; said plainly if it is missing anyway
        raise VideoError("video needs PyAV: pip install av") from None
    return av


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    exts = set(Image.registered_extensions())
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts]
    return sorted(files, key=lambda p: _natural(p.name))


def is_animated_gif(path: Path) -> bool:
    """Whether a ``.gif`` has a second frame (Pillow reads headers only to tell)."""
    try:
        with Image.open(path) as im:
            return bool(getattr(im, "is_animated", False))
    except Exception:  # noqa: BLE001 - unreadable: let the reader say so
        return True


def is_video_path(path: str | os.PathLike) -> bool:
    """A folder (of frames), or a file whose suffix is a video container's (an animated ``.gif``;
    a single-frame one stays an image)."""
    p = Path(path)
    if p.is_dir():
        return True
    suffix = p.suffix.lower()
    if suffix == ".gif":
        return p.is_file() and is_animated_gif(p)
    return suffix in VIDEO_SUFFIXES


def _what(path: Path, name: str | None) -> str:
    return name or (f"frames folder {str(path)!r}" if path.is_dir() else f"video {str(path)!r}")


def probe_video(path: str | os.PathLike, name: str | None = None) -> VideoInfo:
    """Frame count, size and frame rate from the container's metadata (or, where the container has
    no count, as webm and gif often do, from its packets, demuxed but not decoded); a folder: its
    files' headers, all of one size. Nothing is decoded."""
    path = Path(path)
    what = _what(path, name)
    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise VideoError(f"{what} has no image files; give a folder of frames (png, jpg, ...)")
        sizes = []
        for f in files:
            try:
                with Image.open(f) as im:
                    sizes.append(im.size)
            except Exception as e:  # noqa: BLE001 - any unreadable header
                raise VideoError(f"{what}: {f.name!r} is not a readable image: {_first_line(e)}") from None
            if sizes[-1] != sizes[0]:
                (w0, h0), (w, h) = sizes[0], sizes[-1]
                raise VideoError(
                    f"{what}: frames of different sizes ({files[0].name!r} is {w0}x{h0}, {f.name!r} is {w}x{h}); "
                    "give frames of one size"
                )
        return VideoInfo(len(files), *sizes[0], _folder_fps(path, what))
    if not path.is_file():
        raise VideoError(f"{what} not found")
    av = _av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoError(f"{what} has no video frames")
            s = c.streams.video[0]
            w, h = s.codec_context.width, s.codec_context.height
            rate = s.guessed_rate or s.average_rate or s.base_rate
            n = s.frames
            if not n:  # no count in the container: its packets, demuxed, not decoded
                n = sum(1 for p in c.demux(s) if p.size)
    except av.FFmpegError as e:
        raise VideoError(f"{what} is not a readable video: {_ffmpeg_reason(e)}") from None
    if n == 0:
        raise VideoError(f"{what} has no video frames")
    if not w or not h:
        raise VideoError(f"{what} is not a readable video: no frame size in its header")
    return VideoInfo(n, w, h, float(rate) if rate else DEFAULT_FPS)


def check_size(
    info: VideoInfo, max_pixels: int | None = MAX_PIXELS, max_frames: int | None = None, what: str = "video"
) -> int:
    """The number of frames that will be read (the first ``max_frames``), after the guard: each
    frame at most ``max_pixels``, at most :data:`MAX_FRAMES` frames, and frames x pixels at most
    ``16 x max_pixels``. Raises :class:`VideoError` (one line) before anything is decoded."""
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"--max-frames must be at least 1, got {max_frames}")
    n = info.frames if max_frames is None else min(info.frames, max_frames)
    w, h = info.width, info.height
    if max_pixels is not None and w * h > max_pixels:
        raise too_large(w, h, max_pixels, f"each frame of the {what}")
    if n > MAX_FRAMES:
        raise VideoError(f"{what} has {n} frames, more than the {MAX_FRAMES} accepted; keep fewer with --max-frames")
    if max_pixels is not None and n * w * h > TOTAL_FACTOR * max_pixels:
        raise VideoError(
            f"{what}: {n} frames of {w}x{h} = {n * w * h} pixels, more than {TOTAL_FACTOR} x max_pixels "
            f"({TOTAL_FACTOR * max_pixels}); keep fewer with --max-frames or use a smaller video"
        )
    return n


def read_video(
    path: str | os.PathLike,
    *,
    max_frames: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    name: str | None = None,
) -> tuple[list[Image.Image], float]:
    """The first ``max_frames`` frames (all when None) of a video file or a folder of frames, as
    RGB PIL images, and the frame rate. Sized by :func:`probe_video` and refused by
    :func:`check_size` before any frame is decoded; ``name`` replaces "video '<path>'" in messages."""
    path = Path(path)
    what = _what(path, name)
    info = probe_video(path, name)
    n = check_size(info, max_pixels, max_frames, what)
    if path.is_dir():
        frames = [load_image(f, max_pixels, name=f"{what}: {f.name!r}") for f in _frame_files(path)[:n]]
        return frames, info.fps
    av = _av()
    frames: list[Image.Image] = []
    try:
        with av.open(str(path)) as c:
            for frame in c.decode(c.streams.video[0]):
                if (frame.width, frame.height) != (info.width, info.height):
                    raise VideoError(
                        f"{what}: frame {len(frames)} is {frame.width}x{frame.height}, the first "
                        f"{info.width}x{info.height}; give a video of one size"
                    )
                frames.append(_to_pil(frame))
                if len(frames) == n:
                    break
    except av.FFmpegError as e:
        raise VideoError(f"{what} is not a readable video: {_ffmpeg_reason(e)}") from None
    if not frames:
        raise VideoError(f"{what} has no video frames")
    return frames, info.fps


def _to_pil(frame) -> Image.Image:
    """An RGB image; a frame with alpha (gif, webm with alpha) goes on white, as stills do."""
    if frame.format.has_palette or any(c.is_alpha for c in frame.format.components):
        return to_rgb(Image.fromarray(frame.to_ndarray(format="rgba"), "RGBA"))
    return Image.fromarray(frame.to_ndarray(format="rgb24"), "RGB")


def _folder_fps(folder: Path, what: str) -> float:
    f = folder / FPS_FILE
    if not f.is_file():
        return DEFAULT_FPS
    try:
        fps = float(f.read_text().strip())
    except ValueError:
        raise VideoError(f"{what}: {FPS_FILE} does not hold a frame rate (a number such as 16)") from None
    if not 0 < fps <= 1000:
        raise VideoError(f"{what}: {FPS_FILE} says {fps:g} fps; accepted: more than 0, at most 1000")
    return fps


# ---- writing -------------------------------------------------------------------------------------
def output_kind(path: str | os.PathLike) -> str | None:
    """``"mp4"``, ``"gif"``, ``"folder"`` (no suffix, or an existing folder), or None (not a video output)."""
    p = Path(path)
    if str(path).endswith(("/", os.sep)) or p.is_dir() or not p.suffix:
        return "folder"
    suffix = p.suffix.lower()
    return suffix[1:] if suffix in WRITE_SUFFIXES else None


def write_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float) -> Path:
    """Write ``frames`` at ``fps`` to ``path``: ``.mp4`` (H.264, yuv420p), ``.gif``, or a folder of
    PNG frames (a path without a suffix; with ``fps.txt``). Atomic: a file goes through a temporary
    file and a rename; a folder is written beside it under a temporary name and renamed into place
    (it must not exist, or be empty). A reader never sees half a video."""
    kind = output_kind(path)
    path = Path(path)
    if kind is None:
        raise VideoError(f"cannot tell the video format from {str(path)!r}; use .mp4, .gif or a folder (no suffix)")
    if not frames:
        raise VideoError("no frames to write")
    if not fps or not 0 < fps <= 1000:
        raise VideoError(f"fps {fps!r}: accepted more than 0, at most 1000")
    frames = [f.convert("RGB") for f in frames]
    w, h = frames[0].size
    if any(f.size != (w, h) for f in frames):
        raise VideoError(f"frames of different sizes: {sorted({f.size for f in frames})}")
    if kind == "folder":
        _write_folder(frames, path, fps)
    elif kind == "mp4":
        if w % 2 or h % 2:
            raise VideoError(f"mp4 (H.264, 4:2:0) needs an even width and height, got {w}x{h}; write .gif or frames")
        atomic_write(path, lambda f: _encode(frames, f, fps, "mp4", "libx264", "yuv420p"))
    else:
        atomic_write(path, lambda f: _encode(frames, f, fps, "gif", "gif", "pal8"))
    return path


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _encode(frames: list[Image.Image], f, fps: float, fmt: str, codec: str, pix_fmt: str) -> None:
    av = _av()
    w, h = frames[0].size
    with av.open(f, "w", format=fmt) as c:
        options = {"crf": str(H264_CRF)} if codec == "libx264" else {}
        s = c.add_stream(codec, rate=_rate(fps), options=options)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for im in frames:
            frame = _pal8(im) if pix_fmt == "pal8" else av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")
            frame.pts = None
            c.mux(s.encode(frame))
        c.mux(s.encode())


def _pal8(im: Image.Image):
    """A GIF frame: Pillow's palette for this frame (up to 256 colours), as FFmpeg's ARGB palette."""
    av = _av()
    q = im.quantize(256)
    pal = np.asarray(q.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)
    argb = np.zeros((256, 4), dtype=np.uint8)
    argb[:, 0] = 255
    argb[: len(pal), 1:] = pal
    return av.VideoFrame.from_ndarray((np.asarray(q), argb), format="pal8")


def _write_folder(frames: list[Image.Image], path: Path, fps: float) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise VideoError(f"{str(path)!r} exists and is not an empty folder; give a new folder for the frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        digits = max(5, len(str(len(frames) - 1)))
        for i, im in enumerate(frames):
            im.save(tmp / f"frame_{i:0{digits}d}.png", format="PNG")
        (tmp / FPS_FILE).write_text(f"{fps:g}\n")
        if path.is_dir():  # empty: rename replaces an empty folder
            path.rmdir()
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ffmpeg_reason(e: Exception) -> str:
    reason = getattr(e, "strerror", None) or str(e)
    return _first_line(reason)


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
