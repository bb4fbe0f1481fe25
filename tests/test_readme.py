"""Every Python block of the README runs as written (so the README cannot drift from the API).

Hub ids are served by tiny random folders of the same family, placed under those ids in a temporary
Hugging Face cache (offline); ``"cuda"`` becomes ``"cpu"`` on a machine without CUDA. Each block runs
in its own interpreter, in a folder holding the ``photo.jpg``, ``cat_region.png`` and ``clip.mp4`` it names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fireflow.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
#: Hub id -> the tiny variant of the same family that stands in for it.
HUB_IDS = {
    "black-forest-labs/FLUX.1-dev": "flux",
    "black-forest-labs/FLUX.2-klein-base-9B": "flux2-klein",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan2.1",
}
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache with a tiny folder under each Hub id the README names."""
    cache = tmp_path_factory.mktemp("hf-cache")
    commit = "0" * 40
    for repo, variant in HUB_IDS.items():
        folder = cache / ("models--" + repo.replace("/", "--"))
        save_tiny(variant, folder / "snapshots" / commit)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    # A small photo keeps the tiny models' passes short (the blocks' sizes are what the API takes).
    Image.open(ROOT / "tests" / "data" / "boy.jpg").convert("RGB").resize((160, 128)).save(d / "photo.jpg")
    w, h = Image.open(d / "photo.jpg").size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(mask).save(d / "cat_region.png")
    from fireflow.video import write_video  # the README's Video block: a 9-frame clip (Wan: 4k + 1)

    rng = np.random.default_rng(0)
    write_video(
        [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(9)], d / "clip.mp4", 8
    )
    return d


def test_the_readme_has_python_blocks_and_names_only_mapped_hub_ids():
    blocks = python_blocks()
    assert len(blocks) >= 5
    named = set(re.findall(r'from_pretrained\("([^"]+/[^"]+)"', "\n".join(blocks)))
    assert named and named <= set(HUB_IDS), named - set(HUB_IDS)


RUNNER = """
import sys, traceback
blocks = sys.stdin.read().split("\\n#--- next block ---\\n")
failed = []
for i, code in enumerate(blocks):
    try:
        exec(compile(code, f"README block {i}", "exec"), {"__name__": "__main__"})
    except Exception:
        failed.append(i)
        print(f"README block {i} failed:\\n{code}\\n{traceback.format_exc()}", file=sys.stderr)
print("ran", len(blocks), "failed", failed)
sys.exit(1 if failed else 0)
"""


def test_readme_python_blocks_run(hub_cache, workdir):
    """All blocks in one interpreter (imports paid once), each in a namespace of its own."""
    blocks = python_blocks()
    if not torch.cuda.is_available():
        blocks = [b.replace('"cuda"', '"cpu"') for b in blocks]
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    stdin = "\n#--- next block ---\n".join(blocks)
    run = subprocess.run(
        [sys.executable, "-c", RUNNER], input=stdin, cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"ran {len(blocks)} failed []" in run.stdout
