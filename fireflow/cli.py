"""The ``fireflow`` command: edit, invert, reconstruct, generate, plus the bench/eval/serve front ends.

Every subcommand is a thin layer over :class:`fireflow.FireFlowEditor`. Bad input ends with one
line on stderr, exit status 2, and no output file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from fireflow import solvers
from fireflow._io import atomic_write
from fireflow.features import STRATEGIES, parse_strategy
from fireflow.image import MAX_PIXELS, ImageError, load_image, save_image_atomic

#: Front ends living in other modules; each has ``add_parser(subparsers)`` registering ``func``.
EXTRA_COMMANDS = ("fireflow.bench.cli", "fireflow.web")


class UsageError(ValueError):
    """Bad command-line input, found before any work is done."""


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; accepted: WIDTHxHEIGHT, e.g. 512x512")
    return int(w), int(h)


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        q, k, v = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad ratios {text!r}; accepted: three numbers Q,K,V like 1,1,1") from None
    return q, k, v


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Where the model comes from and where it runs; shared by every front end."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="demo", help="'demo' (bundled, default), a FLUX folder, or a Hub id in the cache")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: cuda if present)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument(
        "--offload", default=None, choices=["model", "group", "sequential"], help="CPU offload for small cards"
    )
    g.add_argument("--compile", action="store_true", help="regional torch.compile of the repeated blocks (GPU)")
    g.add_argument("--attention-backend", default=None, help="a diffusers attention backend, e.g. _native_cudnn, flash")


def add_edit_options(p: argparse.ArgumentParser) -> None:
    """The method's knobs, defaulting to the paper's PIE-Bench setting (METHOD.md §5)."""
    g = p.add_argument_group("editing (defaults: the paper's)")
    g.add_argument("--steps", type=int, default=8, help="steps per pass (default 8: 18 NFE per edit)")
    g.add_argument("--inject", type=int, default=1, help="denoising steps that reuse inversion features (default 1)")
    g.add_argument("--guidance", type=float, default=2.0, help="FLUX guidance while editing (default 2)")
    g.add_argument("--inversion-guidance", type=float, default=1.0, help="guidance while inverting (default 1)")
    g.add_argument("--solver", default="fireflow", choices=list(solvers.SOLVERS), help="default fireflow")
    g.add_argument("--strategy", default="replace_v", help=f"space-separated mix of {', '.join(STRATEGIES)}")
    g.add_argument("--blocks", default="all", help="single-stream blocks to reuse in: all, 0-37, 20..37, 0,5,9")
    g.add_argument("--double-blocks", default=None, help="double-stream blocks too (an extension; default none)")
    g.add_argument("--ratios", type=_ratios, default=(1.0, 1.0, 1.0), help="scale of stored Q,K,V (default 1,1,1)")
    g.add_argument("--feature-device", default=None, help="where stored features live (default: model device)")


def check_edit_options(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded."""
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.inject <= args.steps:
        raise UsageError(f"--inject must be between 0 and --steps={args.steps}, got {args.inject}")
    parse_strategy(args.strategy)
    from fireflow.editor import parse_blocks

    parse_blocks(args.blocks)
    parse_blocks(args.double_blocks)


def edit_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        num_steps=args.steps,
        inject=args.inject,
        guidance=args.guidance,
        inversion_guidance=args.inversion_guidance,
        solver=args.solver,
        strategy=args.strategy,
        blocks=args.blocks,
        double_blocks=args.double_blocks,
        ratios=args.ratios,
        feature_device=args.feature_device,
    )


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="source image (any format Pillow reads)")
    p.add_argument("--resize", type=_size, default=None, help="resize to WIDTHxHEIGHT first (default: crop to /16)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"refuse larger images (default {MAX_PIXELS})")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _output(path: str, suffixes: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"output {path!r} must end in one of {', '.join(suffixes)}")
    if out.parent != Path("") and out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"output folder {str(out.parent)!r} is not a folder")
    return out


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
    if editor.model_name == "demo" and editor.adapter.device.type == "cpu":
        import torch

        # The demo model's matrices are tiny: one thread beats several, and by 10x on a busy machine.
        torch.set_num_threads(1)
    if args.compile or args.attention_backend:
        editor.adapter.optimize(compile=args.compile, attention_backend=args.attention_backend)
    return editor


def _report(what: str, out, paths: list[Path], image=None) -> None:
    if image is not None and out.source is not None and out.source.size != image.size:
        (w, h), (sw, sh) = image.size, out.source.size
        print(f"note: the {w}x{h} input was cropped or resized to {sw}x{sh}, a size this model takes")
    print(f"{what}: {out.nfe} NFE, {out.seconds:.2f} s -> {', '.join(str(p) for p in paths)}")


def cmd_edit(args: argparse.Namespace) -> None:
    check_edit_options(args)
    for t in args.target:
        if not t.strip():
            raise UsageError("target prompt is empty; give the text the edit should match with -t")
    if not args.source.strip():
        raise UsageError("source prompt is empty; describe the source image with -s")
    out_path = _output(args.output, IMAGE_SUFFIXES)
    outs = (
        [out_path]
        if len(args.target) == 1
        else [out_path.with_name(f"{out_path.stem}-{i}{out_path.suffix}") for i in range(len(args.target))]
    )
    recon_path = _output(args.save_reconstruction, IMAGE_SUFFIXES) if args.save_reconstruction else None
    image = load_image(args.image, args.max_pixels)  # fail on a bad image before loading a model
    editor = load_editor(args)
    out = editor.edit(
        image,
        args.source,
        args.target,
        resize=args.resize,
        max_pixels=args.max_pixels,
        reconstruction=recon_path is not None,
        progress=not args.quiet,
        **edit_kwargs(args),
    )
    for img, path in zip(out.images, outs, strict=True):
        save_image_atomic(img, path)
    if recon_path is not None:
        save_image_atomic(out.reconstruction, recon_path)
        outs.append(recon_path)
    _report(
        f"edit ({out.settings['solver']}, {args.steps} steps, {len(out.injections)} block calls injected)",
        out,
        outs,
        image,
    )


def _pass_kwargs(args: argparse.Namespace) -> dict:
    """The options ``reconstruct`` and ``invert`` share."""
    return dict(
        num_steps=args.steps,
        guidance=args.guidance,
        solver=args.solver,
        resize=args.resize,
        max_pixels=args.max_pixels,
        progress=not args.quiet,
    )


def cmd_reconstruct(args: argparse.Namespace) -> None:
    out_path = _output(args.output, IMAGE_SUFFIXES)
    image = load_image(args.image, args.max_pixels)
    out = load_editor(args).reconstruct(image, args.prompt, **_pass_kwargs(args))
    save_image_atomic(out.image, out_path)
    _report(f"reconstruct ({args.solver}, {args.steps} steps)", out, [out_path], image)


def cmd_invert(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save

    out_path = _output(args.output, (".safetensors",))
    image = load_image(args.image, args.max_pixels)
    out = load_editor(args).invert(image, args.prompt, **_pass_kwargs(args))
    meta = {k: str(v) for k, v in out.settings.items()}
    meta.update(prompt=args.prompt, height=str(out.source.height), width=str(out.source.width))
    tensors = {"latents": out.latents.detach().to("cpu", torch.float32).contiguous()}
    atomic_write(out_path, lambda f: f.write(save(tensors, metadata=meta)))
    _report(f"invert ({args.solver}, {args.steps} steps)", out, [out_path])


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise UsageError("prompt is empty")
    out_path = _output(args.output, IMAGE_SUFFIXES)
    out = load_editor(args).generate(
        args.prompt,
        height=args.height,
        width=args.width,
        num_steps=args.steps,
        guidance=args.guidance,
        solver=args.solver,
        seed=args.seed,
        progress=not args.quiet,
    )
    save_image_atomic(out.image, out_path)
    _report(f"generate ({args.solver}, {args.steps} steps)", out, [out_path])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fireflow", description="FireFlow image editing with rectified flows")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("edit", help="edit an image from a source prompt to a target prompt")
    _add_image_options(p)
    p.add_argument("-s", "--source", required=True, help="prompt describing the source image")
    p.add_argument("-t", "--target", required=True, action="append", help="target prompt (repeat for several)")
    p.add_argument("-o", "--output", default="edited.png", help="output image (several targets: NAME-0.png, ...)")
    p.add_argument("--save-reconstruction", metavar="PATH", help="also save the source prompt's reconstruction")
    add_edit_options(p)
    add_model_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_edit)

    for name, func, helptext, default_out, guidance in (
        (
            "reconstruct",
            cmd_reconstruct,
            "invert and sample back with the same prompt",
            "reconstruction.png",
            1.0,
        ),
        ("invert", cmd_invert, "invert an image to noise latents (.safetensors)", "latents.safetensors", 1.0),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_image_options(p)
        p.add_argument("-p", "--prompt", required=True, help="prompt describing the image")
        p.add_argument("-o", "--output", default=default_out)
        _add_solver_options(p, guidance)
        add_model_options(p)
        _add_run_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("generate", help="text-to-image with any solver")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-o", "--output", default="generated.png")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    _add_solver_options(p, 3.5)
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


def _add_solver_options(p: argparse.ArgumentParser, guidance: float) -> None:
    p.add_argument("--steps", type=int, default=8, help="steps (default 8)")
    p.add_argument("--solver", default="fireflow", choices=list(solvers.SOLVERS), help="default fireflow")
    p.add_argument("--guidance", type=float, default=guidance, help=f"FLUX guidance (default {guidance:g})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fireflow.models.flux import ModelNotFoundError

    try:
        args.func(args)
    except (UsageError, ImageError, ModelNotFoundError, ValueError) as e:
        print(f"fireflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fireflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
