"""The benchmarks' only contact with the editor: options, loading, and one edit / reconstruction call."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from PIL import Image

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class EditSettings:
    """What every image of a PIE-Bench run shares (METHOD.md section 5: the paper's setting)."""

    num_steps: int = 8
    inject: int = 1
    guidance: float = 2.0
    inversion_guidance: float = 1.0
    solver: str = "fireflow"
    strategy: str = "replace_v"
    blocks: str | None = None  # None: the editor's default (single blocks 0..37)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    image: Image.Image
    nfe: int
    seconds: float
    source: Image.Image | None = None  # the editor's prepared source (cropped / resized)


class EditFn(Protocol):
    def __call__(self, image: Image.Image, source_prompt: str, target_prompt: str) -> Outcome: ...


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"'demo', a local folder or a hub id (default {DEFAULT_MODEL})"
    )
    g.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="model dtype")
    g.add_argument("--offload", action="store_true", help="CPU offload (less GPU memory, slower)")


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    d = EditSettings()
    g = p.add_argument_group("editing (defaults: the paper's PIE-Bench setting)")
    g.add_argument("--num-steps", type=int, default=d.num_steps)
    g.add_argument("--inject", type=int, default=d.inject, help="denoising steps with feature injection")
    g.add_argument("--guidance", type=float, default=d.guidance, help="denoising guidance")
    g.add_argument("--inversion-guidance", type=float, default=d.inversion_guidance)
    g.add_argument("--solver", default=d.solver, help="fireflow | midpoint | euler")
    g.add_argument("--strategy", default=d.strategy, help="replace_v, add_v, replace_k ... (space-separated)")
    g.add_argument("--blocks", default=d.blocks, help="single-stream blocks to inject, e.g. 0-37 or 20-37")


def settings_from_args(args: argparse.Namespace) -> EditSettings:
    s = EditSettings(
        num_steps=args.num_steps,
        inject=args.inject,
        guidance=args.guidance,
        inversion_guidance=args.inversion_guidance,
        solver=args.solver,
        strategy=args.strategy,
        blocks=args.blocks,
    )
    if s.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {s.num_steps}")
    if not 0 <= s.inject <= s.num_steps:
        raise ValueError(f"--inject must be between 0 and --num-steps ({s.num_steps}), got {s.inject}")
    return s


def default_device(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def load_editor(args: argparse.Namespace, local_rank: int = 0):
    """``FireFlowEditor.from_pretrained`` with the CLI's model options."""
    from fireflow import FireFlowEditor

    kwargs: dict[str, Any] = {"device": args.device or default_device(local_rank)}
    if args.dtype:
        kwargs["torch_dtype"] = getattr(torch, args.dtype)
    if args.offload:
        kwargs["offload"] = True
    return FireFlowEditor.from_pretrained(args.model, **kwargs)


def parse_blocks(spec: str | None) -> list[int] | None:
    """``"0-37"`` / ``"20-37,5"`` to a sorted list of ints; None stays None (the editor's default)."""
    if spec is None:
        return None
    out: set[int] = set()
    try:
        for part in spec.replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(
            f"--blocks {spec!r} is not a list of indices or ranges like 0-37 or 20-37,5"
        ) from None
    return sorted(out)


def edit_fn(editor, settings: EditSettings) -> EditFn:
    """One PIE-Bench edit: invert with the source prompt, sample with the target prompt."""

    def run(image: Image.Image, source_prompt: str, target_prompt: str) -> Outcome:
        out = editor.edit(
            image,
            source_prompt,
            target_prompt,
            num_steps=settings.num_steps,
            inject=settings.inject,
            guidance=settings.guidance,
            inversion_guidance=settings.inversion_guidance,
            solver=settings.solver,
            strategy=settings.strategy,
            blocks=parse_blocks(settings.blocks),
        )
        return Outcome(out.image, int(out.nfe), float(out.seconds), getattr(out, "source", None))

    return run


def model_name(editor, fallback: str) -> str:
    return str(getattr(editor, "model_name", None) or fallback)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and ``accelerate launch`` export them."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local
