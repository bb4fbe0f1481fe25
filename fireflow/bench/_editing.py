"""The benchmarks' only contact with the editor: loading it and one edit call per image.

The editing and model options are the ``fireflow edit`` ones (``fireflow.settings``), so a benchmark
run and a single edit take the same flags with the same defaults (the paper's PIE-Bench setting).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image


@dataclass
class Outcome:
    image: Image.Image
    nfe: int
    seconds: float


class EditFn(Protocol):
    def __call__(self, image: Image.Image, source_prompt: str, target_prompt: str, mask: Any = None) -> Outcome: ...


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs that change the edits (checked as ``fireflow edit`` checks them), JSON-ready.
    ``feature_device`` is left out: it moves memory, not results. Unset knobs stay ``None``
    (the model family's default), block specs stay as written."""
    from fireflow.settings import settings_from_args as checked

    s = checked(args)
    kw = s.as_kwargs()
    kw.pop("feature_device", None)
    kw["blocks"] = args.blocks or "default"
    kw["ratios"] = list(s.ratios)
    return kw


def default_device(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def load_editor(args: argparse.Namespace, local_rank: int = 0):
    """The CLI's editor with the model options, on one GPU per process."""
    from fireflow.cli import load_editor as cli_load_editor

    device = args.device or default_device(local_rank)
    if device == "cuda":  # one GPU per process under torchrun / accelerate, not all on cuda:0
        device = f"cuda:{local_rank}"
    return cli_load_editor(args, device)


def edit_fn(editor, settings: dict[str, Any], feature_device: str | None = None) -> EditFn:
    """One PIE-Bench edit: invert with the source prompt, sample with the target prompt. With
    ``settings["mask"]`` the item's ground-truth mask is passed (and the pixels pasted when
    ``settings["paste_pixels"]``)."""
    knobs = {k: v for k, v in settings.items() if k not in ("mask", "paste_pixels")}
    paste = bool(settings.get("paste_pixels"))

    def run(image: Image.Image, source_prompt: str, target_prompt: str, mask: Any = None) -> Outcome:
        out = editor.edit(
            image,
            source_prompt,
            target_prompt,
            feature_device=feature_device,
            mask=mask,
            paste_pixels=paste and mask is not None,
            **knobs,
        )
        return Outcome(out.image, int(out.nfe), float(out.seconds))

    return run


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and ``accelerate launch`` export them."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers when set") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local
