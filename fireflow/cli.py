"""The ``fireflow`` command: edit, invert, reconstruct, generate, plus the bench/eval/serve front ends.

Every subcommand is a thin layer over :class:`fireflow.FireFlowEditor`. Bad input ends with one
line on stderr, exit status 2, and no output file. An output that cannot be written (a full disk, a
file-size limit, stdout on a full device) ends with one line, ``cannot write ...``, and exit status
1: the input was fine; no partial file is left (writes go through a temporary file and a rename).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from fireflow import settings as knobs
from fireflow._io import atomic_write
from fireflow.image import MAX_PIXELS, ImageError, load_image, save_image_atomic
from fireflow.settings import EditSettings, SettingError

#: Front ends living in other modules; each has ``add_parser(subparsers)`` registering ``func``.
EXTRA_COMMANDS = ("fireflow.batch", "fireflow.bench.cli", "fireflow.web")


class UsageError(ValueError):
    """Bad command-line input, found before any work is done."""


class WriteError(Exception):
    """An output (a file, or stdout) could not be written: not bad input, so exit status 1."""


class StdoutError(WriteError):
    """stdout could not be written (a full device, a closed pipe)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other refusal (no usage block; -h has it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _pixel_limit(text: str) -> int:
    """``--max-pixels``: a positive whole number (a limit of 0 or below would blame every image)."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive whole number of pixels")
    return int(text)


def add_max_pixels(p: argparse.ArgumentParser, what: str = "images") -> None:
    """``--max-pixels``, checked as it is parsed; shared by the front ends."""
    p.add_argument(
        "--max-pixels", type=_pixel_limit, default=MAX_PIXELS, help=f"refuse larger {what} (default {MAX_PIXELS})"
    )


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; accepted: WIDTHxHEIGHT, e.g. 512x512")
    return int(w), int(h)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Where the model comes from and where it runs; shared by every front end."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="demo",
        help="'demo' or 'scenes' (bundled; default demo), a diffusers pipeline folder (README: families), or a Hub id",
    )
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: cuda if present)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument(
        "--offload", default=None, choices=["model", "group", "sequential"], help="CPU offload for small cards"
    )
    g.add_argument("--compile", action="store_true", help="regional torch.compile of the repeated blocks (GPU)")
    g.add_argument("--attention-backend", default=None, help="a diffusers attention backend, e.g. _native_cudnn, flash")


def check_attention_backend(name: str) -> None:
    """``--attention-backend``: a backend this diffusers knows and can run here, said before any model
    loads (diffusers itself says so only when the backend is set, after the load)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements
    except ImportError:  # another diffusers layout: the load's own error is caught in load_editor
        return
    names = sorted(b.value for b in AttentionBackendName)
    if name.lower() not in names:
        raise UsageError(f"--attention-backend {name!r} is not a diffusers backend; accepted: {', '.join(names)}")
    try:
        _check_attention_backend_requirements(AttentionBackendName(name.lower()))
    except (RuntimeError, ImportError) as e:
        raise UsageError(f"--attention-backend {name!r} cannot run here: {_one_line(e)}") from None


def add_edit_options(p: argparse.ArgumentParser) -> None:
    """The method's knobs (fireflow.settings), defaulting to the paper's PIE-Bench setting."""
    knobs.add_arguments(p)


def check_edit_options(args: argparse.Namespace) -> EditSettings:
    """Everything about the knobs that can be checked before a model is loaded."""
    return knobs.settings_from_args(args)


def check_model_options(args: argparse.Namespace, needs_pipeline: bool = True) -> None:
    """The device exists here, and the model is one the command can use: said before any model loads."""
    from fireflow.models import parse_device, require_pipeline

    try:
        parse_device(args.device, what="--device")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if getattr(args, "attention_backend", None):
        check_attention_backend(args.attention_backend)
    if needs_pipeline:
        require_pipeline(args.model, f"fireflow {args.command}")


def _add_image_options(p: argparse.ArgumentParser, video: bool = False) -> None:
    what = "; or a video: mp4, webm, gif, or a folder of frames (README: Video)" if video else ""
    p.add_argument("image", help=f"source image (any format Pillow reads){what}")
    p.add_argument("--resize", type=_size, default=None, help="resize to WIDTHxHEIGHT first (default: crop to /16)")
    add_max_pixels(p)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _output(path: str, suffixes: tuple[str, ...], flag: str = "-o") -> Path:
    """An output path that can be written, checked before any work starts."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path!r} must end in one of {', '.join(suffixes)}")
    if out.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; give a file name such as {out / ('out' + suffixes[0])}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {path!r}: {str(parent)!r} is not a folder")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: the folder {str(parent)!r} is not writable")
    return out


def _distinct(paths: list[tuple[str, Path]]) -> None:
    seen: dict[Path, str] = {}
    for flag, p in paths:
        key = p.expanduser().resolve()
        if key in seen:
            raise UsageError(f"{flag} {str(p)!r} is the same file as {seen[key]}; give each output its own path")
        seen[key] = flag


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_editor(args: argparse.Namespace, device: str | None = None):
    """The editor the model options ask for; shared by every front end (CLI, web, bench)."""
    from fireflow.editor import FireFlowEditor

    if getattr(args, "quiet", False):
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    editor = FireFlowEditor.from_pretrained(
        args.model, device=device or args.device, torch_dtype=args.dtype, offload=args.offload
    )
    if args.compile or args.attention_backend:
        try:
            editor.adapter.optimize(compile=args.compile, attention_backend=args.attention_backend)
        except RuntimeError as e:  # a backend check_attention_backend could not see (another diffusers)
            if not args.attention_backend:
                raise
            raise UsageError(f"--attention-backend {args.attention_backend!r}: {_one_line(e)}") from None
    _demo_threads(editor)
    return editor


def _demo_threads(editor) -> None:
    """A bundled demo model (2.8M parameters) on a CPU runs on one thread unless OMP_NUM_THREADS
    says otherwise: it gains nothing from more, and on a busy machine the threads' waiting made a
    6-frame call 14x slower (1.3 s against 0.09 s on the shared 2-core machine)."""
    from fireflow.models.demo import DemoAdapter

    a = editor.adapter
    if isinstance(a, DemoAdapter) and a.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def _say(text: str) -> None:
    """One line on stdout. A character its encoding lacks (a path in an ASCII locale) is escaped,
    not an error after the outputs were written; stdout that cannot be written is a WriteError."""
    out = sys.stdout
    if out is None:  # closed (>&-): nothing to tell
        return
    try:
        try:
            print(text, file=out, flush=True)
        except UnicodeEncodeError:
            enc = getattr(out, "encoding", None) or "ascii"
            print(text.encode(enc, "backslashreplace").decode(enc), file=out, flush=True)
    except OSError as e:
        raise StdoutError(f"cannot write to stdout: {e.strerror or e}") from None


def _write(path: Path, write: Callable[[], object]) -> None:
    """Run ``write`` (an atomic write of ``path``, which removes its temporary file on failure);
    a full disk or a file-size limit is one line naming the path."""
    try:
        write()
    except OSError as e:
        raise WriteError(f"cannot write {str(path)!r}: {e.strerror or _one_line(e)}") from None


def _write_all(items: list[tuple[Path, Callable[[Path], object]]]) -> None:
    """Write every output or none: each ``write(tmp)`` goes to a hidden sibling of its path (same
    suffix, so the format is the path's), and only when all succeeded are they renamed into place.
    A failed write removes the siblings already made, so several targets never leave some."""
    made: list[tuple[Path, Path]] = []
    try:
        for path, write in items:
            tmp = path.with_name(f".{path.stem}-{os.getpid()}-{len(made)}-part{path.suffix}")
            _write(path, lambda write=write, tmp=tmp: write(tmp))
            made.append((tmp, path))
    except BaseException:
        for tmp, _ in made:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    for tmp, path in made:
        os.replace(tmp, path)


def _report(what: str, out, paths: list[Path], image=None) -> None:
    if image is not None and out.source is not None and out.source.size != image.size:
        (w, h), (sw, sh) = image.size, out.source.size
        _say(f"note: the {w}x{h} input was cropped or resized to {sw}x{sh}, a size this model takes")
    _say(f"{what}: {out.nfe} NFE, {out.seconds:.2f} s -> {', '.join(str(p) for p in paths)}")


def _check_input(args: argparse.Namespace) -> None:
    """The input path: '-' is not stdin here (the image is sized from its header before decoding)."""
    if args.image == "-" and not Path("-").exists():
        raise UsageError("image '-': reading the image from stdin is not supported; give its file path")


def _check_edit_text(args: argparse.Namespace) -> EditSettings:
    """Knobs, model and prompts, checked before any file is read."""
    settings = check_edit_options(args)
    check_model_options(args)
    for t in args.target:
        if not t.strip():
            raise UsageError("target prompt is empty; give the text the edit should match with -t")
    if not args.source.strip():
        raise UsageError("source prompt is empty; describe the source image with -s")
    if args.paste_pixels and not args.mask:
        raise UsageError("--paste-pixels needs --mask: the pixels outside the mask are pasted")
    return settings


def _numbered(path: Path, n: int) -> list[Path]:
    """One output per target: ``path`` itself, or NAME-0.ext, NAME-1.ext, ... (folders: NAME-0, ...)."""
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def cmd_edit(args: argparse.Namespace) -> None:
    from fireflow.video import is_video_path

    if is_video_path(args.image):
        return cmd_edit_video(args)
    _check_input(args)
    if args.max_frames is not None:
        raise UsageError(f"--max-frames is for a video input; {args.image!r} is an image")
    settings = _check_edit_text(args)
    out_path = _output(args.output or "edited.png", IMAGE_SUFFIXES)
    outs = (
        [out_path]
        if len(args.target) == 1
        else [out_path.with_name(f"{out_path.stem}-{i}{out_path.suffix}") for i in range(len(args.target))]
    )
    recon_path = None
    if args.save_reconstruction:
        recon_path = _output(args.save_reconstruction, IMAGE_SUFFIXES, "--save-reconstruction")
    auto = args.mask == "auto"  # the literal word: the mask is found from the model (fireflow.automask)
    mask_path = None
    if args.save_mask:
        if not args.mask:
            raise UsageError("--save-mask needs --mask (auto, or a file): it writes the mask the edit used")
        mask_path = _output(args.save_mask, (".png",), "--save-mask")
    named = [("-o", p) for p in outs] + ([("--save-reconstruction", recon_path)] if recon_path else [])
    named += [("--save-mask", mask_path)] if mask_path else []
    given_mask = [("--mask", Path(args.mask))] if args.mask and not auto else []
    _distinct([("the input image", Path(args.image))] + given_mask + named)
    image = load_image(args.image, args.max_pixels)  # fail on a bad image before loading a model
    if args.mask and not auto:
        from fireflow.masks import load_mask

        load_mask(args.mask, image.size)  # a bad mask fails before the model loads, too
    editor = load_editor(args)
    resolved = editor.resolve(settings)  # once: blocks against this model, before any work
    out = editor.edit(
        image,
        args.source,
        args.target,
        resolved,
        resize=args.resize,
        max_pixels=args.max_pixels,
        mask=args.mask,
        paste_pixels=args.paste_pixels,
        reconstruction=recon_path is not None,
        progress=not args.quiet,
    )
    results = out.images or [v[0] for v in out.videos]  # a video family edits a still as one frame
    writes = [(path, lambda tmp, img=img: save_image_atomic(img, tmp)) for img, path in zip(results, outs, strict=True)]
    if recon_path is not None:
        rec = out.reconstruction
        writes.append((recon_path, lambda tmp: save_image_atomic(rec[0] if isinstance(rec, list) else rec, tmp)))
        outs.append(recon_path)
    if mask_path is not None:  # at the model's size, white = edited (every frame's, for a clip)
        from PIL import Image

        mask_image = Image.fromarray(out.mask.any(axis=0).astype("uint8") * 255)
        writes.append((mask_path, lambda tmp: save_image_atomic(mask_image, tmp)))
        outs.append(mask_path)
    _write_all(writes)
    masked = (f", auto mask {100 * out.mask.mean():.0f}% of the image" if auto else ", masked") if args.mask else ""
    _report(
        f"edit ({out.settings.solver}, {out.settings.num_steps} steps, "
        f"{len(out.injections)} block calls injected{masked})",
        out,
        outs,
        image,
    )


def _video_output(path: str, flag: str = "-o", source: str | None = None) -> Path:
    """An mp4 or gif file, or a folder for PNG frames (no suffix), checked before any work.
    ``source``: the input, named in the refusal (a folder given as the image is read as frames)."""
    from fireflow.video import WRITE_SUFFIXES, output_kind

    kind = output_kind(path)
    if kind is None:
        what = "a folder, read as a video's frames" if source and Path(source).is_dir() else "a video"
        why = f"the input {source!r} is {what}; " if source else ""
        raise UsageError(
            f"{flag} {path!r}: {why}a video is written as {', '.join(WRITE_SUFFIXES)}, or as PNG frames in a folder "
            "(a path with no suffix)"
        )
    if kind != "folder":
        return _output(path, WRITE_SUFFIXES, flag)
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{flag} {path!r} exists and is not an empty folder; give a new folder for the frames")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {path!r}: {str(parent)!r} is not a folder")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: the folder {str(parent)!r} is not writable")
    return out


def _plan(editor, s, frames: int, size: tuple[int, int], fps: float, reconstruction: bool) -> str:
    """The line said before a video edit: frames, and the model calls it will make."""
    from fireflow.solvers import nfe

    per_pass = nfe(s.solver, s.num_steps)
    cfg = editor.adapter.guidance_kind == "cfg"
    passes = [("inversion", s.inversion_guidance), ("editing", s.guidance)]
    if reconstruction:
        passes.append(("reconstruction", s.inversion_guidance))
    calls = sum(per_pass * (2 if cfg and g > 1 else 1) for _, g in passes)
    evals = " + ".join(f"{name} {per_pass}" for name, _ in passes)
    w, h = size
    return (
        f"video: {frames} frames of {w}x{h} at {fps:g} fps; {len(passes) * per_pass} velocity evaluations "
        f"({evals}), {calls} model calls"
    )


def cmd_edit_video(args: argparse.Namespace) -> None:
    """``fireflow edit clip.mp4 ...``: read the clip (sized before decoding), edit it on a video
    family, write each result at the input's frame rate."""
    from fireflow.video import is_video_path, read_video, write_video

    settings = _check_edit_text(args)
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1, got {args.max_frames}")
    outs = _numbered(_video_output(args.output or "edited.mp4", source=args.image), len(args.target))
    recon_path = None
    if args.save_reconstruction:
        recon_path = _video_output(args.save_reconstruction, "--save-reconstruction", args.image)
    named = [("-o", p) for p in outs] + ([("--save-reconstruction", recon_path)] if recon_path else [])
    _distinct([("the input video", Path(args.image))] + ([("--mask", Path(args.mask))] if args.mask else []) + named)
    for p in outs if len(outs) > 1 else []:  # NAME-0, NAME-1, ...: each folder must be new or empty
        _video_output(str(p) + (os.sep if not p.suffix else ""))
    frames, fps = read_video(args.image, max_frames=args.max_frames, max_pixels=args.max_pixels)
    mask = None
    if args.mask:
        from fireflow.masks import load_mask

        if is_video_path(args.mask):  # one mask per frame
            mask = read_video(args.mask, max_frames=len(frames), max_pixels=args.max_pixels, name="the mask video")[0]
            if len(mask) != len(frames):
                raise UsageError(f"the mask video has {len(mask)} frames, the clip {len(frames)}; give one per frame")
        else:  # one still mask for every frame
            mask = args.mask
        for m in mask if isinstance(mask, list) else [mask]:
            load_mask(m, frames[0].size)  # a bad mask fails before the model loads
    editor = load_editor(args)
    a = editor.adapter
    if not a.video:
        raise UsageError(f"{a.name} edits images; a video needs a video family (Wan; README: Video)")
    n = a.prepare_frames(len(frames))  # Wan: 4k + 1 frames, else refused naming the counts it takes
    if n < len(frames):
        _say(f"note: {a.name} edits the first {n} of the {len(frames)} frames")
        frames = frames[:n]
        mask = mask[:n] if isinstance(mask, list) else mask
    resolved = editor.resolve(settings)  # once: blocks against this model, before any work
    size = a.prepare_image(frames[0], args.resize).size
    _say(_plan(editor, resolved, n, size, fps, recon_path is not None))
    out = editor.edit(
        frames,
        args.source,
        args.target,
        resolved,
        resize=args.resize,
        max_pixels=args.max_pixels,
        mask=mask,
        paste_pixels=args.paste_pixels,
        reconstruction=recon_path is not None,
        progress=not args.quiet,
    )
    writes = [
        (path, lambda tmp, clip=clip: write_video(clip, tmp, fps)) for clip, path in zip(out.videos, outs, strict=True)
    ]
    if recon_path is not None:
        writes.append((recon_path, lambda tmp: write_video(out.reconstruction, tmp, fps)))
        outs.append(recon_path)
    _write_all(writes)
    if size != frames[0].size:
        (w, h), (sw, sh) = frames[0].size, size
        _say(f"note: the {w}x{h} frames were cropped or resized to {sw}x{sh}, a size this model takes")
    masked = ", masked" if args.mask else ""
    _report(
        f"edit video ({out.settings.solver}, {out.settings.num_steps} steps, {len(out.videos[0])} frames, "
        f"{out.transformer_calls} model calls, {len(out.injections)} block calls injected{masked})",
        out,
        outs,
    )


def _pass(args: argparse.Namespace):
    """Checked settings, a checked model and the loaded image for ``reconstruct`` and ``invert``."""
    _check_input(args)
    if not args.prompt.strip():
        raise UsageError("prompt is empty; describe the image with -p")
    settings = check_edit_options(args)
    check_model_options(args)
    return settings, load_image(args.image, args.max_pixels)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    out_path = _output(args.output, IMAGE_SUFFIXES)
    _distinct([("the input image", Path(args.image)), ("-o", out_path)])
    settings, image = _pass(args)
    editor = load_editor(args)
    s = editor.resolve(settings, "reconstruct")
    run = dict(resize=args.resize, max_pixels=args.max_pixels, progress=not args.quiet)
    out = editor.reconstruct(image, args.prompt, s, **run)
    _write(out_path, lambda: save_image_atomic(out.image, out_path))
    _report(f"reconstruct ({s.solver}, {s.num_steps} steps)", out, [out_path], image)


def cmd_invert(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save

    out_path = _output(args.output, (".safetensors",))
    _distinct([("the input image", Path(args.image)), ("-o", out_path)])
    settings, image = _pass(args)
    editor = load_editor(args)
    s = editor.resolve(settings, "invert")
    run = dict(resize=args.resize, max_pixels=args.max_pixels, progress=not args.quiet)
    out = editor.invert(image, args.prompt, s, **run)
    meta = {k: str(getattr(s, k)) for k in ("num_steps", "inversion_guidance", "solver")}
    meta.update(prompt=args.prompt, height=str(out.source.height), width=str(out.source.width))
    tensors = {"latents": out.latents.detach().to("cpu", torch.float32).contiguous()}
    _write(out_path, lambda: atomic_write(out_path, lambda f: f.write(save(tensors, metadata=meta))))
    _report(f"invert ({s.solver}, {s.num_steps} steps)", out, [out_path])


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise UsageError("prompt is empty")
    settings = check_edit_options(args)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive number of pixels, got {value}")
    given = {flag: v for flag, v in (("--height", args.height), ("--width", args.width)) if v is not None}
    _check_size(given, args.max_pixels)  # a side not given is the model's: checked again once it is known
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")
    check_model_options(args)
    out_path = _output(args.output, IMAGE_SUFFIXES)
    editor = load_editor(args)
    g = editor.adapter.default_geometry(args.height, args.width)
    _check_size({"--height": g.height, "--width": g.width}, args.max_pixels)  # before the schedule (overflows)
    try:
        editor.adapter.check_geometry(g)
    except ValueError as e:
        raise UsageError(str(e).replace("height ", "--height ", 1).replace("width ", "--width ", 1)) from None
    s = editor.resolve(settings, "generate")
    out = editor.generate(
        args.prompt,
        s,
        height=g.height,
        width=g.width,
        seed=args.seed,
        max_pixels=args.max_pixels,
        progress=not args.quiet,
    )
    _write(out_path, lambda: save_image_atomic(out.images[0], out_path))
    _report(f"generate ({s.solver}, {s.num_steps} steps)", out, [out_path])


def _check_size(sides: dict[str, int], limit: int) -> None:
    """``generate``'s size against ``--max-pixels``: ``sides`` maps --height/--width to pixels."""
    pixels = math.prod(sides.values())
    if pixels > limit:
        named = " ".join(f"{flag} {v}" for flag, v in sides.items())
        raise UsageError(f"{named}: {pixels} pixels, more than the limit of {limit} (--max-pixels); use a smaller size")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fireflow", description="FireFlow image editing with rectified flows")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("edit", help="edit an image or a video from a source prompt to a target prompt")
    _add_image_options(p, video=True)
    p.add_argument(
        "--max-frames", type=int, default=None, metavar="N", help="video: keep the first N frames (Wan: 4k + 1)"
    )
    p.add_argument("-s", "--source", required=True, help="prompt describing the source image")
    p.add_argument("-t", "--target", required=True, action="append", help="target prompt (repeat for several)")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output image (default edited.png), or for a video .mp4, .gif or a folder for PNG frames "
        "(default edited.mp4); several targets: NAME-0.png, ...",
    )
    p.add_argument("--save-reconstruction", metavar="PATH", help="also save the source prompt's reconstruction")
    p.add_argument(
        "--mask",
        metavar="FILE|auto",
        help="edit only where this image is white (any size); keep the rest. 'auto': find the region from "
        "the model (the prompts' velocity difference; 4 more model calls; --mask-threshold, --mask-dilation)",
    )
    p.add_argument("--save-mask", metavar="PATH", help="with --mask: save the mask used (PNG, the model's size)")
    p.add_argument(
        "--paste-pixels", action="store_true", help="with --mask: paste the source pixels outside it after decoding"
    )
    add_edit_options(p)
    add_model_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_edit)

    for name, func, helptext, default_out in (
        ("reconstruct", cmd_reconstruct, "invert and sample back with the same prompt", "reconstruction.png"),
        ("invert", cmd_invert, "invert an image to noise latents (.safetensors)", "latents.safetensors"),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_image_options(p)
        p.add_argument("-p", "--prompt", required=True, help="prompt describing the image")
        p.add_argument("-o", "--output", default=default_out)
        knobs.add_verb_arguments(p, name)
        add_model_options(p)
        _add_run_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("generate", help="text-to-image with any solver")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-o", "--output", default="generated.png")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="a whole number from 0 to 2**63 - 1 (default 0)")
    add_max_pixels(p, "sizes")
    knobs.add_verb_arguments(p, "generate")
    add_model_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_generate)

    for module in EXTRA_COMMANDS:
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:  # the front end exists but a dependency of it is missing
                raise
    return parser


#: A value that starts like a negative number ("-1,1,1", "-1e6", "-inf"), which argparse would
#: take for an option after a flag: only plain negative numbers ("-1", "-.5") reach the flag.
_NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--ratios -1,1,1`` as ``--ratios=-1,1,1``, so that the value reaches its check and is refused
    for what it is (a negative ratio) rather than as a missing argument."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":  # what follows is positional
            return out + argv[i:]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def _argv_text(text: str) -> str:
    """A prompt from the command line as text. In an ASCII locale Python keeps the bytes it cannot
    decode as lone surrogates (PEP 383), which a tokenizer refuses; such bytes are UTF-8 in practice."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "replace")
    return text


def _silence_stdout() -> None:
    """After stdout failed: point it at the null device, so that the interpreter's flush at exit
    does not print a second error ("Exception ignored ...") for what is already said."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in a test)
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    from fireflow.models import ModelLoadError, ModelNotFoundError

    for name in ("source", "prompt"):
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, _argv_text(getattr(args, name)))
    if isinstance(getattr(args, "target", None), list):
        args.target = [_argv_text(t) for t in args.target]
    try:
        args.func(args)
        if sys.stdout is not None:
            try:
                sys.stdout.flush()
            except OSError as e:
                raise StdoutError(f"cannot write to stdout: {e.strerror or e}") from None
    except WriteError as e:
        if isinstance(e, StdoutError):
            _silence_stdout()
        print(f"fireflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except SettingError as e:
        print(f"fireflow {args.command}: error: {e.worded('flag')}", file=sys.stderr)
        return 2
    except (UsageError, ImageError, ModelNotFoundError, ModelLoadError, ValueError) as e:
        print(f"fireflow {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fireflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
