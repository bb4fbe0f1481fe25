"""The wheel holds the library only: no training, studies or logs (they stay in ``research/``), and
every file a user needs: the bundled weights with their model cards and the demo benchmark set.

``.ci/wheel-smoke.sh`` runs the CLI from such a wheel, installed outside the checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What the build reads: copied, so that no stale build/ of the checkout leaks into the wheel.
SOURCES = ("pyproject.toml", "README.md", "fireflow", "research", "tests", "scripts", "examples")
SKIP = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")


def _isolation() -> list[str]:
    """Offline, with this environment's setuptools when it is new enough (pyproject asks >= 77); else pip
    fetches one into an isolated build environment."""
    try:
        import setuptools
    except ImportError:
        return []
    return ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=SKIP)
        elif path.is_file():
            shutil.copy2(path, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation(), "-q", "-w", str(dist), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("fireflow-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_holds_no_training_studies_or_logs(wheel_names):
    packaged = [n for n in wheel_names if ".dist-info/" not in n]
    assert packaged and all(n.startswith("fireflow/") for n in packaged), "only the fireflow package is installed"
    stems = {Path(n).stem for n in packaged}
    for study in ("train", "quality", "scenes_eval", "scenes_masks", "t2i", "frontends", "emoji"):
        assert study not in stems, f"{study} belongs in research/, not in the wheel"
    assert "fireflow/bench/solvers.py" not in packaged
    for log in ("log.jsonl", "probes.jsonl", "training_curve.png", "quality.json"):
        assert not any(n.endswith("/" + log) for n in packaged), log
    assert not any(n.endswith(".npz") for n in packaged), "the sprite data only trains and studies the models"
    assert not any("/demo/" in n and not n.startswith("fireflow/models/demo/") for n in packaged)


def test_wheel_holds_weights_model_cards_and_the_demo_set(wheel_names):
    names = set(wheel_names)
    for model in ("weights", "scenes_weights", "scenes_video_weights"):
        for f in ("README.md", "config.json", "diffusion_pytorch_model.safetensors"):
            assert f"fireflow/models/demo/{model}/{f}" in names
    assert "fireflow/bench/scenes_pie/mapping_file.json" in names
    assert "fireflow/bench/scenes_pie/manifest.jsonl" in names  # `fireflow batch scenes`
    images = [n for n in names if n.startswith("fireflow/bench/scenes_pie/annotation_images/") and n.endswith(".png")]
    assert len(images) == 140
    for module in (
        "cli",
        "batch",
        "bench/batch_speed",
        "web/server",
        "web/page",
        "bench/pie",
        "bench/reconstruct",
        "bench/speed",
        "metrics",
    ):
        assert f"fireflow/{module}.py" in names
