"""Released checkpoints' shapes, so that a benchmark can build them with random weights.

Each family folder may hold a ``released`` module with ``RELEASED``: name -> :class:`Released`.
Speed and memory do not depend on the weights' values, so a transformer built from its released
``config.json`` values and fed conditioning of the released pipeline's shapes costs what the real
one costs; nothing is downloaded. ``fireflow.bench.families`` gathers them over every family
(``fireflow.models.family_parts("released")``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``(config, batch, text_len, generator, device, dtype) -> {name: tensor}``: the conditioning one
#: prompt (``batch`` rows) gets, under the family's ``embed_names``.
EmbedsFn = Callable[[dict, int, int, torch.Generator, torch.device, torch.dtype], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Released:
    """One released checkpoint, as its transformer's constructor sees it."""

    repo: str  # the Hub id users load
    transformer: str  # the diffusers transformer class
    config: dict  # constructor kwargs, from the checkpoint's transformer/config.json
    tiny: dict  # the same class at toy size (the family's tiny test model), for dry runs on a CPU
    embeds: EmbedsFn
    text_len: int  # text tokens per prompt the pipeline passes (its padded length, or a typical one)
    height: int = 1024
    width: int = 1024
    num_frames: int | None = None  # videos only
    note: str = ""  # what the shapes leave out (a second expert, a variable text length)


def text(config: dict, key: str, batch: int, text_len: int, g: torch.Generator, device, dtype) -> torch.Tensor:
    """Random text hidden states ``[batch, text_len, config[key]]`` at the scale encoders give."""
    return torch.randn(batch, text_len, config[key], generator=g, device=device).to(dtype)


def with_negative(embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same conditioning again under ``negative_`` names (the CFG families' empty prompt)."""
    return {**embeds, **{f"negative_{k}": v.clone() for k, v in embeds.items()}}


def prompt_and_negative(width_key: str) -> EmbedsFn:
    """The conditioning of a CFG family that takes text hidden states alone (no pooled embedding, no
    mask needed for one prompt), ``config[width_key]`` wide, and the negative prompt's."""

    def embeds(config: dict, batch: int, text_len: int, g: torch.Generator, device, dtype) -> dict[str, torch.Tensor]:
        return with_negative({"prompt_embeds": text(config, width_key, batch, text_len, g, device, dtype)})

    return embeds
