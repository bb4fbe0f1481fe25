"""Tiny random pipelines of every model family, built locally with no network, for tests and
smoke runs. Each family folder contributes its variants through its own ``tiny`` module::

    fireflow edit photo.jpg -s "a cat" -t "a dog" --model "$(python -m fireflow.testing flux /tmp/tiny)"
    python -m fireflow.testing --list
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fireflow.models import family_parts


def variants() -> dict[str, Callable[..., Path]]:
    """Tiny-model variant name -> writer ``(path, variant, seed) -> path``, over all families."""
    out: dict[str, Callable[..., Path]] = {}
    for module in family_parts("tiny"):
        out.update(module.VARIANTS)
    return out


def save_tiny(variant: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random pipeline ``variant`` (see :func:`variants`) to ``path``."""
    table = variants()
    if variant not in table:
        raise ValueError(f"unknown tiny model {variant!r}; accepted: {', '.join(table)}")
    return table[variant](path, variant, seed)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("--list", "-h", "--help"):
        print("usage: python -m fireflow.testing VARIANT [FOLDER]; variants: " + ", ".join(variants()))
        sys.exit(0 if args else 2)
    print(save_tiny(args[0], args[1] if len(args) > 1 else tempfile.mkdtemp(prefix=f"tiny-{args[0]}-")))
