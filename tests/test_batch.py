"""fireflow batch: manifests, bad lines, grouping, resume after SIGKILL, torchrun sharding (scenes model)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fireflow import batch as B
from fireflow.bench.pie import SCENES_PIE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SCENES = sorted((SCENES_PIE / "annotation_images").glob("*/*.png"))
RUN = {"model": "scenes", "progress": False, "log": lambda s: None}


@pytest.fixture(scope="module")
def scenes_editor():
    from fireflow import FireFlowEditor

    return FireFlowEditor.from_pretrained("scenes", device="cpu", torch_dtype="fp32")


class Counting:
    """The editor, counting its edit calls."""

    def __init__(self, editor):
        self.editor, self.calls = editor, []

    def resolve(self, *a, **k):
        return self.editor.resolve(*a, **k)

    def edit(self, image, source, targets, *a, **k):
        self.calls.append(list(targets))
        return self.editor.edit(image, source, targets, *a, **k)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, src in enumerate(SCENES[:n]):
        shutil.copy(src, folder / f"s{i}.png")
        names.append(f"img/s{i}.png")
    return names


def _results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / B.RESULTS).read_text().splitlines()]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cli(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "fireflow", "batch", str(manifest), "--out", str(out), "--model", "scenes", "--device", "cpu"] + [
        "-q",
        *extra,
    ]


def _small_manifest(tmp: Path) -> Path:
    """Six lines: two share an image and source (one group), one has two targets."""
    img = _images(tmp / "img", 4)
    rows = [
        {"id": "a", "image": img[0], "source": "dog face, beige background", "target": "cat face, beige background"},
        {"id": "b", "image": img[0], "source": "dog face, beige background", "target": "lemon, beige background"},
        {"image": img[1], "source": "lemon, mint green background", "target": ["grapes, mint green background"] * 2},
        {
            "id": "d",
            "image": img[2],
            "source": "panda, mint green background",
            "target": "cat face, mint green background",
        },
        {"id": "e", "image": img[3], "source": "a scene", "target": "a red scene", "num_steps": 4},
        {"id": "f", "image": img[3], "source": "a scene", "target": "a blue scene", "output": "custom/f.jpg"},
    ]
    return _write(tmp / "m.jsonl", rows)


# ---- in one process ------------------------------------------------------------------------------


def test_five_kinds_of_bad_line_are_reported_and_the_rest_done(tmp_path, scenes_editor):
    img = _images(tmp_path / "img", 2)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"this is no PNG")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img" / "black.png")
    big = Image.open(tmp_path / img[1]).resize((320, 320))
    big.save(tmp_path / "img" / "big.png")
    dot = np.zeros((320, 320), np.uint8)
    dot[100, 100] = 255  # one pixel: gone at the model's 32x32, so the edit itself raises
    Image.fromarray(dot).save(tmp_path / "img" / "dot.png")
    good = {"source": "dog face, beige background", "target": "cat face, beige background"}
    rows = [
        {"id": "ok1", "image": img[0], **good},
        {"id": "missing", "image": "img/nope.png", **good},
        {"id": "corrupt", "image": "img/corrupt.png", **good},
        {"id": "knob", "image": img[0], **good, "num_steps": 0},
        {"id": "ok2", "image": img[1], **good, "target": "lemon, beige background"},
        {"id": "mask", "image": img[0], **good, "mask": "img/black.png"},
        {"id": "raises", "image": "img/big.png", **good, "mask": "img/dot.png"},
    ]
    out = tmp_path / "out"
    logged = []
    s = B.run_batch(_write(tmp_path / "m.jsonl", rows), out, scenes_editor, **{**RUN, "log": logged.append})
    assert {ln.id for ln in s.bad} == {"missing", "corrupt", "knob", "mask"}  # found before the model
    assert "4 bad line(s) of 7" in logged[0]
    assert [f["id"] for f in s.failed] == ["raises"]
    res = {r["id"]: r for r in _results(out)}
    assert list(res) == [r["id"] for r in rows]  # manifest order, each id once
    bad = {i: r for i, r in res.items() if r["status"] == "error"}
    assert set(bad) == {"missing", "corrupt", "knob", "mask", "raises"}
    assert "not found" in bad["missing"]["error"]
    assert "not a readable image" in bad["corrupt"]["error"]
    assert "num_steps" in bad["knob"]["error"]
    assert "selects nothing" in bad["mask"]["error"]
    assert "nothing to edit" in bad["raises"]["error"] and bad["raises"]["stage"] == "edit"
    for i in ("ok1", "ok2"):
        assert res[i]["status"] == "ok" and res[i]["nfe"] == 18 and res[i]["transformer_calls"] == 18
        assert res[i]["settings"]["num_steps"] == 8
        with Image.open(out / res[i]["outputs"][0]) as im:
            im.load()
    assert s.exit_code == 1
    assert not list(out.rglob("*.tmp"))


def test_strict_stops_before_the_model_on_a_bad_line(tmp_path):
    img = _images(tmp_path / "img", 1)
    rows = [{"image": img[0], "source": "a", "target": "b"}, {"image": img[0], "source": "a", "target": "c", "x": 1}]
    with pytest.raises(B.BatchError, match="unknown field 'x'"):
        B.run_batch(_write(tmp_path / "m.jsonl", rows), tmp_path / "o", lambda: pytest.fail("loaded"), strict=True)


def test_block_ranges_are_checked_against_the_model_before_any_edit(tmp_path, scenes_editor):
    img = _images(tmp_path / "img", 1)
    rows = [
        {"id": "a", "image": img[0], "source": "a scene", "target": "b scene"},
        {"id": "z", "image": img[0], "source": "a scene", "target": "c scene", "blocks": "single:99"},
    ]
    ed = Counting(scenes_editor)
    s = B.run_batch(_write(tmp_path / "m.jsonl", rows), tmp_path / "o", ed, **RUN)
    assert [f["id"] for f in s.failed] == ["z"] and len(ed.calls) == 1
    z = _results(tmp_path / "o")[1]
    assert z["stage"] == "model" and "out of range" in z["error"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouping_makes_the_formula_nfe(tmp_path, scenes_editor, k):
    """k lines sharing an image and a source prompt: one inversion, 9 + 9k NFE at the defaults."""
    img = _images(tmp_path / "img", 1)
    targets = ["cat face, beige background", "lemon, beige background", "panda, beige background"][:k]
    rows = [{"image": img[0], "source": "dog face, beige background", "target": t} for t in targets]
    ed = Counting(scenes_editor)
    s = B.run_batch(_write(tmp_path / "m.jsonl", rows), tmp_path / "o", ed, max_batch=4, **RUN)
    assert s.calls == 1 and ed.calls == [targets]
    res = _results(tmp_path / "o")
    assert {r["nfe"] for r in res} == {9 + 9 * k} and {r["group_targets"] for r in res} == {k}
    assert len({r["group"] for r in res}) == 1
    # --max-batch 1: one call a line, 18 NFE each.
    ed1 = Counting(scenes_editor)
    B.run_batch(tmp_path / "m.jsonl", tmp_path / "o1", ed1, max_batch=1, **RUN)
    assert len(ed1.calls) == k and {r["nfe"] for r in _results(tmp_path / "o1")} == {18}


def test_csv_manifest_and_rerun_rules(tmp_path, scenes_editor):
    img = _images(tmp_path / "img", 1)
    (tmp_path / "m.csv").write_text(
        "id,image,source,target,num_steps\n"
        f'x,{img[0]},a scene,"[""b scene"", ""c scene""]",4\n'
        f"y,{img[0]},a scene,d scene,\n"
    )
    ed = Counting(scenes_editor)
    B.run_batch(tmp_path / "m.csv", tmp_path / "o", ed, **RUN)
    res = _results(tmp_path / "o")
    assert res[0]["outputs"] == ["images/x-0.png", "images/x-1.png"] and res[0]["settings"]["num_steps"] == 4
    assert res[1]["outputs"] == ["images/y.png"] and res[1]["nfe"] == 18
    again = Counting(scenes_editor)  # a rerun does nothing
    assert B.run_batch(tmp_path / "m.csv", tmp_path / "o", again, **RUN).skipped == 2 and again.calls == []
    with pytest.raises(B.BatchError, match="other settings.*num_steps"):
        from fireflow.settings import EditSettings

        B.run_batch(tmp_path / "m.csv", tmp_path / "o", ed, EditSettings(num_steps=6), **RUN)
    with pytest.raises(B.BatchError, match="max_batch"):
        B.run_batch(tmp_path / "m.csv", tmp_path / "o", ed, max_batch=1, **RUN)
    (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text().replace("d scene", "e scene"))
    with pytest.raises(B.BatchError, match="changed in the manifest"):
        B.run_batch(tmp_path / "m.csv", tmp_path / "o", ed, **RUN)


def test_torn_last_line_is_tolerated(tmp_path):
    shard = B.shard_path(tmp_path, 0)
    shard.write_text('{"id": "a", "status": "ok", "outputs": []}\n{"id": "b", "sta')
    assert [r["id"] for r in B.read_results(tmp_path)] == ["a"]
    s = B.Shard(shard)
    s.append({"id": "c", "status": "ok", "outputs": []})
    s.close()
    assert [r["id"] for r in B.read_results(tmp_path)] == ["a", "c"]


# ---- as users run it -----------------------------------------------------------------------------


def test_torchrun_two_processes_give_the_bytes_of_one(tmp_path):
    manifest = _small_manifest(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *_cli(manifest, one)], check=True, env=_env(), timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run([*torchrun, *_cli(manifest, two)], env=_env(), timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _results(one), _results(two)
    assert [x["id"] for x in a] == [x["id"] for x in b] == ["a", "b", "line-000003", "d", "e", "f"]
    assert {x["rank"] for x in b} == {0, 1} and (two / "results.rank1.jsonl").is_file()
    assert a[0]["group"] == a[1]["group"] and a[0]["nfe"] == 27  # a and b: one inversion
    for x, y in zip(a, b, strict=True):
        assert x["status"] == y["status"] == "ok" and x["outputs"] == y["outputs"]
        assert x["nfe"] == y["nfe"] and x["settings"] == y["settings"]
        for o in x["outputs"]:
            assert (one / o).read_bytes() == (two / o).read_bytes(), o


def test_sigkill_midway_then_rerun_ends_complete(tmp_path):
    manifest = _small_manifest(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, *_cli(manifest, out, "--max-batch", "1")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = B.shard_path(out, 0)
    deadline = time.time() + 300
    while time.time() < deadline and (not shard.is_file() or shard.read_bytes().count(b"\n") < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = B.read_results(out)
    assert 2 <= len(first) < 6, "the run should die part-way"
    assert not (out / B.RESULTS).exists()
    subprocess.run(cmd, check=True, env=_env(), timeout=600)
    final = _results(out)
    assert [r["id"] for r in final] == ["a", "b", "line-000003", "d", "e", "f"]
    by_id = {r["id"]: r for r in final}
    for r in first:
        assert by_id[r["id"]]["run_id"] == r["run_id"]  # done before the kill: not redone
    for r in final:
        assert r["status"] == "ok"
        for o in r["outputs"]:
            with Image.open(out / o) as im:
                im.load()
    assert not list(out.rglob("*.tmp"))


def test_cli_bad_command_input_is_exit_2_and_python_m_works(tmp_path):
    manifest = _small_manifest(tmp_path)
    r = subprocess.run(
        [sys.executable, *_cli(manifest, tmp_path / "o", "--steps", "0")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--steps" in r.stderr and not (tmp_path / "o").exists()


def test_eval_pie_reads_a_batch_run_of_a_pie_manifest(tmp_path, scenes_editor):
    from fireflow.bench import pie
    from fireflow.bench.synthetic import make_synthetic_pie

    data = make_synthetic_pie(tmp_path / "pie", per_type=1, size=32, types=["0", "6"])
    manifest = pie.write_manifest(data, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    assert B.run_batch(manifest, out, scenes_editor, **RUN).edited == 2
    summary = pie.evaluate_pie(data, out, None, pie.MetricModels(), progress=False)
    assert summary["overall"]["n"] == 2 and summary["nfe"] == 18 and summary["model"] == "scenes"
    assert (out / "eval_summary.json").is_file() and not summary["masked"]


def test_runner_hooks_limit_array_masks_and_output_steps(tmp_path):
    """What front ends (bench pie) build on: lines made in memory with mask arrays, a limit, a
    per-line output step whose fields join the result, and a callback after each result."""
    from types import SimpleNamespace

    from fireflow.settings import EditSettings

    class Fake:
        def __init__(self):
            self.masks = []

        def resolve(self, s):
            return s

        def edit(self, image, source, targets, s, mask=None, paste_pixels=False):
            self.masks.append((None if mask is None else mask.shape, paste_pixels))
            return SimpleNamespace(images=[image] * len(targets), settings=None, nfe=1, seconds=0.0)

    names = _images(tmp_path / "img", 3)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    rows = [{"id": f"a{i}", "image": n, "source": "s", "target": "t"} for i, n in enumerate(names)]
    rows[1].update(mask=mask, paste_pixels=True)
    base = EditSettings().check()
    lines = [B.parse_line(i, r, base, tmp_path, None) for i, r in enumerate(rows, 1)]
    assert [ln.error for ln in lines] == [None] * 3 and lines[1].mask is mask
    results, ed = [], Fake()

    def on_output(ln, images):
        return [im.resize((8, 8)) for im in images], {"made": list(images[0].size)}

    kw = dict(lines=lines, on_output=on_output, on_result=lambda ln, r: results.append(r), max_batch=1, **RUN)
    s = B.run_batch(None, tmp_path / "out", ed, limit=2, **kw)
    assert s.edited == 2 and [r["id"] for r in results] == ["a0", "a1"] and results[0]["made"] == [32, 32]
    assert ed.masks == [(None, False), ((32, 32), True)]
    with Image.open(tmp_path / "out" / "images" / "a0.png") as im:
        assert im.size == (8, 8)
    s = B.run_batch(None, tmp_path / "out", ed, **kw)
    assert s.skipped == 2 and s.edited == 1 and s.merged == 3
    other = np.zeros_like(mask)
    other[0:4, 0:4] = True  # another mask array: another line (its hash changes), refused when done
    lines[1] = B.parse_line(2, {**rows[1], "mask": other}, base, tmp_path, None)
    with pytest.raises(B.BatchError, match="changed in the manifest"):
        B.run_batch(None, tmp_path / "out", ed, **kw)
