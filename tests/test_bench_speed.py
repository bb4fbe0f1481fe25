"""The speed benchmark's ``--tiny`` mode: every code path a GPU run takes, at toy size on the CPU.

Speed itself is measured by the benchmark, not asserted here, except the issue's bar on the
editor's own overhead: an edit costs at most 1.15x its 18 bare transformer calls.
"""

from __future__ import annotations

import json

import pytest
import torch

from fireflow.bench import speed

TINY = ["--tiny", "--device", "cpu", "--threads", "1"]


def _records(out, tag: str) -> list[dict]:
    return json.loads((out / f"speed-{tag}.json").read_text())["records"]


def _by_kind(records: list[dict]) -> dict[str, dict]:
    return {r["kind"]: r for r in records}


def test_tiny_reports_every_field_and_a_small_overhead(tmp_path):
    argv = [*TINY, "--sizes", "128", "--repeats", "7", "--targets", "2"]
    assert speed.main([*argv, "--out", str(tmp_path), "--tag", "t"]) == 0
    kinds = _by_kind(_records(tmp_path, "t"))
    assert set(kinds) == {"text_encode", "edit", "batched_edit", "reference", "vae_encode", "vae_decode"}
    edit = kinds["edit"]
    for field in ("s", "nfe", "forward_s", "overhead_ratio", "peak_memory_gib", "card", "torch", "diffusers", "date"):
        assert field in edit, field
    assert edit["nfe"] == 18 and edit["size"] == 128 and edit["finite"]
    assert edit["peak_memory_gib"] is None  # a CPU has no peak GPU memory
    paired = sorted(e / (18 * f) for e, f in zip(edit["runs"], edit["forward_runs"]))
    assert edit["overhead_ratio"] == pytest.approx(paired[len(paired) // 2])
    assert edit["overhead_ratio"] <= 1.15, edit
    # The reference loop computes the same edit (fp32 here: to rounding), and the edit is timed against it.
    reference = kinds["reference"]
    assert reference["nfe"] == 18 and reference["finite"] and reference["rel_diff_to_edit"] < 1e-5
    assert edit["vs_reference"] == pytest.approx(edit["s"] / reference["s"])
    batched = kinds["batched_edit"]
    assert batched["targets"] == 2 and batched["per_target_s"] == pytest.approx(batched["s"] / 2)
    assert all(kinds[k]["s"] > 0 for k in kinds)


@pytest.mark.parametrize(
    "options",
    [
        ["--weights", "fp8"],
        ["--offload", "group"],
        ["--offload", "group-leaf"],
        ["--memory-limit-gib", "14"],  # a no-op on the CPU, but the option parses and is recorded
    ],
)
def test_memory_options_run(tmp_path, options):
    argv = [*TINY, *options, "--sizes", "64", "--parts", "edit", "forward", "--warmup", "0", "--repeats", "1"]
    assert speed.main([*argv, "--out", str(tmp_path), "--tag", "m"]) == 0
    records = _by_kind(_records(tmp_path, "m"))
    edit = records["edit"]
    assert edit["finite"], edit
    if "--weights" in options:  # fp8 storage moves the velocity, by a small relative amount
        assert 1e-4 < records["deviation"]["velocity_rel_err"] < 0.2, records["deviation"]
    else:
        assert "deviation" not in records


def test_precision_part_compares_the_same_edit_in_two_dtypes(tmp_path):
    argv = [*TINY, "--parts", "precision", "--sizes", "64", "--warmup", "0", "--repeats", "1"]
    assert speed.main([*argv, "--dtype", "bf16", "--out", str(tmp_path), "--tag", "p"]) == 0
    (rec,) = _records(tmp_path, "p")
    assert rec["kind"] == "precision" and rec["dtype"] == "bfloat16" and rec["nfe"] == 18
    assert 1e-4 < rec["latents_rel_err"] < 0.5 and rec["fp32_s"] > 0 and rec["s"] > 0  # bf16 rounds, it does not break
    # The same weights in fp32 both times: no difference at all.
    assert speed.main([*argv, "--dtype", "fp32", "--out", str(tmp_path), "--tag", "p32"]) == 0
    (same,) = _records(tmp_path, "p32")
    assert same["latents_rel_err"] == 0.0


def test_fp8_weights_keep_the_compute_dtype():
    from fireflow.bench import _speed_memory as memory
    from fireflow.bench._speed_models import TINY as SPEC
    from fireflow.bench._speed_models import build_transformer
    from fireflow.editor import FireFlowEditor

    transformer = build_transformer(SPEC, "cpu", torch.float32)
    memory.apply_weights(transformer, "fp8", torch.float32)
    assert transformer.x_embedder.weight.dtype == torch.float8_e4m3fn
    assert FireFlowEditor(transformer=transformer).adapter.dtype == torch.float32


def test_compile_and_attention_backend_paths(tmp_path):
    # The eager dynamo backend traces the same graphs as inductor without a C++ build: it checks
    # that idle calls compile whole (fullgraph) and that feature-reuse calls fall back to eager.
    argv = [*TINY, "--compile", "--compile-backend", "eager", "--attention-backend", "native"]
    argv += ["--sizes", "64", "--parts", "edit", "forward", "--warmup", "1", "--repeats", "1"]
    assert speed.main([*argv, "--out", str(tmp_path), "--tag", "c"]) == 0
    (edit,) = _records(tmp_path, "c")
    assert edit["compile"] and edit["attention"] == "native" and edit["finite"]


def test_several_attention_backends_and_a_missing_one(tmp_path):
    argv = [*TINY, "--attention-backend", "native", "_native_math", "flash", "--sizes", "64"]
    argv += ["--parts", "edit", "forward", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), "--tag", "a"]
    assert speed.main(argv) == 0
    records = _records(tmp_path, "a")
    assert [r["attention"] for r in records if r["kind"] == "edit"] == ["native", "_native_math"]
    (skipped,) = [r for r in records if r["kind"] == "skipped"]  # flash-attn is not installed here
    assert skipped["attention"] == "flash" and skipped["error"]


def test_unavailable_quantization_is_a_skipped_record(tmp_path):
    argv = [*TINY, "--quantize", "bnb-nf4", "--sizes", "64", "--parts", "edit", "--out", str(tmp_path), "--tag", "q"]
    assert speed.main(argv) == 0
    (rec,) = _records(tmp_path, "q")
    assert rec["kind"] == "skipped" and "bitsandbytes" in rec["error"]


def test_summarize_merges_runs(tmp_path):
    runs = tmp_path / "runs"
    speed.main([*TINY, "--sizes", "64", "--parts", "forward", "--repeats", "1", "--out", str(runs), "--tag", "x"])
    speed.main([*TINY, "--sizes", "64", "--parts", "vae", "--repeats", "1", "--out", str(runs), "--tag", "y"])
    assert speed.main(["--summarize", str(runs), "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert {r["kind"] for r in merged} == {"forward", "vae_encode", "vae_decode"}
    md = (tmp_path / "speed.md").read_text()
    assert "| model | config | what |" in md and "vae_decode" in md


def test_end_to_end_pipeline_edit(tmp_path):
    # Image to image through FireFlowEditor.edit on a whole random pipeline; "model" offload is a
    # no-op without an accelerator, but the option and the fp8 transformer go through the same code.
    argv = [*TINY, "--parts", "e2e", "--weights", "fp8", "--offload", "model", "--sizes", "64"]
    assert speed.main([*argv, "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), "--tag", "e"]) == 0
    (rec,) = _records(tmp_path, "e")
    assert rec["kind"] == "e2e_edit" and rec["nfe"] == 18 and rec["s"] > 0 and "error" not in rec


def test_bars_read_the_issues_limits_off_the_records():
    base = {"model": "flux-dev", "size": 1024, "card": "NVIDIA H200", "offload": "none", "weights": "native"}
    records = [
        {**base, "kind": "edit", "s": 3.6, "overhead_ratio": 1.03, "compile": False},
        {**base, "kind": "reference", "s": 3.8, "compile": False},
        {**base, "kind": "edit", "s": 2.5, "overhead_ratio": 1.12, "compile": True},
        {**base, "kind": "edit", "s": 5.0, "weights": "fp8", "memory_limit_gib": 14},
        {**base, "kind": "edit", "memory_limit_gib": 22, "error": "out of memory: ..."},
        {**base, "kind": "edit", "s": 0.1, "size": 512, "compile": False},  # a smaller size is not judged
    ]
    ref, eager, compiled, fit22, fit14 = speed.bars(records)
    assert ref.startswith(
        "fastest edit / the reference implementation's, same card at 1024²: 0.658 (bar <= 0.70): reached"
    )
    assert "compiled edit 2.500 s, reference 3.800 s" in ref and "0.668 of the published H200 figure" in ref
    assert eager.endswith("1.030 (bar <= 1.05): reached")
    assert compiled.endswith("1.120 (bar <= 1.10): NOT reached")
    assert fit22 == "1024² edit within 22 GiB: no configuration measured to fit"  # its one try ran out of memory
    assert fit14.startswith("1024² edit within 14 GiB: fits, fastest as") and "5.000 s" in fit14
    assert speed.bars([]) == [f"{name}: not measured" for name, _ in speed.BARS.values()]
