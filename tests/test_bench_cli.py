"""The benchmark commands as users run them: subprocesses, torchrun sharding, a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fireflow.bench import pie
from fireflow.bench.synthetic import make_synthetic_pie

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_pie(tmp_path_factory.mktemp("pie"), per_type=2, size=64, types=["0", "1", "2", "6"])


def _bench(data: Path, out: Path, tiny_flux_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fireflow",
        "bench",
        "pie",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        str(tiny_flux_dir),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--steps",
        "2",
        "-q",
        *extra,
    ]


def _stable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("seconds", "rank", "world_size", "run_id")}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / pie.MERGED).read_text().splitlines()]


def test_cli_bench_and_eval_end_to_end(data, tmp_path, tiny_flux_dir):
    subprocess.run(_bench(data, tmp_path, tiny_flux_dir), check=True, env=_env(), timeout=600)
    assert len(_records(tmp_path)) == 8
    r = subprocess.run(
        [sys.executable, "-m", "fireflow", "eval", "pie", "--data", str(data), "--edits", str(tmp_path), "-q"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "overall" in r.stdout and "skipped" in r.stderr  # no DINO/CLIP weights here: said, not fatal
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    assert summary["overall"]["n"] == 8 and summary["model"] == str(tiny_flux_dir)


def test_bad_input_is_one_line_and_no_output(data, tmp_path, tiny_flux_dir):
    r = subprocess.run(
        _bench(data, tmp_path / "o", tiny_flux_dir, "--types", "12"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "'12' is not an editing type" in r.stderr
    assert not (tmp_path / "o").exists()
    r = subprocess.run(
        _bench(tmp_path / "nodata", tmp_path / "o", tiny_flux_dir),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "no mapping_file.json" in r.stderr and not (tmp_path / "o").exists()


def test_torchrun_two_processes_equal_one(data, tmp_path, tiny_flux_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_bench(data, one, tiny_flux_dir), check=True, env=_env(), timeout=600)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fireflow",
        *_bench(data, two, tiny_flux_dir)[3:],
    ]
    subprocess.run(cmd, check=True, env=_env(), timeout=600)
    a, b = _records(one), _records(two)
    assert len(a) == 8 and [_stable(r) for r in a] == [_stable(r) for r in b]
    assert sorted(r["rank"] for r in b) == [0] * 4 + [1] * 4 and {r["world_size"] for r in b} == {2}
    for r in a:
        x = (one / "annotation_images" / r["image_path"]).read_bytes()
        assert x == (two / "annotation_images" / r["image_path"]).read_bytes(), r["image_path"]


def test_killed_run_resumes_with_every_image_done_once(data, tmp_path, tiny_flux_dir):
    proc = subprocess.Popen(
        _bench(data, tmp_path, tiny_flux_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    records = tmp_path / pie.RECORDS_DIR
    deadline = time.time() + 300
    while time.time() < deadline and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}
    assert 3 <= len(first) < 8, "the run should die part-way"
    assert not (tmp_path / pie.MERGED).exists()
    subprocess.run(_bench(data, tmp_path, tiny_flux_dir), check=True, env=_env(), timeout=600)
    final = _records(tmp_path)
    assert sorted(r["id"] for r in final) == sorted(json.loads((data / "mapping_file.json").read_text()))
    by_id = {r["id"]: r for r in final}
    for key, rec in first.items():
        assert by_id[key]["run_id"] == rec["run_id"]  # done before the kill: not redone
    assert len({r["run_id"] for r in final}) == 2
    for r in final:
        with Image.open(tmp_path / "annotation_images" / r["image_path"]) as im:
            im.load()  # every image is whole
